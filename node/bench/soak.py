"""`potluck bench-soak`: many clients for minutes against a real swarm, with client disconnects and a
node restart; counts answers that are not exactly transformers', and checks memory and caches.

Clients are threads sharing one client model (its generate is safe to call from several threads:
each call opens its own session). Each request greedily extends one of a fixed set of prompts whose
answers transformers computed beforehand; some requests are abandoned part-way on purpose (the
client closes its session, as a browser tab that goes away). Half-way through, one node is killed
with SIGKILL and started again on the same address; sessions wait for it and replay.

A second phase (`--chaos-seconds`) keeps steady clients running while others cancel at random (they
abandon their request after a random number of tokens) and client processes are SIGKILLed at a random
moment of their generation (their streams end while their steps wait in, or run through, the nodes'
passes): every steady answer must still be transformers', none may be stranded, and every node's cache
must be free afterwards."""

from __future__ import annotations

import argparse
import logging
import random
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

MARK_START = "<!-- bench:soak:start -->"
MARK_END = "<!-- bench:soak:end -->"


class Abandon(Exception):
    """Raised from a streamer: the client walks away mid-generation."""


class _AbandonAfter:
    """A streamer that gives up after `tokens` new tokens (the first put is the prompt)."""

    def __init__(self, tokens: int):
        self.left = tokens + 1

    def put(self, value) -> None:
        self.left -= 1
        if self.left <= 0:
            raise Abandon

    def end(self) -> None:
        pass


class _FailoverCounter(logging.Handler):
    """Counts the sessions' failovers (each logs one 're-routed' warning)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "re-routed" in record.getMessage():
            self.count += 1


@dataclass
class SoakSettings:
    model: Path
    clients: int = 16
    seconds: float = 300.0
    new_tokens: int = 12
    prompts: int = 8
    abandon: float = 0.2          # share of requests abandoned part-way
    restart_at: float = 0.5       # when (share of the run) one node is killed and restarted
    threads: int = 0
    seed: int = 0
    command: str = ""
    chaos_seconds: float = 60.0   # the phase with random cancels and killed client processes (0: none)
    chaos_killers: int = 2        # client processes at a time that get SIGKILLed mid-generation


@dataclass
class SoakResult:
    settings: SoakSettings
    completed: int = 0
    abandoned: int = 0
    failed: int = 0
    wrong: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    failures: list[str] = field(default_factory=list)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)   # node label -> peak RSS over its processes
    reserved_after: dict[str, int] = field(default_factory=dict)  # node label -> cache tokens still reserved
    cache_budget: int = 0
    restart_seconds: float = 0.0  # from the kill to the restarted node being ready
    failovers: int = 0
    chaos: "ChaosResult | None" = None


@dataclass
class ChaosResult:
    """The phase with random cancels and client processes killed mid-generation."""

    seconds: float = 0.0
    completed: int = 0
    wrong: int = 0
    cancelled: int = 0   # requests abandoned at a random token (sessions closed mid-generation)
    killed: int = 0      # client processes SIGKILLed mid-generation
    failed: int = 0
    stranded: int = 0    # steady requests still unanswered 60 s after the phase ended
    failures: list[str] = field(default_factory=list)


CACHE_TOKENS = 65536  # each node's --cache-tokens here


def _free_cache_tokens(address: str) -> int:
    """A node's unreserved cache tokens, from its Info."""
    import grpc

    from common.wire.generated import potluck_pb2 as pb
    from common.wire.generated import potluck_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        return pb_grpc.PotluckStub(channel).Info(pb.InfoRequest(), timeout=10).free_cache_tokens


def run_soak(settings: SoakSettings, console: Console | None = None) -> SoakResult:
    from transformers import AutoModelForCausalLM

    from client.config import ClientConfig
    from client.model import DistributedModelForCausalLM
    from node.bench.basic import prompt_ids
    from node.bench.perf import rss_mb
    from node.launcher import NodeProcess, even_spans

    console = console or Console(stderr=True)
    result = SoakResult(settings)
    reference = AutoModelForCausalLM.from_pretrained(settings.model, dtype=torch.float32).eval()
    config = reference.config
    prompts = [prompt_ids(config, 8 + 3 * i, settings.seed + i) for i in range(settings.prompts)]
    console.print(f"computing {len(prompts)} reference answers with transformers")
    answers = [reference.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=settings.new_tokens,
                                  min_new_tokens=settings.new_tokens, do_sample=False)[0, p.shape[1]:].tolist()
               for p in prompts]
    del reference
    spans = even_spans(config.num_hidden_layers, 3)
    identities = Path(tempfile.mkdtemp(prefix="potluck-soak-"))
    common = ("--no-mdns", "--session-idle-timeout", "60", "--drain-timeout", "5", "--cache-tokens", str(CACHE_TOKENS))

    def start(index: int, port: int = 0, bootstrap: tuple[str, ...] = ()) -> NodeProcess:
        a, b = spans[index]
        extra = (*common, "--identity", str(identities / f"node-{index}.pem"), "--port", str(port),
                 *(arg for address in bootstrap for arg in ("--bootstrap", address)))
        return NodeProcess(settings.model, a, b, threads=settings.threads, extra_args=extra).start()

    console.print("starting 3 nodes")
    nodes = [start(i) for i in range(3)]
    for node in nodes:
        node.wait_ready(180)
    labels = [f"layers {a}:{b}" for a, b in spans]
    peaks = {label: 0.0 for label in labels}
    addresses = [n.address for n in nodes]
    client_config = ClientConfig(bootstrap=tuple(addresses), mdns=False, missing_wait=120.0, ban_seconds=1.0)
    model = DistributedModelForCausalLM.from_pretrained(str(settings.model), config=client_config)
    lock = threading.Lock()
    stop_at = time.monotonic() + settings.seconds
    started = time.monotonic()

    def client(index: int) -> None:
        rng = random.Random(settings.seed * 1000 + index)
        while time.monotonic() < stop_at:
            which = rng.randrange(len(prompts))
            ids = prompts[which]
            abandon = rng.random() < settings.abandon
            try:
                out = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=settings.new_tokens,
                    min_new_tokens=settings.new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                    streamer=_AbandonAfter(rng.randrange(1, settings.new_tokens)) if abandon else None)
            except Abandon:
                with lock:
                    result.abandoned += 1
                continue
            except Exception as error:  # counted and reported; the soak goes on
                with lock:
                    result.failed += 1
                    result.failures.append(f"{type(error).__name__}: {error}"[:300])
                continue
            tokens = out[0, ids.shape[1]:].tolist()
            with lock:
                result.completed += 1
                result.tokens += len(tokens)
                result.wrong += tokens != answers[which]

    failovers = _FailoverCounter()
    logging.getLogger("client.session").addHandler(failovers)
    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(settings.clients)]
    for worker in workers:
        worker.start()
    restarted = False
    try:
        while any(w.is_alive() for w in workers):
            for label, node in zip(labels, nodes):
                if node.process is not None and node.process.poll() is None:
                    try:
                        peaks[label] = max(peaks[label], rss_mb(node.process.pid))
                    except (OSError, RuntimeError):
                        pass
            if not restarted and time.monotonic() - started > settings.restart_at * settings.seconds:
                restarted = True
                victim = 1
                port = int(addresses[victim].rsplit(":", 1)[1])
                console.print(f"killing the node serving {labels[victim]} (SIGKILL) and starting it again")
                killed_at = time.monotonic()
                nodes[victim].kill()
                time.sleep(1.0)
                others = tuple(a for i, a in enumerate(addresses) if i != victim)
                nodes[victim] = start(victim, port, others)
                nodes[victim].wait_ready(180)
                result.restart_seconds = time.monotonic() - killed_at
            time.sleep(0.5)
        result.elapsed = time.monotonic() - started
        result.failovers = failovers.count
        if settings.chaos_seconds > 0:
            console.print(f"chaos phase: random cancels and killed client processes for {settings.chaos_seconds:g} s")
            result.chaos = _chaos(model, prompts, answers, addresses, settings)
        model.close()
        time.sleep(3.0)  # streams closed by the client end on the nodes
        result.cache_budget = CACHE_TOKENS
        for label, node in zip(labels, nodes):
            result.reserved_after[label] = CACHE_TOKENS - _free_cache_tokens(node.address)
        result.peak_rss_mb = peaks
    finally:
        logging.getLogger("client.session").removeHandler(failovers)
        model.close()
        for node in nodes:
            node.stop()
    return result


# a client process that generates until it is killed (its argv: model, peers, prompt ids)
_DOOMED_CLIENT = """
import sys, torch
from client import ClientConfig, DistributedModelForCausalLM
model = DistributedModelForCausalLM.from_pretrained(sys.argv[1], peers=sys.argv[2].split(","))
ids = torch.tensor([[int(t) for t in sys.argv[3].split(",")]])
print("ready", flush=True)
while True:
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False)
"""


def _chaos(model, prompts, answers, addresses: list[str], settings: SoakSettings) -> ChaosResult:
    """Steady clients (half the threads) answer exactly while the other half cancel at a random token and
    `chaos_killers` client processes are SIGKILLed at random moments of their generations."""
    chaos = ChaosResult()
    lock = threading.Lock()
    stop_at = time.monotonic() + settings.chaos_seconds
    started = time.monotonic()

    def steady(index: int, cancels: bool) -> None:
        rng = random.Random(settings.seed * 7919 + index)
        while time.monotonic() < stop_at:
            which = rng.randrange(len(prompts))
            ids = prompts[which]
            streamer = _AbandonAfter(rng.randrange(1, settings.new_tokens)) if cancels else None
            try:
                out = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=settings.new_tokens,
                    min_new_tokens=settings.new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                    streamer=streamer)
            except Abandon:
                with lock:
                    chaos.cancelled += 1
                continue
            except Exception as error:  # counted and reported; the phase goes on
                with lock:
                    chaos.failed += 1
                    chaos.failures.append(f"{type(error).__name__}: {error}"[:300])
                continue
            with lock:
                chaos.completed += 1
                chaos.wrong += out[0, ids.shape[1]:].tolist() != answers[which]

    def killer(index: int) -> None:
        rng = random.Random(settings.seed * 104729 + index)
        while time.monotonic() < stop_at:
            ids = prompts[rng.randrange(len(prompts))][0].tolist()
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _DOOMED_CLIENT,
                    str(settings.model),
                    ",".join(addresses),
                    ",".join(map(str, ids)),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            try:
                if process.stdout.readline().strip() == "ready":
                    time.sleep(rng.uniform(0.3, 2.0))  # somewhere in its generations
                    with lock:
                        chaos.killed += 1
            finally:
                process.kill()
                process.wait()

    half = max(settings.clients // 2, 1)
    workers = [threading.Thread(target=steady, args=(i, i >= half), daemon=True) for i in range(settings.clients)]
    workers += [threading.Thread(target=killer, args=(i,), daemon=True) for i in range(settings.chaos_killers)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(max(stop_at - time.monotonic(), 0) + 60)
    chaos.stranded = sum(worker.is_alive() for worker in workers)
    chaos.seconds = time.monotonic() - started
    return chaos


def render_markdown(result: SoakResult) -> str:
    s = result.settings
    lines = [
        "## Soak: concurrent clients, disconnects and a node restart",
        "",
        f"Command: `{s.command}`",
        "",
        f"{s.model.name}, 3 node processes on loopback, {s.clients} client threads for {result.elapsed:.0f} s, each "
        f"request a greedy {s.new_tokens}-token answer to one of {s.prompts} prompts whose answers transformers "
        f"computed first; {s.abandon:.0%} of requests abandoned part-way (the client closes its session); "
        f"the middle node SIGKILLed and restarted on the same address at {s.restart_at:.0%} of the run "
        f"(back after {result.restart_seconds:.1f} s).",
        "",
        "| requests completed | abandoned on purpose | failed | wrong answers | new tokens | session failovers |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {result.completed} | {result.abandoned} | {result.failed} | **{result.wrong}** | {result.tokens} | "
        f"{result.failovers} |",
        "",
        "| node | peak RSS (MB, over its processes) | cache tokens reserved after the soak |",
        "|---|---:|---:|",
    ]
    for label, peak in result.peak_rss_mb.items():
        lines.append(f"| {label} | {peak:.0f} | {result.reserved_after.get(label, -1)} |")
    if result.failures:
        lines += ["", "Failures (first 5):", ""] + [f"- `{f}`" for f in result.failures[:5]]
    if result.chaos is not None:
        c = result.chaos
        lines += [
            "",
            f"Then {c.seconds:.0f} s of random cancels and disconnects under load: "
            f"{s.clients - max(s.clients // 2, 1)} "
            f"steady client threads answering exactly, {max(s.clients // 2, 1)} that abandon each request at a random "
            f"token, and {s.chaos_killers} client processes at a time SIGKILLed at a random moment of their "
            f"generation (their streams end while their steps wait in, or run through, the nodes' passes). A steady "
            f"request counts as stranded if it is still unanswered 60 s after the phase.",
            "",
            "| steady requests completed | wrong answers | stranded | cancelled at random | client processes killed "
            "| failed |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {c.completed} | **{c.wrong}** | **{c.stranded}** | {c.cancelled} | {c.killed} | {c.failed} |",
        ]
        if c.failures:
            lines += ["", "Failures (first 5):", ""] + [f"- `{f}`" for f in c.failures[:5]]
    return "\n".join(lines) + "\n"


def add_soak_bench_parser(commands) -> None:
    from node.bench.basic import add_output_args

    bench = commands.add_parser("bench-soak", help="soak a 3-node swarm: concurrent clients, disconnects, a restart")
    bench.add_argument("--model", required=True, help="model folder (config.json + safetensors)")
    bench.add_argument("--clients", type=int, default=16, help="client threads (default 16)")
    bench.add_argument("--seconds", type=float, default=300.0, help="how long (default 300)")
    bench.add_argument("--new-tokens", type=int, default=12, help="tokens per answer (default 12)")
    bench.add_argument("--threads", type=int, default=0, help="torch threads per node (default: all cores)")
    bench.add_argument(
        "--chaos-seconds",
        type=float,
        default=60.0,
        help="then random cancels and killed client processes under load for this long (default 60; 0: off)",
    )
    add_output_args(bench)


def run_soak_bench_cli(args: argparse.Namespace) -> None:
    from node.bench.basic import local_model_folder, publish

    model = local_model_folder(args.model, "bench-soak")
    if args.clients < 1 or args.seconds <= 0 or args.new_tokens < 2:
        raise ValueError("need --clients >= 1, --seconds > 0 and --new-tokens >= 2")
    settings = SoakSettings(model=model, clients=args.clients, seconds=args.seconds, new_tokens=args.new_tokens,
                            threads=args.threads, chaos_seconds=args.chaos_seconds,
                            command=shlex.join(["potluck", *sys.argv[1:]]))
    section = render_markdown(run_soak(settings))
    publish(section, args.out, MARK_START, MARK_END)
