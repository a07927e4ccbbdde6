"""A pure simulation of placement at scale, and `potluck bench-placement`.

Nodes join with random delays inside a window; each joiner sees the swarm as gossip showed it
`gossip_delay` seconds before its own join (with a delay of the whole window, nobody sees any other
joiner: the worst case of a join wave). A node loads its span for `load_s` seconds (JOINING), then
serves it (ONLINE) and checks every `rebalance_period` seconds (jittered) whether to move
(common/swarm/placement.plan_move), on the same stale view. A move is a weight reload: the old span
stops being served at once and the new one after `load_s`. No sockets, no clock: events in a heap."""

from __future__ import annotations

import argparse
import heapq
import json
import random
import shlex
import statistics
import sys
import time
from bisect import bisect_right
from dataclasses import asdict, dataclass

from common.swarm.placement import Server, choose_span, plan_move

MARK_START = "<!-- bench:placement:start -->"
MARK_END = "<!-- bench:placement:end -->"


@dataclass(frozen=True)
class SimConfig:
    num_layers: int = 30
    length: int = 8              # layers per node
    existing: int = 0            # nodes serving before the wave (placed one by one, each seeing the others)
    joiners: int = 100           # nodes of the wave
    join_window: float = 1.0     # the wave's joins are uniform over this many seconds
    gossip_delay: float = 1.0    # a node sees records published at least this long ago
    load_s: float = 5.0          # seconds to load a span's weights
    rebalance_period: float = 30.0  # mean seconds between a node's rebalancing checks (x0.5 to x1.5)
    horizon_s: float = 900.0     # simulated seconds
    spread: bool = True          # random near-best windows (False: always the single best window)
    seed: int = 0


@dataclass(frozen=True)
class SimResult:
    herd_max_over_ideal: float   # replicas of the most-replicated layer / the mean, at the end
    peak_herd_max_over_ideal: float  # the same, the worst seen once the wave's first loads finished
    reloads_per_node: float      # moves (weight reloads after the first load) per node
    covered_s: float             # seconds from the wave's start until every layer stays served (inf: never)
    moves: int
    nodes: int


def replicas(spans: list[tuple[int, int]], num_layers: int) -> list[int]:
    counts = [0] * num_layers
    for start, end in spans:
        for layer in range(start, end):
            counts[layer] += 1
    return counts


def herd_max_over_ideal(spans: list[tuple[int, int]], num_layers: int) -> float:
    """How many times the ideal (total layers served / model layers) the most-replicated layer holds."""
    counts = replicas(spans, num_layers)
    ideal = sum(counts) / num_layers
    return max(counts) / ideal if ideal else 0.0


class _Swarm:
    """Every node's published record versions (time, start, end, state), to read a view as of any time."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}
        self.versions: dict[str, list[tuple[int, int, str]]] = {}
        self.now: dict[str, tuple[int, int, str]] = {}  # the true state

    def publish(self, node: str, at: float, start: int, end: int, state: str) -> None:
        self.times.setdefault(node, []).append(at)
        self.versions.setdefault(node, []).append((start, end, state))
        self.now[node] = (start, end, state)

    def view(self, at: float, me: str) -> list[Server]:
        """The servers `me` knows of at `at` (its own record always current)."""
        servers = []
        for node, times in self.times.items():
            if node == me:
                start, end, _ = self.now[node]
            else:
                index = bisect_right(times, at) - 1
                if index < 0:
                    continue
                start, end, _ = self.versions[node][index]
            servers.append(Server(node, start, end, 1.0))
        return servers

    def online_spans(self) -> list[tuple[int, int]]:
        return [(start, end) for start, end, state in self.now.values() if state == "ONLINE"]


def simulate(config: SimConfig) -> SimResult:
    rng = random.Random(config.seed)
    pick = rng if config.spread else None
    swarm = _Swarm()
    events: list[tuple[float, int, str, str]] = []  # (time, tie, kind, node)
    tie = 0

    def push(at: float, kind: str, node: str) -> None:
        nonlocal tie
        tie += 1
        heapq.heappush(events, (at, tie, kind, node))

    for i in range(config.existing):
        node = f"e{i}"
        span = choose_span(swarm.view(float("-inf"), node), config.num_layers, config.length)
        swarm.publish(node, float("-inf"), span.start, span.end, "ONLINE")
        push(rng.uniform(0.0, config.rebalance_period), "check", node)
    for i in range(config.joiners):
        push(rng.uniform(0.0, config.join_window), "join", f"j{i}")
    moves, peak = 0, 0.0
    covered = lambda: min(replicas(swarm.online_spans(), config.num_layers)) > 0  # noqa: E731
    covered_since = 0.0 if covered() else None  # when every layer last became served (None: not now)
    loaded: set[str] = set()  # the wave's nodes that finished their first load
    while events:
        at, _, kind, node = heapq.heappop(events)
        if at > config.horizon_s:
            break
        if kind == "join":
            span = choose_span(swarm.view(at - config.gossip_delay, node), config.num_layers, config.length, pick)
            swarm.publish(node, at, span.start, span.end, "JOINING")
            push(at + config.load_s, "online", node)
        elif kind == "online":
            start, end, _ = swarm.now[node]
            swarm.publish(node, at, start, end, "ONLINE")
            push(at + config.rebalance_period * rng.uniform(0.5, 1.5), "check", node)
        elif kind == "check":
            target = plan_move(swarm.view(at - config.gossip_delay, node), node, config.num_layers, rng=pick)
            if target is None:
                push(at + config.rebalance_period * rng.uniform(0.5, 1.5), "check", node)
            else:
                moves += 1
                swarm.publish(node, at, target.start, target.end, "JOINING")
                push(at + config.load_s, "online", node)
        if kind != "check" or target is not None:  # only these change what is served
            if not covered():
                covered_since = None
            elif covered_since is None:
                covered_since = at
        if kind == "online" and node.startswith("j"):
            loaded.add(node)
        if kind == "online" and len(loaded) == config.joiners:
            peak = max(peak, herd_max_over_ideal(swarm.online_spans(), config.num_layers))
    spans = [(start, end) for start, end, _ in swarm.now.values()]
    nodes = config.existing + config.joiners
    covered_s = float("inf") if covered_since is None else max(covered_since, 0.0)
    return SimResult(
        herd_max_over_ideal=round(herd_max_over_ideal(spans, config.num_layers), 3),
        peak_herd_max_over_ideal=round(peak, 3), reloads_per_node=round(moves / max(nodes, 1), 3),
        covered_s=round(covered_s, 2), moves=moves, nodes=nodes,
    )


def route_plan_ms(peers: int, num_layers: int = 80, rounds: int = 5, seed: int = 0,
                  clock=time.perf_counter) -> float:
    """Median milliseconds of client.routing.plan_route over `peers` peers of random spans (4 to 16 layers),
    throughputs and loads, a seventh with measured RTTs: what a client pays per session open or re-route.
    (A benchmark may import the client; the runtime may not.)"""
    from client.routing import PeerInfo, plan_route

    rng = random.Random(seed)
    infos = []
    for i in range(peers):
        length = rng.randint(4, 16)
        start = max(0, min(rng.randint(-length + 1, num_layers - 1), num_layers - length))
        infos.append(PeerInfo(address=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:31330", start=start,
                              end=start + length, node_id=f"n{i}", throughput=rng.uniform(5.0, 50.0),
                              load=rng.choice([0.0, 0.0, 1.0])))
    rtts = {info.address: rng.uniform(0.001, 0.1) for info in infos[::7]}
    times = []
    for k in range(rounds):
        began = clock()
        plan_route(infos, num_layers, rtts=rtts, rng=random.Random(k), measured={})
        times.append((clock() - began) * 1000)
    return round(statistics.median(times), 2)


def run_placement_bench(joiners: int = 100, existing: int = 100, seed: int = 0, peers: int = 5000) -> dict:
    empty = simulate(SimConfig(joiners=joiners, existing=0, seed=seed))
    balanced = simulate(SimConfig(joiners=joiners, existing=existing, seed=seed))
    legacy = simulate(SimConfig(joiners=joiners, existing=0, seed=seed, spread=False, horizon_s=60.0))
    return {
        "herd_max_over_ideal": max(empty.herd_max_over_ideal, balanced.herd_max_over_ideal),
        "reloads_per_node": max(empty.reloads_per_node, balanced.reloads_per_node),
        "covered_s": max(empty.covered_s, balanced.covered_s),
        "route_plan_ms": route_plan_ms(peers),
        "route_plan_cpu_ms": route_plan_ms(peers, clock=time.process_time),  # this process's CPU time only
        "peers": peers, "existing": existing,
        "empty": asdict(empty), "balanced": asdict(balanced), "single_best_window_empty_60s": asdict(legacy),
    }


def render_markdown(result: dict, command: str) -> str:
    config = SimConfig()
    rows = [("into an empty swarm", result["empty"]),
            (f"into a balanced swarm of {result['existing']} nodes", result["balanced"]),
            ("into an empty swarm, always the single best window (60 s)", result["single_best_window_empty_60s"])]
    lines = [
        "## Placement at scale (simulated) and route planning",
        "",
        f"- command: `{command}`",
        f"- model of {config.num_layers} layers, {config.length} per node; joins uniform over "
        f"{config.join_window:.0f} s, "
        f"each seeing the swarm as of {config.gossip_delay:.0f} s before it joined; {config.load_s:.0f} s per load; "
        f"rebalancing checks every {config.rebalance_period:.0f} s (x0.5 to x1.5); {config.horizon_s:.0f} s "
        "simulated.",
        "",
        "| wave of 100 joins | most-replicated layer / ideal, end | worst after the first loads | reloads per node "
        "| every layer served from |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['herd_max_over_ideal']:.2f} | {r['peak_herd_max_over_ideal']:.2f} "
                     f"| {r['reloads_per_node']:.2f} | {r['covered_s']:.1f} s |")
    lines += ["", f"Route planning (`client.routing.plan_route`) over {result['peers']} peers of an 80-layer model: "
                  f"{result['route_plan_ms']:.1f} ms wall clock, {result['route_plan_cpu_ms']:.1f} ms of CPU time "
                  "(medians of 5; the wall clock includes waiting for a core on a shared 2-core machine)."]
    return "\n".join(lines) + "\n"


def add_placement_bench_parser(commands) -> None:
    from node.bench.basic import add_output_args

    bench = commands.add_parser("bench-placement",
                                help="simulate 100 nodes joining at once: herding, reloads, coverage; time routing")
    bench.add_argument("--joiners", type=int, default=100, help="nodes joining within one second (default 100)")
    bench.add_argument("--existing", type=int, default=100, help="nodes of the balanced swarm (default 100)")
    bench.add_argument("--peers", type=int, default=5000, help="peers for the route-planning timing (default 5000)")
    bench.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    add_output_args(bench)


def run_placement_bench_cli(args: argparse.Namespace) -> None:
    from node.bench.basic import publish

    for name in ("joiners", "existing", "peers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1")
    result = run_placement_bench(args.joiners, args.existing, args.seed, args.peers)
    if args.json:
        print(json.dumps(result, indent=2))
        if args.out is None:
            return
    publish(render_markdown(result, shlex.join(["potluck", *sys.argv[1:]])), args.out, MARK_START, MARK_END)
