"""`potluck doctor`: check a machine before it joins, and say what to fix.

One line per check, OK / WARN / FAIL (SKIP: not checked, with the flag that would check it); the exit
status is 1 when any check fails. The checks are pure functions of measured numbers (`memory_check`,
`disk_check`, `clock_check`, `reach_check`); the rest of this module measures them:

- device and free memory: CPU RAM, and every CUDA device torch sees;
- disk: free space where the model cache lives against the model's size (a local --model folder, or --need);
- clock skew against each --bootstrap node (swarm tokens need clocks within TOKEN_WINDOW seconds);
- reachability: each bootstrap node calls back the --announce address (rpc Probe, node/rpc/probe.py).
  Doctor serves a temporary health service on the port a node would bind for that, or, if something
  listens there already (a running node), has that probed."""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.wire.security import TOKEN_FUTURE, TOKEN_WINDOW, Security
from node.config import ConfigError, parse_size

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
GB = 1e9
MIN_MEMORY = 512 * 2**20      # below this free, a node cannot hold even a tiny span and its cache
LOW_MEMORY = 2 * 2**30        # below this free, only small models or few layers
LOW_DISK = 10 * GB            # with no model size known: less than this free holds small models only
CLOCK_WARN = 10.0             # seconds of skew worth fixing before it reaches TOKEN_FUTURE (30 s ahead)
CALL_TIMEOUT = 5.0            # seconds for each call to a bootstrap node (a probe gets its own few more)
NTP_FIX = "sync the clock with NTP (timedatectl set-ntp true, or run chrony/ntpd)"


@dataclass(frozen=True)
class Check:
    name: str       # what was checked ("CPU RAM", "clock vs 10.0.0.5:31330")
    level: str      # OK | WARN | FAIL | SKIP
    message: str    # what was found
    fix: str = ""   # what to do about it (WARN, FAIL, SKIP)


# -- pure checks: numbers in, verdict out ---------------------------------------------------------------
def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def memory_check(name: str, free: int, total: int, layer_bytes: int | None = None,
                 num_layers: int | None = None) -> Check:
    """Free memory of one device; with a model's per-layer size, how many of its layers fit."""
    found = f"{_gb(free)} free of {_gb(total)}"
    if layer_bytes:
        fits = int(free // layer_bytes)
        of = f" of {num_layers}" if num_layers else ""
        if fits < 1:
            return Check(name, FAIL, f"{found}: not even one layer of the model (about {_gb(layer_bytes)}) fits",
                         "free memory (close other programs), or serve a smaller model")
        found += f": room for about {min(fits, num_layers or fits)}{of} layers of the model"
    if free < MIN_MEMORY:
        return Check(name, FAIL, found, "free memory: a node needs at least 0.5 GB for its layers and KV cache")
    if free < LOW_MEMORY:
        return Check(name, WARN, found, "little memory: serve few layers (--num-blocks, --memory) or a small model")
    return Check(name, OK, found)


def disk_check(path: str | Path, free: int, need: int | None = None) -> Check:
    """Free disk where the model cache lives, against the model's size if known."""
    name = "disk"
    found = f"{_gb(free)} free for the model cache in {path}"
    fix = "free disk space, or point HF_HOME (or --cache-dir) at a larger disk"
    if need is None:
        if free < LOW_DISK:
            return Check(name, WARN, found + " (enough for small models only)",
                         fix + "; give --need SIZE or --model FOLDER to check against a model")
        return Check(name, OK, found)
    found += f"; the model needs {_gb(need)}"
    if free < need:
        return Check(name, FAIL, found, fix)
    if free < need * 1.1 + 1 * GB:
        return Check(name, WARN, found + " (barely)", fix)
    return Check(name, OK, found)


def clock_check(address: str, skew: float, rtt: float, window: float = TOKEN_WINDOW,
                future: float = TOKEN_FUTURE) -> Check:
    """This machine's clock against a node's: `skew` = theirs - ours in seconds, measured over a call of `rtt`.
    A clock behind the node's stamps tokens that look `skew` old (valid for `window` seconds); one ahead stamps
    tokens from the node's future (accepted up to `future` seconds ahead)."""
    name = f"clock vs {address}"
    found = f"{skew:+.2f} s (±{rtt / 2:.2f} s)"
    limit = window if skew > 0 else future
    if abs(skew) > limit:
        return Check(name, FAIL, found + f": more than the {limit:.0f} s swarm tokens allow; calls will be refused",
                     NTP_FIX)
    if abs(skew) > CLOCK_WARN:
        return Check(name, WARN, found + f": within the {window:.0f} s swarm tokens allow, but drifting", NTP_FIX)
    return Check(name, OK, found)


def reach_check(bootstrap: str, address: str, reachable: bool, detail: str, host: str | None = None,
                port: int | None = None) -> Check:
    """The verdict of `bootstrap` calling `address` back; `host`/`port`: what this machine binds."""
    name = f"reach {address}"
    if reachable:
        return Check(name, OK, f"{bootstrap} reached {address} ({detail})")
    a_host, _, a_port = address.rpartition(":")
    fixes = []
    if host is not None and _loopback(host) and not _loopback(a_host.strip("[]")):
        fixes.append(f"this machine binds {host} only: use --host 0.0.0.0 (or the interface's address)")
    if port is not None and a_port.isdigit() and int(a_port) != port:
        fixes.append(f"--announce's port {a_port} is not the bound port {port}: make them match, "
                     f"or forward {a_port} to {port} on the NAT router")
    fixes.append(f"open TCP port {a_port} in the firewall (and forward it on a NAT router), or set --announce "
                 "to an address other machines can dial")
    return Check(name, FAIL, f"{bootstrap} could not reach {address}: {detail}", "; ".join(fixes))


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


# -- measurements ---------------------------------------------------------------------------------------
def model_size(model: str) -> tuple[int, int | None] | None:
    """(bytes, layers) of a local model folder; None for a hub id."""
    folder = Path(model)
    if not folder.is_dir():
        return None
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    layers = None
    try:
        config = json.loads((folder / "config.json").read_text())
        layers = config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers")
    except (OSError, ValueError, AttributeError):
        pass
    return size, layers if isinstance(layers, int) and layers > 0 else None


def kernel_check(compilers: tuple[str, ...] | None = None) -> Check:
    """Whether the exact compact weights' kernels build here (common/weights/exact.py): CPU decode of GGUF-converted
    and bfloat16 models reads 2-5x fewer bytes with them."""
    from common.weights.exact import COMPILERS, DEFAULT_CACHE, KernelError, build_kernels

    name = "exact kernels"
    try:
        kernels = build_kernels(DEFAULT_CACHE, compilers or COMPILERS)
    except KernelError as error:
        return Check(name, WARN, f"exact compact weights are off: {error}",
                     "install a C compiler (Debian/Ubuntu: apt install gcc) so that CPU nodes can hold GGUF-converted "
                     "and bfloat16 weights in their narrow form (docs/performance.md#exact-compact-weights)")
    return Check(name, OK, f"built ({kernels.instructions}): {kernels.path}")


def device_checks(device: str, layer_bytes: int | None = None, num_layers: int | None = None) -> list[Check]:
    """The compute device --device would resolve to, CPU RAM, and each CUDA device's free memory."""
    import torch

    from common.weights.dtypes import free_memory

    checks = []
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    wanted = device.split(":")[0]
    if wanted == "cuda" and not cuda:
        checks.append(Check("device", FAIL, f"--device {device} but torch {torch.__version__} sees no CUDA device",
                            "check nvidia-smi and CUDA_VISIBLE_DEVICES, and install a CUDA build of torch"))
    elif wanted == "cuda" and ":" in device and int(device.split(":")[1]) >= cuda:
        checks.append(Check("device", FAIL, f"--device {device} but torch sees {cuda} CUDA devices",
                            f"choose cuda:0..cuda:{cuda - 1}"))
    elif wanted == "mps" and not mps:
        checks.append(Check("device", FAIL, f"--device {device} but torch sees no MPS device", "use --device cpu"))
    else:
        seen = f"{cuda} CUDA device(s)" if cuda else ("MPS" if mps else "no GPU: the node computes on the CPU")
        checks.append(Check("device", OK, f"torch {torch.__version__}, {seen}"))
    if wanted == "cpu" or not (cuda or mps):
        checks.append(kernel_check())
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
    checks.append(memory_check("CPU RAM", free_memory(torch.device("cpu")), pages, layer_bytes, num_layers))
    for index in range(cuda):
        free, total = torch.cuda.mem_get_info(index)
        name = f"cuda:{index} {torch.cuda.get_device_name(index)}"
        checks.append(memory_check(name, int(free), int(total), layer_bytes, num_layers))
    return checks


def cache_dir(override: str | None = None) -> Path:
    """Where hub downloads go: --cache-dir, else huggingface_hub's (HF_HUB_CACHE, HF_HOME/hub, ~/.cache/...)."""
    if override:
        return Path(override)
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def disk_free(path: Path) -> int:
    """Free bytes on the disk that holds `path` (or would: its nearest existing parent)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


# -- the swarm: clock and call-back ---------------------------------------------------------------------
def _bind_problem(host: str, port: int) -> str | None:
    """None if `host:port` can be bound now; 'in use', or why it cannot be bound at all."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            return "in use" if error.errno == errno.EADDRINUSE else (error.strerror or str(error))
    return None


async def _health_server(host: str, port: int, security: Security):
    """A gRPC server with only the health service (SERVING), bound to host:port; None if it cannot bind."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from node.server import format_address

    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    try:
        bound = security.add_port(server, format_address(host, port))
    except RuntimeError:
        bound = 0
    if not bound:
        return None
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server


def _listen_security(security: Security) -> Security | None:
    """The Security a temporary server presents: auto TLS gets a throwaway identity's certificate."""
    if security.tls == "auto":
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return security.for_node(Ed25519PrivateKey.generate())
    if security.tls == "ca" and security.certificate is None:
        return None
    return security


def _call_failure(address: str, error: grpc.aio.AioRpcError) -> Check:
    code = error.code()
    name = f"bootstrap {address}"
    found = f"{code.name}: {error.details() or code.name}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Check(name, FAIL, found, f"give this swarm's key (--swarm-key FILE); if you did, clocks may be more "
                                        f"than {TOKEN_WINDOW:.0f} s apart: {NTP_FIX}")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return Check(name, WARN, "it runs an older Potluck without Probe: clock and reachability not checked",
                     "ask its operator to upgrade")
    return Check(name, FAIL, found, "check the address and that a node runs there; its port must be open to this "
                                    "machine; a TLS swarm needs --tls auto (or --tls ca --tls-ca FILE)")


async def _clock(stub, address: str, timeout: float) -> Check:
    from common.wire.generated import potluck_pb2 as pb

    sent = time.time()
    reply = await stub.Probe(pb.ProbeRequest(), timeout=timeout)
    received = time.time()
    return clock_check(address, reply.time - (sent + received) / 2, received - sent)


async def swarm_checks(bootstrap: tuple[str, ...], announce: str | None, host: str, port: int | None,
                       security: Security, timeout: float = CALL_TIMEOUT) -> list[Check]:
    """Clock skew against each bootstrap node; then each calls `announce` back (served here meanwhile)."""
    from common.wire.generated import potluck_pb2 as pb
    from common.wire.generated import potluck_pb2_grpc as pb_grpc
    from node.rpc.probe import PROBE_TIMEOUT

    if not bootstrap:
        return [Check("swarm", SKIP, "no --bootstrap given: clock skew and reachability not checked",
                      "give --bootstrap HOST:PORT (and --announce HOST:PORT) of the swarm you will join")]
    checks: list[Check] = []
    server = None
    if announce:
        port = port if port is not None else int(announce.rpartition(":")[2])
        problem = _bind_problem(host, port)
        listen = _listen_security(security)
        if problem == "in use":
            checks.append(Check("listen", OK, f"{host}:{port} is in use (a running node?): having that probed"))
        elif problem is not None:
            checks.append(Check("listen", FAIL, f"cannot bind {host}:{port}: {problem}",
                                "bind an address of this machine (--host 0.0.0.0) and a free port above 1024"))
        elif listen is None:
            checks.append(Check("listen", SKIP, "--tls ca needs --tls-cert/--tls-key to serve the call-back",
                                "give the certificate and key the node will present"))
        else:
            server = await _health_server(host, port, listen)
            checks.append(Check("listen", OK if server else FAIL,
                                f"serving a temporary health check on {host}:{port} for the call-back" if server
                                else f"could not bind {host}:{port}", "" if server else "choose another --port"))
    try:
        for address in bootstrap:
            await security.prefetch(address)
            channel = security.channel(address)
            try:
                stub = pb_grpc.PotluckStub(channel)
                try:
                    checks.append(await _clock(stub, address, timeout))
                    if announce:
                        reply = await stub.Probe(pb.ProbeRequest(address=announce), timeout=timeout + PROBE_TIMEOUT)
                        checks.append(reach_check(address, announce, reply.reachable, reply.detail, host, port))
                except grpc.aio.AioRpcError as error:
                    checks.append(_call_failure(address, error))
            finally:
                await channel.close()
    finally:
        if server is not None:
            await server.stop(0)
    if not announce:
        checks.append(Check("reach", SKIP, "no --announce given: nobody was asked to call this machine back",
                            "give --announce HOST:PORT, the address the node will advertise"))
    return checks


# -- the command ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DoctorOptions:
    model: str | None = None            # model folder (its size and layers are checked) or hub id
    need: int | None = None             # bytes the model cache must hold (default: a local model's size)
    cache_dir: str | None = None        # where the model cache lives (default: huggingface_hub's)
    device: str = "auto"                # the --device the node will use
    bootstrap: tuple[str, ...] = ()     # nodes to measure the clock against and to ask for a call-back
    announce: str | None = None         # HOST:PORT the node will advertise
    host: str = "127.0.0.1"             # the address the node will bind (as `join --host`)
    port: int | None = None             # the port the node will bind (default: --announce's)
    timeout: float = CALL_TIMEOUT       # seconds per call to a bootstrap node


async def run_doctor(options: DoctorOptions, security: Security) -> list[Check]:
    sized = model_size(options.model) if options.model else None
    size, layers = sized if sized else (None, None)
    checks = []
    if options.model and sized is None:
        checks.append(Check("model", SKIP, f"{options.model} is not a local folder: its size is unknown",
                            "give --need SIZE (the model's download size) to check the disk against it"))
    elif sized is not None:
        checks.append(Check("model", OK, f"{options.model}: {_gb(size)}" + (f", {layers} layers" if layers else "")))
    per_layer = size // layers if size and layers else None
    checks += await asyncio.to_thread(device_checks, options.device, per_layer, layers)
    where = cache_dir(options.cache_dir)
    checks.append(disk_check(where, disk_free(where), options.need if options.need is not None else size))
    checks += await swarm_checks(options.bootstrap, options.announce, options.host, options.port, security,
                                 options.timeout)
    return checks


def render(checks: list[Check], console) -> None:
    from rich.text import Text

    styles = {OK: "green", WARN: "yellow", FAIL: "bold red", SKIP: "dim"}
    for check in checks:
        line = Text.assemble((f"{check.level:<4}", styles[check.level]), "  ", (check.name, "bold"), ": ",
                             check.message)
        if check.fix and check.level != OK:
            line.append_text(Text.assemble(("  fix: ", "cyan"), check.fix))
        console.print(line)


def add_doctor_parser(commands) -> None:
    from node.cli.args import add_logging, add_trust_args

    doctor = commands.add_parser("doctor", help="check this machine before joining: memory, disk, clock, reachability")
    doctor.add_argument("--model", default=None, help="model folder (checks its size and layers) or hub id")
    doctor.add_argument(
        "--need", default=None, help="disk the model needs, e.g. 16GB (default: a local --model's size)"
    )
    doctor.add_argument("--cache-dir", default=None, help="model cache folder (default: HF_HOME's hub cache)")
    doctor.add_argument("--device", default="auto", help="the --device the node will use (default auto)")
    doctor.add_argument("--bootstrap", action="append", default=[],
                        help="HOST:PORT of a swarm node, or a file with one per line (repeatable): measures the "
                             "clock against it and asks it to call --announce back")
    doctor.add_argument("--announce", default=None, help="HOST:PORT the node will advertise (checked from --bootstrap)")
    doctor.add_argument("--host", default="127.0.0.1", help="address the node will bind (as join's; default 127.0.0.1)")
    doctor.add_argument("--port", type=int, default=None, help="port the node will bind (default: --announce's port)")
    doctor.add_argument("--timeout", type=float, default=CALL_TIMEOUT, help="seconds per call (default 5)")
    add_trust_args(doctor, serving=True)
    add_logging(doctor)


def run_doctor_cli(args: argparse.Namespace) -> None:
    from rich.console import Console

    from common.wire.security import load_security
    from node.cli.args import bootstrap_list, trust_options
    from node.rpc.checks import check_address
    from node.runtime.errors import InvalidRequest

    if args.announce:
        try:
            check_address(args.announce, "--announce")
        except InvalidRequest as error:
            raise ConfigError(error.message) from None
    security = load_security(**trust_options(args))
    options = DoctorOptions(model=args.model, need=parse_size(args.need, "--need") if args.need else None,
                            cache_dir=args.cache_dir, device=args.device, bootstrap=bootstrap_list(args.bootstrap),
                            announce=args.announce, host=args.host, port=args.port, timeout=args.timeout)
    checks = asyncio.run(run_doctor(options, security))
    render(checks, Console(soft_wrap=True, highlight=False))
    if any(check.level == FAIL for check in checks):
        raise SystemExit(1)
