"""`potluck bench-swarm`: what swarm membership costs, in one run of about a minute.

1. Join: real `potluck join` processes, timed from process start to the ready line and to a
   client's Gossip pull showing the record ONLINE; a probe process times the same steps
   (imports, span load, throughput measurement) one by one to say where the time goes.
2. Discovery: in-process nodes (heartbeat 1 s); a new node joins an existing swarm through
   mDNS only, then through gossip only; each existing node's registry is polled until it
   lists the newcomer (JOINING, then ONLINE), and again after it leaves.
3. Gossip traffic at scale: `--nodes N --json` runs the anti-entropy simulation instead
   (node/bench/gossip_sim.py: N real `Membership` objects in simulated time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

MARK_START = "<!-- bench:swarm:start -->"
MARK_END = "<!-- bench:swarm:end -->"
POLL_S = 0.02              # how often a registry or a node's Gossip RPC is polled
DISCOVERY_TIMEOUT = 20.0   # give up on one discovery trial after this many seconds


@dataclass(frozen=True)
class SwarmBenchSettings:
    model: Path | None = None       # a real model folder to time joins on too (None: only the tiny LLaMA)
    nodes: int = 3                  # existing nodes the newcomer must reach (discovery part)
    runs: int = 3                   # join runs per model and discovery trials per mode; medians reported
    out: Path | None = None         # markdown file whose bench:swarm section is (re)written
    command: str = ""               # the command line, quoted in the report

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.runs < 1:
            raise ValueError("--nodes and --runs must be at least 1")
        if self.out is not None and (self.out.is_dir() or not self.out.parent.is_dir()):
            raise ValueError(f"--out {self.out}: give a markdown file in an existing folder")


def verify_cost(samples: int = 300) -> float:
    """Seconds to check one signed record (ed25519 + msgpack + validation), as every receiver does."""
    from common.swarm.identity import ephemeral_identity
    from common.swarm.records import PeerRecord, renewed, sign_record, verify_record

    identity = ephemeral_identity()
    record = renewed(PeerRecord(node_id=identity.node_id, addresses=("10.0.0.1:31337",), model_id="m",
                                config_hash="0" * 16, num_layers=30, start=0, end=10), 60)
    signed = sign_record(record, identity.key)
    started = time.perf_counter()
    for _ in range(samples):
        verify_record(signed)
    return (time.perf_counter() - started) / samples


# -- 1. join: process start -> ONLINE ---------------------------------------------------------------
@dataclass
class JoinRun:
    port: float      # gRPC server answering
    joining: float   # own record (JOINING) visible to a client
    online: float    # record ONLINE visible to a client
    ready: float     # ready line printed


@dataclass
class JoinResult:
    label: str
    span: tuple[int, int]
    runs: list[JoinRun]
    phases: dict[str, float]  # from a probe process: interpreter, imports, open + load, throughput

    def median(self, name: str) -> float:
        return statistics.median(getattr(run, name) for run in self.runs)


PROBE = """
import json, sys, time
marks = {"started": time.time()}
import node.server  # everything a node imports: torch, transformers, grpc, zeroconf
marks["imported"] = time.time()
import torch
from node.model.loader import ModelFiles, load_span
from node.runtime.throughput import measure
files = ModelFiles.open(sys.argv[1])
files.config()
span, _ = load_span(files, int(sys.argv[2]), int(sys.argv[3]), torch.device("cpu"), torch.float32)
marks["loaded"] = time.time()
measure(span)
marks["measured"] = time.time()
print(json.dumps(marks))
"""


def probe_phases(model: Path, span: tuple[int, int]) -> dict[str, float]:
    """Seconds of each start-up step, taken one by one in a fresh process like a node's."""
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}  # as NodeProcess runs nodes: busy-waiting skews the timing
    launched = time.time()
    done = subprocess.run([sys.executable, "-c", PROBE, str(model), str(span[0]), str(span[1])],
                          capture_output=True, text=True, timeout=300, check=True, env=env)
    marks = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "interpreter start": marks["started"] - launched,
        "imports (torch, transformers, grpc)": marks["imported"] - marks["started"],
        "open model + load span": marks["loaded"] - marks["imported"],
        "throughput measurement (first join only)": marks["measured"] - marks["loaded"],
    }


async def _watch_join(address: str, started: float, timeout: float) -> dict[str, float]:
    """Poll `address` with Gossip pulls (as a client would) until its own record shows ONLINE."""
    import grpc

    from common.swarm.records import Registry
    from common.wire import codec
    from common.wire.generated import potluck_pb2 as pb
    from common.wire.generated import potluck_pb2_grpc as pb_grpc

    seen: dict[str, float] = {}
    channel = None
    try:
        while "ONLINE" not in seen:
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{address} not ONLINE after {timeout:.0f}s")
            channel = channel or grpc.aio.insecure_channel(address)
            try:
                reply = await pb_grpc.PotluckStub(channel).Gossip(pb.GossipRequest(), timeout=2.0)
            except grpc.aio.AioRpcError:
                await channel.close()  # a fresh channel next time: no reconnect back-off
                channel = None
                await asyncio.sleep(POLL_S)
                continue
            now = time.monotonic() - started
            seen.setdefault("port", now)
            registry = Registry()
            registry.offer_many(codec.decode_records(reply.records))
            for record in registry.live():
                if address in record.addresses:
                    seen.setdefault(record.state.value, now)
            await asyncio.sleep(POLL_S)
    finally:
        if channel is not None:
            await channel.close()
    seen.setdefault("JOINING", seen["ONLINE"])
    return seen


async def _one_join(model: Path, span: tuple[int, int], home: Path) -> JoinRun:
    from node.bench.chains import free_port
    from node.launcher import NodeProcess

    port = free_port()
    node = NodeProcess(model, *span, extra_args=("--port", str(port), "--no-mdns", "--identity",
                                                 str(home / "identity.pem")), env={"HOME": str(home)})
    started = time.monotonic()
    node.start()
    try:
        async def ready() -> float:
            await asyncio.to_thread(node.wait_ready, 120.0)
            return time.monotonic() - started

        seen, ready_at = await asyncio.gather(_watch_join(f"127.0.0.1:{port}", started, 120.0), ready())
    finally:
        node.stop()
    return JoinRun(port=seen["port"], joining=seen["JOINING"], online=seen["ONLINE"], ready=ready_at)


def measure_join(label: str, model: Path, span: tuple[int, int], runs: int, tick) -> JoinResult:
    """`runs` cold joins (a fresh HOME each: new identity, no cached throughput), each followed by a probe."""
    results, probes = [], []
    for index in range(runs):
        with tempfile.TemporaryDirectory(prefix="potluck-home-") as home:
            results.append(asyncio.run(_one_join(model, span, Path(home))))
        probes.append(probe_phases(model, span))
        tick(f"join {label}: run {index + 1}/{runs} ONLINE after {results[-1].online:.2f}s")
    return JoinResult(label, span, results, {name: statistics.median(p[name] for p in probes) for name in probes[0]})


# -- 2. discovery: a newcomer seen by every existing node ------------------------------------------
@dataclass
class DiscoveryTrial:
    start_node_s: float            # the newcomer's start_node() call -> returned (ONLINE published)
    all_listed: float              # start_node() call -> every existing node lists the newcomer (any state)
    all_online: float              # start_node() call -> every existing node lists it ONLINE
    all_gone: float                # its stop() call (leave) -> no existing node lists it


async def _until(predicate, timeout: float = DISCOVERY_TIMEOUT) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError("the swarm did not converge in time")
        await asyncio.sleep(POLL_S)
    return time.monotonic()


def _state_of(node, node_id: str):
    return next((r.state for r in node.membership.live() if r.node_id == node_id), None)


async def _discovery(model: Path, mode: str, existing: int, trials: int, folder: Path) -> list[DiscoveryTrial]:
    from common.swarm.identity import load_identity
    from common.swarm.records import NodeState
    from common.weights.files import ModelFiles
    from node.config import NodeConfig
    from node.server import start_node

    layers = ModelFiles.open(str(model)).config().num_hidden_layers
    count = iter(range(10**6))

    def config(bootstrap: tuple[str, ...] = (), start: int = 0, end: int = 1) -> NodeConfig:
        return NodeConfig(model=str(model), start=start, end=end, identity=str(folder / f"{mode}-{next(count)}.pem"),
                          bootstrap=bootstrap if mode == "gossip" else (), mdns=mode == "mdns",
                          mdns_interface="127.0.0.1", heartbeat=1.0, ttl=15.0, throughput=100.0, rebalance=False)

    spans = [(i % layers, i % layers + 1) for i in range(existing)]  # any spans do: only membership is timed
    first = await start_node(config(start=spans[0][0], end=spans[0][1]))
    olds = [first]
    try:
        for a, b in spans[1:]:
            olds.append(await start_node(config((first.address,), a, b)))
        ids = [n.identity.node_id for n in olds]
        await _until(lambda: all(_state_of(n, i) == NodeState.ONLINE for n in olds for i in ids))
        results = []
        for _ in range(trials):
            cfg = config((first.address,), 0, layers)
            identity = load_identity(cfg.identity)  # created now so that we know the newcomer's id
            new_id = identity.node_id
            identity.release()
            started = time.monotonic()
            polls = [asyncio.ensure_future(_until(lambda: all(_state_of(n, new_id) for n in olds))),
                     asyncio.ensure_future(_until(lambda: all(_state_of(n, new_id) == NodeState.ONLINE for n in olds)))]
            try:
                new = await start_node(cfg)
                returned = time.monotonic()
                listed, online = await asyncio.gather(*polls)
            finally:
                for poll in polls:
                    poll.cancel()
            stopping = time.monotonic()
            await new.stop(0.2)
            gone = await _until(lambda: not any(_state_of(n, new_id) for n in olds))
            results.append(DiscoveryTrial(returned - started, listed - started, online - started, gone - stopping))
        return results
    finally:
        for node in olds:
            await node.stop(0.2)


# -- the whole bench --------------------------------------------------------------------------------
@dataclass
class SwarmBenchResult:
    settings: SwarmBenchSettings
    joins: list[JoinResult]
    discovery: dict[str, list[DiscoveryTrial]]
    verify_s: float
    machine: dict[str, str]
    seconds: float = 0.0
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def build_tiny_llama(folder: Path) -> Path:
    """A random 6-layer LLaMA small enough that loading it costs nothing."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


def run_swarm_bench(settings: SwarmBenchSettings, console: Console | None = None) -> SwarmBenchResult:
    """Join timings, discovery timings, simulated gossip traffic; every node is stopped at the end."""
    from common.weights.files import ModelFiles
    from node.bench.basic import machine_info

    console = console or Console(stderr=True)
    began = time.monotonic()
    machine = machine_info(0)

    def tick(message: str) -> None:
        console.log(message)

    with tempfile.TemporaryDirectory(prefix="potluck-bench-swarm-") as scratch:
        scratch = Path(scratch)
        tiny = build_tiny_llama(scratch / "tiny-llama")
        joins = [measure_join("tiny LLaMA", tiny, (0, 6), settings.runs, tick)]
        if settings.model is not None:  # its first third of the layers, e.g. 0:10 of SmolLM2's 30
            layers = ModelFiles.open(str(settings.model)).config().num_hidden_layers
            joins.append(
                measure_join(settings.model.name, settings.model, (0, max(1, layers // 3)), settings.runs, tick)
            )
        discovery = {}
        for mode in ("mdns", "gossip"):
            discovery[mode] = asyncio.run(_discovery(tiny, mode, settings.nodes, settings.runs, scratch))
            tick(f"discovery via {mode}: seen ONLINE by all after "
                 f"{statistics.median(t.all_online for t in discovery[mode]) * 1000:.0f} ms")
    return SwarmBenchResult(settings, joins, discovery, verify_cost(), machine,
                            seconds=time.monotonic() - began)


# -- reporting --------------------------------------------------------------------------------------
def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def render_markdown(result: SwarmBenchResult) -> str:
    s, m = result.settings, result.machine
    lines = [
        "## Swarm membership: join, discovery, gossip traffic",
        "",
        f"- date: {result.date}; the whole bench took {result.seconds:.0f} s",
        f"- machine: {m['cpu']}; {m['os']}; Python {m['python']}, torch {m['torch']}, transformers "
        f"{m['transformers']}; "
        f"load average {m['load']} at start",
        f"- command: `{s.command or 'potluck bench-swarm'}`",
        "",
    ]
    traffic = ["### Gossip traffic", "",
               "Measured by the anti-entropy simulation: `potluck bench-swarm --nodes N --json` "
               "(node/bench/gossip_sim.py, its own section below).", ""]
    return "\n".join(lines + _join_lines(result) + _discovery_lines(result) + traffic)


def _join_lines(result: SwarmBenchResult) -> list[str]:
    joins = result.joins
    lines = [
        "### Time from `potluck join` to ONLINE",
        "",
        "Real `potluck join --blocks A:B --no-mdns` processes on loopback, each with a fresh HOME (new identity, "
        f"no cached throughput, as on a first join); median of {result.settings.runs} run(s), seconds from process "
        "start. A client polls the node's Gossip RPC every 20 ms and verifies the records it gets back.",
        "",
        "| model, span | gRPC port answers | own record visible (JOINING) | record ONLINE visible | ready line "
        "printed |",
        "|---|---:|---:|---:|---:|",
    ]
    for join in joins:
        lines.append(f"| {join.label}, {join.span[0]}:{join.span[1]} | {join.median('port'):.2f} | "
                     f"{join.median('joining'):.2f} | {join.median('online'):.2f} | {join.median('ready'):.2f} |")
    lines += ["", "Where the time goes: the same steps taken one by one in a fresh probe process (median of as many "
              "runs), seconds; the rest is the join's ONLINE time minus these, so it carries the noise of both:", "",
              "| step | " + " | ".join(j.label for j in joins) + " |", "|---|" + "---:|" * len(joins)]
    for name in joins[0].phases:
        lines.append(f"| {name} | " + " | ".join(f"{j.phases[name]:.2f}" for j in joins) + " |")
    lines.append("| rest: CLI, identity, gRPC server, publish, executor (ONLINE visible minus the above) | "
                 + " | ".join(f"{j.median('online') - sum(j.phases.values()):.2f}" for j in joins) + " |")
    imports = max(joins, key=lambda j: j.median("online"))
    share = imports.phases["imports (torch, transformers, grpc)"] / imports.median("online")
    lines += [
        "",
        f"Importing the libraries is {share:.0%} of a join ({imports.label}); loading and measuring a small span "
        "are a fraction of a second. The record is ONLINE for a client as soon as the ready line is printed "
        "(it is published first). Not included above: an auto-placed node (`--num-blocks`, or no `--blocks`) with "
        "mDNS on listens 1.5 s (`discovery_wait`) before choosing its span; mDNS adds about a second more (see "
        "below); a node whose throughput is cached (`~/.cache/potluck/throughput.json`, same span and threads) or "
        "given with `--throughput` skips the measurement.",
        "",
    ]
    return lines


def _discovery_lines(result: SwarmBenchResult) -> list[str]:
    from common.swarm.membership import SwarmConfig

    s = result.settings
    lines = [
        f"### A new node seen by {s.nodes} existing nodes",
        "",
        f"In-process nodes on the tiny model (heartbeat 1 s, TTL 15 s, loopback); a newcomer joins {s.runs} time(s) "
        "per mode; ms from the newcomer's `start_node()` call (from its `stop()` for the last column), median (max in "
        "brackets). mDNS only: `--mdns-interface 127.0.0.1`, no bootstrap. Gossip only: `--no-mdns`, everyone "
        "bootstraps to the first node. Each existing node's `membership.live()` is polled every 20 ms.",
        "",
        "| discovery | newcomer ONLINE (start_node returns) | listed by all | ONLINE for all | gone from all "
        "after it leaves |",
        "|---|---:|---:|---:|---:|",
    ]
    medians = {}
    for mode, trials in result.discovery.items():
        cells = []
        for name in ("start_node_s", "all_listed", "all_online", "all_gone"):
            values = [getattr(t, name) for t in trials]
            medians[mode, name] = statistics.median(values)
            cells.append(f"{_ms(medians[mode, name])} ({_ms(max(values))})")
        lines.append(f"| {'mDNS only' if mode == 'mdns' else 'gossip only'} | " + " | ".join(cells) + " |")
    if ("mdns", "start_node_s") in medians and ("gossip", "start_node_s") in medians:
        extra = medians["mdns", "start_node_s"] - medians["gossip", "start_node_s"]
        lines += [
            "",
            "Through gossip the newcomer pulls the registry from its bootstrap node, then pushes its record to it and "
            f"to up to {SwarmConfig().fanout} random peers it now knows, so a small swarm lists it within one "
            "exchange. Through "
            f"mDNS its start takes {_ms(extra)} ms longer: `publish()` awaits zeroconf's service registration "
            "(probing) "
            "before pushing the record and before loading the span; the others pull the record when their browser "
            "resolves the service. The ONLINE record is pushed to up to that many peers the newcomer knows (on a "
            "shared LAN some may be other swarms' nodes); the rest hear it in their next exchange. Leaving "
            "pushes an OFFLINE record to every known peer at once. A node that crashes "
            "without leaving stays listed until its record expires (TTL, 15 s by default).",
        ]
    return lines + [""]


def write_section(path: Path, section: str) -> None:
    from node.bench.basic import write_section as write_marked

    write_marked(path, section, MARK_START, MARK_END)


def placement_figures(seed: int = 0, peers: int = 5000) -> dict:
    """The placement and routing figures of one `--json` run (node/bench/placement_sim.py): route planning
    over `peers` peers, and the replica spread after 100 simultaneous joins into a balanced and an empty swarm."""
    from node.bench.placement_sim import SimConfig, route_plan_ms, simulate

    balanced = simulate(SimConfig(joiners=100, existing=100, seed=seed))
    empty = simulate(SimConfig(joiners=100, existing=0, seed=seed))
    return {"route_plan_ms": route_plan_ms(peers), "route_plan_cpu_ms": route_plan_ms(peers, clock=time.process_time),
            "route_plan_peers": peers, "herd_max_over_ideal": balanced.herd_max_over_ideal,
            "herd_max_over_ideal_empty": empty.herd_max_over_ideal,
            "reloads_per_node": max(balanced.reloads_per_node, empty.reloads_per_node),
            "covered_s": max(balanced.covered_s, empty.covered_s)}


def add_swarm_bench_parser(commands) -> None:
    from node.bench.gossip_sim import SimSettings

    bench = commands.add_parser("bench-swarm", help="benchmark joining, discovery and gossip traffic")
    bench.add_argument("--model", default=None,
                       help="a model folder to time joins on too (default: only a tiny random LLaMA built on the fly)")
    bench.add_argument("--nodes", type=int, default=3,
                       help="existing nodes a newcomer must reach (default 3); with --json: the simulated swarm's size")
    bench.add_argument("--json", action="store_true",
                       help="simulate a gossip swarm of --nodes nodes in simulated time (node/bench/gossip_sim.py) and "
                            "print one JSON object per run")
    bench.add_argument("--runs", type=int, default=3, help="joins per model and trials per discovery mode (default 3)")
    bench.add_argument("--window", type=float, default=SimSettings.window,
                       help=f"with --json: simulated seconds of churn measured (default {SimSettings.window:g})")
    bench.add_argument("--models", type=int, default=SimSettings.models,
                       help=f"with --json: models the nodes serve (default {SimSettings.models}: shares 50/30/20 %%; "
                            "more: equal shares)")
    bench.add_argument("--no-partition", dest="partition", action="store_false",
                       help="with --json: skip the partition and its healing (the run's longest part), "
                            "to measure cost per node at sizes where the whole run would take hours")
    bench.add_argument("--out", default=None, help="markdown file to write the results into (default: print only)")
    bench.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run_swarm_bench_cli(args: argparse.Namespace) -> None:
    if args.json:
        from node.bench.gossip_sim import SimSettings, simulate_swarm

        if args.nodes < 2 or args.runs < 1 or args.window < SimSettings.churn_every or not 1 <= args.models <= 1000:
            raise ValueError(f"--json needs --nodes of at least 2, --runs of at least 1, --window of at least "
                             f"{SimSettings.churn_every:g} s and --models from 1 to 1000")
        if args.nodes < args.models:
            raise ValueError(f"--nodes {args.nodes}: fewer nodes than --models {args.models}")
        for run in range(args.runs):
            result = simulate_swarm(SimSettings(nodes=args.nodes, seed=run, window=args.window, models=args.models,
                                                partition=args.partition))
            result.update(placement_figures(seed=run))
            print(json.dumps(result), flush=True)
        return
    model = Path(args.model).expanduser() if args.model else None
    if model is not None and not model.is_dir():
        raise ValueError(f"--model {args.model}: not a folder (bench-swarm needs a local model folder)")
    settings = SwarmBenchSettings(model=model, nodes=args.nodes, runs=args.runs,
                                  out=Path(args.out) if args.out else None,
                                  command=shlex.join(["potluck", *sys.argv[1:]]))
    section = render_markdown(run_swarm_bench(settings))
    if settings.out is not None:
        write_section(settings.out, section)
        Console(stderr=True).print(f"wrote {settings.out}")
    print(section)
