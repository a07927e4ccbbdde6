"""`potluck bench-perf`: how fast the swarm is, against plain transformers, in one run.

Measured on the same model and machine, one after the other:

1. decode tokens/s: transformers `generate` in this process vs the swarm with 1, 2 and 3 node
   processes on loopback (push on), 3 nodes without push, and 3 nodes on transformers' own layers
   (`--no-lean`), all greedy on the same seeded prompt (tokens compared with transformers');
2. a simulated WAN: a latency proxy (`potluck proxy`, its own process) in front of every node, adding a fixed
   one-way delay per hop; tokens/s against the physical limit 1 / (compute + (hops + 1) x delay);
3. concurrency: N sessions generating at once through 3 nodes (one client thread each);
   aggregate tokens/s against one session;
4. prefill: a long prompt's time to the first token through 3 nodes vs one process;
5. memory: peak RSS of a node serving a third of the layers vs transformers holding the whole model.

Bytes per token per hop for each wire format are `potluck bench-wire`'s section."""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from common.weights.embedded import source_gguf
from node.bench.basic import (
    FirstTokenClock,
    all_at_once,
    greedy_exactly,
    machine_info,
    prompt_ids,
    timed_generate,
    write_section,
)
from node.bench.batch_compute import batch_compute
from node.bench.llamacpp import LlamaCpp, LlamaSide, side_by_side
from node.bench.perf_report import render_markdown, write_plot
from node.bench.perf_results import PerfResult, PerfSettings, Speed, WanResult

MARK_START = "<!-- bench:performance:start -->"
MARK_END = "<!-- bench:performance:end -->"


# -- measuring ------------------------------------------------------------------------------------
def decode_speed(label: str, model, ids: torch.Tensor, settings: PerfSettings, new_tokens: int | None = None,
                 repeats: int | None = None) -> Speed:
    timed_generate(model, ids[:, :4], 2)  # warm-up: allocations, thread pools, channels
    runs = [timed_generate(model, ids, new_tokens or settings.new_tokens) for _ in range(repeats or settings.repeats)]
    return Speed(label, [r.decode_tps for r in runs], runs[0].tokens)


def paired_speed(label: str, model, reference, ids: torch.Tensor, settings: PerfSettings) -> Speed:
    """Decode speed of `model`, each run right after a run of `reference` (plain transformers)."""
    timed_generate(model, ids[:, :4], 2)
    speed = Speed(label, [], [])
    for _ in range(settings.repeats):
        speed.reference_tps.append(timed_generate(reference, ids, settings.new_tokens).decode_tps)
        run = timed_generate(model, ids, settings.new_tokens)
        speed.decode_tps.append(run.decode_tps)
        speed.tokens = speed.tokens or run.tokens
    return speed


def paired_prefill(model, reference, ids: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median seconds to the first new token of `reference` (plain transformers) and of `model`, taking turns."""
    local, swarm = [], []
    for _ in range(repeats):
        local.append(timed_generate(reference, ids, 2).prefill_s)
        swarm.append(timed_generate(model, ids, 2).prefill_s)
    return statistics.median(local), statistics.median(swarm)


def steady_decode(generations: list[list[tuple[float, int]]]) -> float:
    """Tokens/s of all `generations` (each its `Run.arrivals`) together while every one of them decodes: the
    tokens that came after the last one's first token and up to the first one's last token, over that window
    (one generation: its decode speed). Prompts and session opening stay out, as in a decode speed; 0.0 if
    the windows do not overlap."""
    start, stop = max(g[0][0] for g in generations), min(g[-1][0] for g in generations)
    if stop <= start:
        return 0.0
    return sum(count for g in generations for at, count in g if start < at <= stop) / (stop - start)


def concurrent_speed(model, config, sessions: int, new_tokens: int, seed: int) -> tuple[float, float]:
    """`sessions` generations at once (one client thread each): (all their new tokens / wall time, tokens/s while
    every one of them decodes)."""
    prompts = session_prompts(config, sessions, seed)
    elapsed, runs = all_at_once([partial(timed_generate, model, ids, new_tokens) for ids in prompts])
    return sessions * new_tokens / elapsed, steady_decode([run.arrivals for run in runs])


def session_prompts(config, sessions: int, seed: int) -> list[torch.Tensor]:
    """The 16-token prompts of a concurrency round: `concurrent_speed`'s and `batched_speed`'s."""
    return [prompt_ids(config, 16, seed + 100 + i) for i in range(sessions)]


def batched_speed(model, config, sequences: int, new_tokens: int, seed: int) -> tuple[float, float, list[list[int]]]:
    """One generate call over `sequences` prompts at once (a batch of that many rows in one session, as
    llama-batched-bench decodes N sequences in one context): (all new tokens / wall time, tokens/s from the first
    new tokens to the last, each row's new tokens)."""
    ids = torch.cat(session_prompts(config, sequences, seed))
    clock = FirstTokenClock()
    started = time.perf_counter()
    output = greedy_exactly(model, ids, new_tokens, clock)
    elapsed = time.perf_counter() - started
    rows = output[:, ids.shape[1]:].tolist()
    if any(len(row) != new_tokens for row in rows):
        raise RuntimeError(f"a batch of {sequences} returned rows of {[len(r) for r in rows]} tokens, not {new_tokens}")
    return sequences * new_tokens / elapsed, steady_decode([clock.arrivals]), rows


def reference_tokens(local_model, config, sequences: int, new_tokens: int, seed: int) -> list[list[int]]:
    """Plain transformers' greedy tokens for each prompt of a round, alone (the check of `batched_speed`'s rows)."""
    return [timed_generate(local_model, ids, new_tokens).tokens for ids in session_prompts(config, sequences, seed)]


def _median_sessions(sessions: int, runs: list[tuple[float, int, int, float]]) -> tuple[int, float, float, float]:
    """(sessions, median aggregate tok/s, steps per pass over all runs, median tok/s while all decode) from runs of
    (aggregate, passes, steps, steady)."""
    passes, steps = sum(run[1] for run in runs), sum(run[2] for run in runs)
    return (sessions, statistics.median(run[0] for run in runs), steps / passes if passes else 0.0,
            statistics.median(run[3] for run in runs))


def rss_mb(pid: int, field: str = "VmHWM") -> float:
    """A process's peak (VmHWM) or current (VmRSS) resident memory, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for process {pid}")


WHOLE_MODEL_PROBE = """
import sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
torch.set_num_threads({threads})
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.randint(3, model.config.vocab_size, (1, 32))
model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]) / 1024)
"""


def whole_model_rss_mb(model: Path, threads: int) -> float:
    """Peak RSS of a fresh process that loads the whole model with transformers and generates a little."""
    out = subprocess.run([sys.executable, "-c", WHOLE_MODEL_PROBE.format(threads=threads), str(model)],
                         capture_output=True, text=True, check=True, timeout=600)
    return float(out.stdout.strip().splitlines()[-1])


class ProxyProcess:
    """`potluck proxy` in its own process: its event loop does not share this process's GIL with the client."""

    def __init__(self, target: str, delay_ms: float):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "node", "proxy", "--target", target, "--delay-ms", str(delay_ms)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.process.stdout.readline()
        if "listening on " not in line:
            self.stop()
            raise RuntimeError(f"the latency proxy did not start: {line.strip()!r}")
        self.address = line.split("listening on ", 1)[1].split()[0].rstrip(",")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def node_metadata(address: str) -> dict:
    """A node's Info metadata (its lean runtime's counters and layout)."""
    import grpc

    from common.wire import codec
    from common.wire.generated import potluck_pb2 as pb
    from common.wire.generated import potluck_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        info = pb_grpc.PotluckStub(channel).Info(pb.InfoRequest(), timeout=10)
    return codec.unpack_metadata(info.metadata)


def node_batching(address: str) -> tuple[int, int]:
    """(passes, steps carried) of a node's lean runtime so far, from its Info."""
    metadata = node_metadata(address)
    return int(metadata.get("passes", 0)), int(metadata.get("batched_steps", 0))


SETTLE_S = 30.0  # at most this long for a chain's weights to go back to the one-row layout


def settle_alone(client, config, addresses: list[str], seed: int) -> float:
    """One session alone until no node of the chain keeps its weights packed for several rows
    (node/runtime/layout.py: after sessions that shared passes a node unpacks them in its idle time, which
    slows a lone session meanwhile); returns the seconds it took (SETTLE_S at most)."""
    started = time.monotonic()
    while any(node_metadata(address).get("packed", 0.0) > 0 for address in addresses):
        if time.monotonic() - started > SETTLE_S:
            break
        concurrent_speed(client, config, 1, 8, seed)
    return time.monotonic() - started


class _Chain:
    """Node processes for one configuration, and a client over them; always stopped."""

    def __init__(self, settings: PerfSettings, parts: int, extra_args: tuple[str, ...] = ()):
        from common.weights.files import ModelFiles
        from node.launcher import start_chain

        self.settings = settings
        self.layers = ModelFiles.open(str(settings.model)).config().num_hidden_layers
        # explicit peers, no discovery: a node in a swarm pushes only to members' addresses, not to the proxies
        self.nodes = start_chain(settings.model, self.layers, parts, threads=settings.torch_threads,
                                 extra_args=("--no-mdns", *extra_args))
        self.models: list = []

    def client(self, peers: list[str] | None = None, push: bool = True, convoys: bool = True, exact_head: bool = True,
               head_numerics: str = "exact"):
        from client.config import ClientConfig
        from client.model import DistributedModelForCausalLM

        config = ClientConfig(peers=tuple(peers or [n.address for n in self.nodes]), push=push, convoys=convoys,
                              exact_head=exact_head, head_numerics=head_numerics)
        model = DistributedModelForCausalLM.from_pretrained(str(self.settings.model), config=config)
        self.models.append(model)
        return model

    def close(self) -> None:
        for model in self.models:
            model.close()
        for node in self.nodes:
            node.stop()


def simulated_wan(chain: "_Chain", parts: int, compute: float, ids: torch.Tensor, settings: PerfSettings,
                  result: PerfResult, tick: Callable[[str], None]) -> None:
    """Decode through a latency proxy in front of every node of `chain`, for each delay and push mode; `compute`
    is seconds per token with no proxies. Proxies that add no delay are measured first: their compute excludes
    what the simulation itself costs."""
    proxied: dict[bool, float] = {}  # seconds per token through proxies that add no delay, by push
    for delay_ms in (0.0, *settings.delays_ms):
        proxies = [ProxyProcess(node.address, delay_ms) for node in chain.nodes]
        try:
            for push in (True, False):
                wan = chain.client(peers=[p.address for p in proxies], push=push)
                speed = decode_speed("wan", wan, ids, settings, settings.wan_tokens, max(1, settings.repeats - 1))
                if delay_ms == 0:
                    proxied[push] = 1 / speed.median
                    tick(f"0 ms proxies, push {push}: {speed.median:.1f} tok/s")
                    continue
                trips = parts + 1 if push else 2 * parts
                limit = 1 / (compute + trips * delay_ms / 1000)
                limit_proxied = 1 / (proxied[push] + trips * delay_ms / 1000)
                result.wan.append(WanResult(delay_ms, push, speed.median, limit, limit_proxied))
                tick(f"{delay_ms:.0f} ms per hop, push {push}: {speed.median:.1f} tok/s "
                     f"({100 * speed.median / limit:.0f}% of the limit, "
                     f"{100 * speed.median / limit_proxied:.0f}% with the proxies' own cost)")
        finally:
            for proxy in proxies:
                proxy.stop()


def batched_llama(settings: PerfSettings, threads: int) -> dict:
    """llama-batched-bench on the file the swarm serves, the sessions and tokens of the concurrency rounds ({} when
    there is no llama.cpp, no served file or no llama-batched-bench in the build)."""
    if settings.llama_cpp is None or settings.llama_served is None:
        return {}
    llama = LlamaCpp.find(settings.llama_cpp, settings.llama_served)
    if llama.batched is None:
        return {}
    return llama.batched_decode(settings.concurrency, 16, settings.concurrency_tokens, threads)


def numerics_rounds(settings: PerfSettings) -> list[tuple[int, str]]:
    """(nodes, numerics) of the chains that take turns with llama.cpp on the served file besides the main one: one
    node serving every layer, exact and fast, and the longest chain in fast numerics (issue 28's targets)."""
    if settings.llama_cpp is None or settings.llama_served is None:
        return []
    most = max(settings.node_counts)
    return [(1, "exact"), (1, "fast")] + ([(most, "fast")] if most > 1 else [])


def numerics_side_by_side(settings: PerfSettings, parts: int, numerics: str, ids: torch.Tensor,
                          threads: int) -> LlamaSide:
    """A chain of `parts` nodes computing in `numerics`, taking turns with llama.cpp on the served file; in fast
    numerics the client's head too (`--head-numerics fast`), as llama.cpp computes its own."""
    chain = _Chain(settings, parts, ("--numerics", numerics))
    try:
        model = chain.client(head_numerics=numerics)
        timed_generate(model, ids[:, :4], 2)  # warm-up
        label = f"swarm, {parts} node{'s' if parts > 1 else ''}, push, --numerics {numerics}" + (
            " --head-numerics fast" if numerics == "fast" else "")
        llama = LlamaCpp.find(settings.llama_cpp, settings.llama_served)
        return side_by_side(llama, model, ids, settings.new_tokens, threads, parts, settings.repeats, served=True,
                            label=label)
    finally:
        chain.close()


def run_benchmark(settings: PerfSettings, console: Console | None = None) -> PerfResult:
    from transformers import AutoModelForCausalLM

    from common.weights.files import ModelFiles

    console = console or Console(stderr=True)
    config = ModelFiles.open(str(settings.model)).config()
    layers = config.num_hidden_layers
    if max(settings.node_counts) > layers:
        raise ValueError(f"--nodes: the model has only {layers} layers to split")
    threads = settings.torch_threads
    machine = machine_info(threads)
    torch.set_num_threads(threads)
    ids = prompt_ids(config, settings.prompt_tokens, settings.seed)
    long_ids = prompt_ids(config, settings.prefill_tokens, settings.seed + 1)
    most = max(settings.node_counts)

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, refresh_per_second=4) as progress:
        steps = (
            4
            + (settings.llama_cpp is not None)
            + len(settings.node_counts)
            + 3
            + 2 * (len(settings.delays_ms) + 1)
            + 1
            + (2 * len(settings.concurrency) + (settings.llama_cpp is not None)) * settings.repeats
            + len(numerics_rounds(settings))
            + 3
        )
        task = progress.add_task("local transformers", total=steps)

        def tick(message: str) -> None:
            progress.update(task, advance=1, description=message)

        local_model = AutoModelForCausalLM.from_pretrained(settings.model, dtype=torch.float32).eval()
        result = PerfResult(settings, machine, decode_speed("local transformers", local_model, ids, settings),
                            num_layers=layers)
        tick(f"local transformers: {result.local.median:.1f} tok/s")

        for parts in settings.node_counts:
            chain = _Chain(settings, parts)
            try:
                model = chain.client()
                label = f"swarm, {parts} node{'s' if parts > 1 else ''}, push"
                result.swarms.append(paired_speed(label, model, local_model, ids, settings))
                tick(f"{label}: {result.swarms[-1].median:.1f} tok/s")
                if parts != most:
                    continue
                result.node_span = (chain.nodes[0].start_layer, chain.nodes[0].end_layer)
                for gguf in settings.llama_gguf if settings.llama_cpp is not None else ():
                    llama = LlamaCpp.find(settings.llama_cpp, gguf)
                    side = side_by_side(llama, model, ids, settings.new_tokens, threads, parts, settings.repeats,
                                        served=gguf == settings.llama_served)
                    result.llama.append(side)
                    tick(f"llama.cpp {side.kind}: {statistics.median(side.single_tps):.1f} tok/s in one process, "
                         f"{statistics.median(side.rpc_tps):.1f} over RPC")
                result.swarms.append(
                    paired_speed(f"swarm, {parts} nodes, no push", chain.client(push=False), local_model, ids, settings)
                )
                tick(f"no push: {result.swarms[-1].median:.1f} tok/s")
                result.node_exact = node_metadata(chain.nodes[0].address).get("exact", {})
                if (
                    result.node_exact
                ):  # the same chain holding every matrix dense (common/weights/exact.py), for comparison
                    dense_chain = _Chain(settings, parts, ("--no-exact",))
                    try:
                        result.swarms.append(paired_speed(f"swarm, {parts} nodes, push, dense weights (--no-exact)",
                                                          dense_chain.client(exact_head=False), local_model, ids,
                                                          settings))
                    finally:
                        dense_chain.close()
                    tick(f"dense weights: {result.swarms[-1].median:.1f} tok/s")
                result.prefill_local_s, result.prefill_swarm_s = paired_prefill(model, local_model, long_ids,
                                                                                settings.repeats)
                tick(f"local prefill of {settings.prefill_tokens} tokens: {result.prefill_local_s:.2f} s")
                tick(f"swarm prefill: {result.prefill_swarm_s:.2f} s")
                if settings.wan_threads in (0, threads):
                    simulated_wan(chain, parts, 1 / result.swarms[-2].median, ids, settings, result, tick)
                else:  # a chain of its own, with --wan-threads per node
                    wan_chain = _Chain(settings, parts, ("--threads", str(settings.wan_threads)))
                    try:
                        direct = decode_speed("wan direct", wan_chain.client(), ids, settings, settings.wan_tokens,
                                              max(1, settings.repeats - 1))
                        tick(f"WAN chain ({settings.wan_threads} thread(s) per node), no proxies: "
                             f"{direct.median:.1f} tok/s")
                        simulated_wan(wan_chain, parts, 1 / direct.median, ids, settings, result, tick)
                    finally:
                        wan_chain.close()
                # the first round's prompts, each alone through plain transformers: the batches' rows are checked
                references = reference_tokens(local_model, config, max(settings.concurrency),
                                              settings.concurrency_tokens, settings.seed)
                tick(f"transformers' tokens for {len(references)} prompts alone")
                # one torch thread per client thread: N generate() threads with a team of OpenMP threads each
                # would oversubscribe the cores the nodes compute on
                torch.set_num_threads(1)
                def sessions_at_once(client, sessions: int, seed: int) -> tuple[float, int, int, float]:
                    before = node_batching(chain.nodes[-1].address)
                    aggregate, steady = concurrent_speed(client, config, sessions, settings.concurrency_tokens, seed)
                    after = node_batching(chain.nodes[-1].address)
                    return aggregate, after[0] - before[0], after[1] - before[1], steady

                # rounds over every session count, so that the machine's drift spreads over all of them; each count
                # reports its median round
                runs: dict[int, list[tuple[float, int, int, float]]] = {n: [] for n in settings.concurrency}
                for round_ in range(settings.repeats):
                    for sessions in settings.concurrency:
                        if sessions == 1:  # a lone session on nodes at rest, not on weights laid out for many
                            result.settle_s.append(settle_alone(model, config, [n.address for n in chain.nodes],
                                                                settings.seed + round_))
                        runs[sessions].append(sessions_at_once(model, sessions, settings.seed + round_))
                        tick(
                            f"{sessions} concurrent sessions, round {round_ + 1}: {runs[sessions][-1][0]:.1f} tok/s in "
                            f"all, {runs[sessions][-1][3]:.1f} while all decode"
                        )
                        aggregate, steady, rows = batched_speed(model, config, sessions, settings.concurrency_tokens,
                                                                settings.seed + round_)
                        result.batched.setdefault(sessions, []).append((aggregate, steady))
                        if round_ == 0:
                            result.batched_exact[sessions] = rows == references[:sessions]
                        tick(f"one session, a batch of {sessions}: {aggregate:.1f} tok/s in all")
                    batched = batched_llama(settings, threads)
                    for sessions, run in batched.items():
                        result.llama_batched.setdefault(sessions, []).append(run)
                    if batched:
                        tick("llama-batched-bench: " + ", ".join(
                            f"{n} x {r.aggregate_tps:.1f}" for n, r in batched.items()) + " tok/s in all")
                result.concurrency = [_median_sessions(n, runs[n]) for n in settings.concurrency]
                result.concurrency_runs = {n: [run[0] for run in runs[n]] for n in settings.concurrency}
                most_sessions = 8 if 8 in settings.concurrency else max(settings.concurrency)
                if most_sessions > 1:  # what convoys (common/wire/convoy.py) add: a client without them
                    plain = chain.client(convoys=False)
                    result.concurrency_plain = _median_sessions(
                        most_sessions,
                        [sessions_at_once(plain, most_sessions, settings.seed + r) for r in range(settings.repeats)],
                    )
                    tick(f"{most_sessions} concurrent sessions without convoys: "
                         f"{result.concurrency_plain[1]:.1f} tok/s in all")
                torch.set_num_threads(threads)
                if most_sessions > 1:
                    result.batch_compute = [batch_compute(settings.model, most, most_sessions, exact=exact)
                                            for exact in (True, False)]
                    tick(f"computation alone: {most_sessions} sessions " + " / ".join(
                        f"{c.ratio:.2f}x" for c in result.batch_compute) + " one (exact / dense)")
                result.rss_node_mb = rss_mb(chain.nodes[0].process.pid)
                result.rss_node_now_mb = rss_mb(chain.nodes[0].process.pid, "VmRSS")
            finally:
                chain.close()

        for parts, numerics in numerics_rounds(settings):
            result.llama.append(numerics_side_by_side(settings, parts, numerics, ids, threads))
            side = result.llama[-1]
            tick(f"{side.swarm_label}: {statistics.median(side.swarm_tps):.1f} tok/s, llama.cpp "
                 f"{statistics.median(side.single_tps):.1f} in one process")

        chain = _Chain(settings, most, extra_args=("--no-lean",))
        try:
            label = f"swarm, {most} nodes, push, transformers' layers (--no-lean)"
            result.swarms.append(paired_speed(label, chain.client(), local_model, ids, settings))
            tick(f"{label}: {result.swarms[-1].median:.1f} tok/s")
        finally:
            chain.close()
        del local_model
        result.rss_whole_mb = whole_model_rss_mb(settings.model, threads)
        progress.update(task, completed=steps, description="done")
    return result


# -- command line ---------------------------------------------------------------------------------
def _counts(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def add_perf_bench_parser(commands) -> None:
    bench = commands.add_parser("bench-perf", help="decode, WAN, concurrency, prefill and memory against transformers")
    bench.add_argument("--model", required=True, help="model folder (config.json + safetensors)")
    bench.add_argument("--prompt-tokens", type=int, default=32)
    bench.add_argument("--new-tokens", type=int, default=48)
    bench.add_argument("--prefill-tokens", type=int, default=512)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--nodes", type=_counts, default=(1, 2, 3), help="node counts to compare (default 1,2,3)")
    bench.add_argument(
        "--delays-ms", type=_floats, default=(10.0, 50.0), help="simulated one-way delays (default 10,50)"
    )
    bench.add_argument("--wan-tokens", type=int, default=16)
    bench.add_argument("--wan-threads", type=int, default=1,
                       help="torch threads per node of the WAN chain (default 1: the proxies and the client share the "
                            "cores, and a node with two threads stalls whenever one is taken; 0: as --threads)")
    bench.add_argument("--concurrency", type=_counts, default=(1, 2, 4, 8, 16))
    bench.add_argument("--concurrency-tokens", type=int, default=24)
    bench.add_argument("--threads", type=int, default=0, help="torch threads here and per node (default: every core)")
    bench.add_argument("--out", default=None, help="markdown file whose performance section is (re)written")
    bench.add_argument("--plot", default=None, help="PNG to draw (default: next to --out, benchmarks-performance.png)")
    bench.add_argument("--llama-cpp", default=None, metavar="BUILD",
                       help="a llama.cpp build folder (deploy/llamacpp.sh): decode with llama-bench in one process and "
                            "over its RPC backend, side by side with the swarm, on the GGUF file the swarm serves")
    bench.add_argument("--llama-gguf", action="append", default=[], metavar="FILE",
                       help="more GGUF files of the same weights for llama.cpp (an F32 conversion, say; repeatable); "
                            "the file the model folder was made from (potluck prepare-model) always runs first")
    bench.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run_perf_bench_cli(args: argparse.Namespace) -> None:
    model = Path(args.model).expanduser()
    if not model.is_dir():
        raise ValueError(f"--model {args.model}: not a folder (bench-perf needs a local model folder)")
    out = Path(args.out) if args.out else None
    llama_cpp = Path(args.llama_cpp).expanduser() if args.llama_cpp else None
    served = source_gguf(model) if llama_cpp is not None else None
    extra = [Path(p).expanduser() for p in args.llama_gguf]
    llama_gguf = tuple(dict.fromkeys([*([served] if served else []), *extra]))
    plot = Path(args.plot) if args.plot else (out.parent / "benchmarks-performance.png" if out else None)
    settings = PerfSettings(
        model=model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, prefill_tokens=args.prefill_tokens,
        repeats=args.repeats, node_counts=args.nodes, delays_ms=args.delays_ms, wan_tokens=args.wan_tokens,
        wan_threads=args.wan_threads, llama_cpp=llama_cpp, llama_gguf=llama_gguf, llama_served=served,
        concurrency=args.concurrency, concurrency_tokens=args.concurrency_tokens, threads=args.threads, out=out,
        plot=plot, command=shlex.join(["potluck", *sys.argv[1:]]),
    )
    for gguf in llama_gguf:
        LlamaCpp.find(llama_cpp, gguf)  # say what is missing now, not after the other runs
    result = run_benchmark(settings)
    drawn = plot is not None and write_plot(result, plot)
    section = render_markdown(result, plot.name if drawn else None)
    if out is not None:
        write_section(out, section, MARK_START, MARK_END)
        Console(stderr=True).print(f"wrote {out}" + (f" and {plot}" if drawn else ""))
    print(section)
