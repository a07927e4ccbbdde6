"""`potluck bench`: plain transformers in one process vs a local swarm of node processes, in one run.

Both systems run greedy `generate` on the same token ids (a seeded random prompt, so no
tokenizer is needed) for exactly `new_tokens` tokens (EOS is suppressed until then).
Prefill speed is prompt tokens over the time to the first new token; decode speed is the
remaining tokens over the remaining time; each figure is the median of `repeats` runs
after a short warm-up. One decode step of the swarm is then taken apart: the client's
embedding and head, each hop's compute (its span loaded in this process and timed on one
token with a warm cache), the network path (a bare one-token session step minus the hops'
compute), and the rest (generate()'s own bookkeeping, and any slowdown of the compute
inside the node processes)."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from transformers.generation.streamers import BaseStreamer

MARK_START = "<!-- bench:foundation:start -->"
MARK_END = "<!-- bench:foundation:end -->"
WARMUP_PROMPT = 8        # prompt tokens of the warm-up generate (allocations, thread pools, channels)
PROBE_STEPS = 32         # one-token steps timed for each part of the breakdown (the median is kept)
NOISY_SPREAD = 0.15      # runs further apart than this (relative) get a warning in the report


@dataclass(frozen=True)
class BenchSettings:
    model: Path                    # model folder: config.json + safetensors
    nodes: int = 3                 # node processes in the swarm (the layers split evenly)
    prompt_tokens: int = 128       # prompt length for the prefill figure
    new_tokens: int = 64           # tokens generated per run
    repeats: int = 3               # timed runs per system; the median is reported
    threads: int = 0               # torch threads here and per node (0: every core)
    out: Path | None = None        # markdown file whose bench section is (re)written
    command: str = ""              # the command line, quoted in the report
    seed: int = 0                  # seed of the random prompt

    def __post_init__(self) -> None:
        checks = [
            (self.nodes >= 1, f"--nodes must be at least 1, got {self.nodes}"),
            (self.prompt_tokens >= 1, f"--prompt-tokens must be at least 1, got {self.prompt_tokens}"),
            (
                self.new_tokens >= 2,
                f"--new-tokens must be at least 2 (one for prefill, one to decode), got {self.new_tokens}",
            ),
            (self.repeats >= 1, f"--repeats must be at least 1, got {self.repeats}"),
            (self.threads >= 0, f"--threads must be positive, got {self.threads}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.out is not None and self.out.is_dir():
            raise ValueError(f"--out {self.out} is a folder; give a markdown file")
        if self.out is not None and not self.out.parent.is_dir():
            raise ValueError(f"--out {self.out}: folder {self.out.parent} does not exist")

    @property
    def torch_threads(self) -> int:
        return self.threads or os.cpu_count() or 1


@dataclass
class Run:
    prompt_tokens: int
    prefill_s: float          # generate() called -> first new token
    decode_s: float           # first new token -> last
    tokens: list[int]
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (perf_counter, tokens) of each new put

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s

    @property
    def decode_tps(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s


@dataclass
class SystemResult:
    name: str
    runs: list[Run]

    @property
    def prefill_tps(self) -> float:
        return statistics.median(r.prefill_tps for r in self.runs)

    @property
    def decode_tps(self) -> float:
        return statistics.median(r.decode_tps for r in self.runs)

    @property
    def tokens(self) -> list[int]:
        return self.runs[0].tokens

    @property
    def decode_spread(self) -> float:
        speeds = [r.decode_tps for r in self.runs]
        return (max(speeds) - min(speeds)) / max(speeds)


@dataclass
class Breakdown:
    """Seconds of one swarm decode step, by part; `rows` add up to `total`."""

    rows: list[tuple[str, float]]
    total: float                       # the swarm's decode step inside generate (1 / decode tok/s)
    compute: float                     # embedding + every hop + head, as computed in one process
    network: float                     # bare session step minus the hops' compute
    rest: float                        # total minus compute and network


@dataclass
class BenchResult:
    settings: BenchSettings
    local: SystemResult
    swarm: SystemResult
    breakdown: Breakdown
    spans: list[tuple[int, int]]
    machine: dict[str, str]
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))

    @property
    def identical(self) -> bool:
        return all(run.tokens == self.local.tokens for run in self.local.runs + self.swarm.runs)

    def first_mismatch(self) -> int | None:
        for run in self.swarm.runs:
            for index, (a, b) in enumerate(zip(self.local.tokens, run.tokens)):
                if a != b:
                    return index
        return None


# -- measuring ------------------------------------------------------------------------------------
class FirstTokenClock(BaseStreamer):
    """generate() puts the prompt first, then the new tokens (one at a time, or several when a draft was
    accepted): note when the first new ones come, and how many came with them, and when every later put came."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_at: float | None = None
        self.first_tokens = 0
        self.arrivals: list[tuple[float, int]] = []  # (perf_counter, tokens) of each put after the prompt

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts >= 2:
            self.arrivals.append((time.perf_counter(), value.numel()))
        if self.puts == 2:
            self.first_at, self.first_tokens = self.arrivals[0][0], value.numel()

    def end(self) -> None:
        pass


def prompt_ids(config, tokens: int, seed: int) -> torch.Tensor:
    """A seeded random prompt [1, tokens] that avoids the special ids (bos, eos, pad)."""
    special: set[int] = set()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, name, None)
        special.update(value if isinstance(value, list) else [] if value is None else [value])
    allowed = torch.tensor([i for i in range(config.vocab_size) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(len(allowed), (1, tokens), generator=generator)]


def greedy_exactly(model, ids: torch.Tensor, new_tokens: int, streamer=None) -> torch.Tensor:
    """Greedy generation of exactly `new_tokens` for every row of `ids` (no padding; EOS held off)."""
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, temperature=None, top_p=None, top_k=None, streamer=streamer,
    )


def timed_generate(model, ids: torch.Tensor, new_tokens: int) -> Run:
    clock = FirstTokenClock()
    started = time.perf_counter()
    output = greedy_exactly(model, ids, new_tokens, clock)
    finished = time.perf_counter()
    tokens = output[0, ids.shape[1]:].tolist()
    if len(tokens) != new_tokens or clock.first_at is None:
        raise RuntimeError(f"generate returned {len(tokens)} tokens, expected {new_tokens}")
    return Run(ids.shape[1], clock.first_at - started, finished - clock.first_at, tokens, clock.arrivals)


def all_at_once(calls: list[Callable[[], object]]) -> tuple[float, list]:
    """Run every call in a thread of its own, all released together; (seconds until the last ended, their results).
    The first error any of them raised is raised after all ended."""
    barrier = threading.Barrier(len(calls) + 1)
    results: list = [None] * len(calls)
    errors: list[BaseException] = []

    def work(index: int) -> None:
        barrier.wait()
        try:
            results[index] = calls[index]()
        except BaseException as error:  # raised after the join
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed, results


def measure_system(
    name: str, model, ids: torch.Tensor, settings: BenchSettings, tick: Callable[[str], None]
) -> SystemResult:
    tick(f"{name}: warm-up")
    timed_generate(model, ids[:, :WARMUP_PROMPT], 2)
    runs = []
    for index in range(settings.repeats):
        runs.append(timed_generate(model, ids, settings.new_tokens))
        tick(f"{name}: run {index + 1}/{settings.repeats} ({runs[-1].decode_tps:.1f} tok/s decode)")
    return SystemResult(name, runs)


def _median_time(fn: Callable[[], object], steps: int = PROBE_STEPS) -> float:
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@torch.inference_mode()
def client_probe(model, ids: torch.Tensor) -> dict[str, float]:
    """Times of the client's own parts and of a bare one-token session step through the chain."""
    from common.wire import codec

    one = ids[:, -1:]
    hidden = model.embed_tokens(one)
    probe = {
        "embed": _median_time(lambda: model.embed_tokens(one)),
        "head": _median_time(lambda: model.head_calls.fn(model.norm(hidden))),  # as generate() calls it
        "codec": _median_time(lambda: codec.decode_tensor(codec.encode_tensor(hidden, torch.float32)), 128),
    }
    with model.inference_session(max_length=ids.shape[1] + PROBE_STEPS + 1) as session:
        session.step(model.embed_tokens(ids))  # prefill: later steps see a warm cache of prompt length
        probe["chain"] = _median_time(lambda: session.step(hidden))
    return probe


@torch.inference_mode()
def hop_compute(
    folder: Path, spans: list[tuple[int, int]], prompt_tokens: int, tick: Callable[[str], None]
) -> list[float]:
    """Each span loaded here, prefilled with `prompt_tokens`, then timed on one token at a time."""
    from common.weights.fast_linear import transpose_linears
    from common.weights.files import ModelFiles
    from node.model.compact import exact_span
    from node.model.loader import load_span

    files = ModelFiles.open(str(folder))
    times = []
    for start, end in spans:
        span, _ = load_span(files, start, end, torch.device("cpu"), torch.float32)
        transpose_linears(span)  # as a node on CPU does (node/server.py)
        span.make_lean()
        exact_span(span)  # likewise (dense where no narrow form holds a matrix)
        generator = torch.Generator().manual_seed(start)
        hidden = torch.randn(1, prompt_tokens, span.config.hidden_size, generator=generator)
        cache = span.new_cache(1, prompt_tokens + PROBE_STEPS + 1)
        span(hidden, torch.arange(prompt_tokens).unsqueeze(0), cache=cache)
        position = [prompt_tokens]

        def step(span=span, cache=cache) -> None:  # this iteration's span and cache (freed at its end)
            span(hidden[:, -1:], torch.tensor([position]), cache=cache)
            position[0] += 1

        times.append(_median_time(step))
        tick(f"hop {start}:{end}: {times[-1] * 1000:.1f} ms per token")
        del span, cache
    return times


def build_breakdown(swarm: SystemResult, probe: dict[str, float], hops: list[float], spans) -> Breakdown:
    total = 1 / swarm.decode_tps
    codec_total = probe["codec"] * (len(hops) + 1)  # each node decodes + encodes; the client encodes + decodes once
    network = probe["chain"] - sum(hops)
    compute = probe["embed"] + sum(hops) + probe["head"]
    rest = total - compute - network
    rows = [("client: token embedding", probe["embed"])]
    rows += [(f"hop {i + 1}: layers {a}:{b} compute", t) for i, ((a, b), t) in enumerate(zip(spans, hops))]
    rows += [
        ("client: final norm + LM head", probe["head"]),
        ("tensor codec (protobuf <-> torch), all hops", codec_total),
        ("gRPC streams, event loops, thread hand-offs", network - codec_total),
        ("rest: generate() bookkeeping, slower compute in nodes", rest),
    ]
    return Breakdown(rows=rows, total=total, compute=compute, network=network, rest=rest)


def machine_info(threads: int) -> dict[str, str]:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": str(threads),
        "load": f"{load:.2f}",
    }


def run_benchmark(settings: BenchSettings, console: Console | None = None) -> BenchResult:
    """Measure local transformers, then the swarm, then the breakdown; the nodes are always stopped."""
    from transformers import AutoModelForCausalLM

    from client.model import DistributedModelForCausalLM
    from common.weights.files import ModelFiles
    from node.launcher import even_spans, start_chain

    console = console or Console(stderr=True)
    config = ModelFiles.open(str(settings.model)).config()
    layers = config.num_hidden_layers
    if settings.nodes > layers:
        raise ValueError(f"--nodes {settings.nodes}: the model has only {layers} layers to split")
    limit = getattr(config, "max_position_embeddings", None)
    if limit and settings.prompt_tokens + settings.new_tokens > limit:
        raise ValueError(f"--prompt-tokens + --new-tokens exceed the model's {limit} positions")
    threads = settings.torch_threads
    machine = machine_info(threads)  # before we load the machine ourselves
    torch.set_num_threads(threads)
    ids = prompt_ids(config, settings.prompt_tokens, settings.seed)
    spans = even_spans(layers, settings.nodes)
    label = f"swarm, {settings.nodes} nodes"

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, refresh_per_second=4) as progress:
        steps = 2 * (1 + settings.repeats) + 2 + len(spans)
        task = progress.add_task("loading the local model", total=steps)

        def tick(message: str) -> None:
            progress.update(task, advance=1, description=message)

        local_model = AutoModelForCausalLM.from_pretrained(settings.model, dtype=torch.float32).eval()
        local = measure_system("local transformers", local_model, ids, settings, tick)
        del local_model

        tick(f"starting {settings.nodes} nodes ({threads} threads each)")
        nodes = start_chain(settings.model, layers, settings.nodes, threads=threads)
        machine["omp"] = (f"client {os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
                          f"nodes {nodes[0].env.get('OMP_WAIT_POLICY', 'unset')}")
        try:
            model = DistributedModelForCausalLM.from_pretrained(str(settings.model), peers=[n.address for n in nodes])
            try:
                swarm = measure_system(label, model, ids, settings, tick)
                probe = client_probe(model, ids)
                tick(f"bare chain step: {probe['chain'] * 1000:.1f} ms")
            finally:
                model.close()
        finally:
            codes = [node.stop() for node in nodes]
        if any(code not in (0, None) for code in codes):
            console.print(f"[yellow]nodes exited with codes {codes}[/]")
        hops = hop_compute(settings.model, spans, settings.prompt_tokens, tick)
        progress.update(task, completed=steps, description="done")

    return BenchResult(settings, local, swarm, build_breakdown(swarm, probe, hops, spans), spans, machine)


# -- reporting ------------------------------------------------------------------------------------
def render_markdown(result: BenchResult) -> str:
    s, local, swarm, b, m = result.settings, result.local, result.swarm, result.breakdown, result.machine
    lines = [
        "## Local transformers vs the swarm (foundation)",
        "",
        f"- date: {result.date}",
        f"- machine: {m['cpu']}; {m['os']}; Python {m['python']}, torch {m['torch']}, transformers "
        f"{m['transformers']}; "
        f"load average {m['load']} at start; OMP_WAIT_POLICY {m.get('omp', 'unknown')}",
        f"- command: `{s.command or 'potluck bench --model ' + str(s.model)}`",
        f"- settings: model `{Path(s.model).name}` fp32, greedy, {s.prompt_tokens}-token prompt (seeded random ids), "
        f"{s.new_tokens} new tokens (EOS suppressed), {m['threads']} torch threads here and per node, "
        f"{s.nodes} node processes on loopback serving {', '.join(f'{a}:{b}' for a, b in result.spans)}; "
        f"median of {s.repeats} run(s) after a warm-up",
        "",
        "| system | prefill tok/s | decode tok/s | decode ms/token | ratio vs local (prefill / decode) |",
        "|---|---:|---:|---:|---:|",
    ]
    for system in (local, swarm):
        ratio = f"{system.prefill_tps / local.prefill_tps:.2f} / {system.decode_tps / local.decode_tps:.2f}"
        lines.append(
            f"| {system.name} | {system.prefill_tps:.1f} | {system.decode_tps:.2f} | "
            f"{1000 / system.decode_tps:.1f} | {ratio} |"
        )
    mismatch = result.first_mismatch()
    lines += [
        "",
        f"Tokens identical (swarm vs local, every run): **{'yes' if result.identical else 'no'}**"
        + ("" if mismatch is None else f" (first difference at new token {mismatch})"),
        "",
        "Per-run decode tok/s: "
        + "; ".join(f"{x.name} " + ", ".join(f"{r.decode_tps:.2f}" for r in x.runs) for x in (local, swarm)) + ".",
    ]
    noisy = [x.name for x in (local, swarm) if x.decode_spread > NOISY_SPREAD]
    if noisy:
        lines += ["", f"**Noisy:** the runs of {' and '.join(noisy)} differ by more than {NOISY_SPREAD:.0%}; "
                      "something else was probably using the CPU. Rerun on an idle machine."]
    lines += ["", "### Where one swarm decode step goes", "", "| part | ms | share |", "|---|---:|---:|"]
    for label, seconds in b.rows:
        lines.append(f"| {label} | {seconds * 1000:.2f} | {100 * seconds / b.total:.0f}% |")
    lines += [
        f"| **total (swarm decode step)** | **{b.total * 1000:.2f}** | 100% |",
        f"| (local transformers decode step, for reference) | {1000 / local.decode_tps:.2f} | |",
        "",
        _interpretation(result),
        "",
    ]
    return "\n".join(lines)


def _interpretation(result: BenchResult) -> str:
    b, hops = result.breakdown, len(result.spans)
    local_ms, total_ms = 1000 / result.local.decode_tps, b.total * 1000
    compute_ms, network_ms, rest_ms = b.compute * 1000, b.network * 1000, b.rest * 1000
    overhead_ms = total_ms - compute_ms
    largest = max(("the network path", network_ms), ("the rest", rest_ms), key=lambda item: item[1])[0]
    if compute_ms < 0.9 * local_ms:
        verdict = f"so the span code itself takes {1 - compute_ms / local_ms:.0%} less time than transformers"
    elif compute_ms <= 1.1 * local_ms:
        verdict = "so the span code computes about as fast as transformers does"
    else:
        verdict = f"so the span code itself is {compute_ms / local_ms - 1:.0%} slower than transformers"
    return (
        "How to read it: hop compute is each span loaded in this process and timed on one token with a warm cache "
        "of prompt length; the network rows are a bare one-token session step through the running nodes minus that "
        "compute; the rest is the swarm step inside `generate` minus both (generate()'s bookkeeping, plus any "
        f"slowdown of the compute inside the node processes). Compute alone (embedding, {hops} span(s), head) takes "
        f"{compute_ms:.1f} ms per token, against {local_ms:.1f} ms for the whole model in plain transformers, "
        f"{verdict}. The swarm step takes {total_ms:.1f} ms "
        f"({total_ms / local_ms:.2f}x local): {overhead_ms:.1f} ms over its compute, of which the network path is "
        f"{network_ms:.1f} ms ({network_ms / hops:.1f} ms per hop) and the rest {rest_ms:.1f} ms; {largest} is the "
        "bigger share. The serialization itself (tensor codec) is negligible at one token."
    )


def write_section(path: Path, section: str, mark_start: str = MARK_START, mark_end: str = MARK_END) -> None:
    """Replace the marked section of `path` (or append it), keeping everything else."""
    block = f"{mark_start}\n{section.strip()}\n{mark_end}"
    if not path.exists():
        path.write_text(f"# Benchmarks\n\n{block}\n")
        return
    text = path.read_text()
    start, end = text.find(mark_start), text.find(mark_end)
    if start != -1 and end > start:
        text = text[:start] + block + text[end + len(mark_end):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + block + "\n"
    path.write_text(text)


# -- command line ---------------------------------------------------------------------------------
def local_model_folder(value: str, command: str) -> Path:
    """--model of a benchmark: a local folder, or a clear error naming the command."""
    model = Path(value).expanduser()
    if not model.is_dir():
        raise ValueError(f"--model {value}: not a folder ({command} needs a local model folder)")
    return model


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """--out and --log-level, as every benchmark has them."""
    parser.add_argument("--out", default=None, help="markdown file to write the results into (default: print only)")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def publish(section: str, out: str | None, mark_start: str, mark_end: str) -> None:
    """Write a benchmark's section into `out` (replacing its previous one) and print it."""
    if out:
        write_section(Path(out), section, mark_start, mark_end)
        Console(stderr=True).print(f"wrote {out}")
    print(section)


def add_bench_parser(commands) -> None:
    bench = commands.add_parser("bench", help="benchmark local transformers vs a local swarm, same run")
    bench.add_argument("--model", required=True, help="model folder (config.json + safetensors)")
    bench.add_argument("--nodes", type=int, default=3, help="node processes in the swarm (default 3)")
    bench.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    bench.add_argument("--new-tokens", type=int, default=64, help="tokens to generate per run (default 64)")
    bench.add_argument(
        "--repeats", type=int, default=3, help="timed runs per system; the median is reported (default 3)"
    )
    bench.add_argument("--threads", type=int, default=0, help="torch threads here and per node (default: every core)")
    bench.add_argument("--out", default=None, help="markdown file to write the results into (default: print only)")
    bench.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run_bench(args: argparse.Namespace) -> None:
    model = Path(args.model).expanduser()
    if not model.is_dir():
        raise ValueError(f"--model {args.model}: not a folder (bench needs a local model folder)")
    settings = BenchSettings(
        model=model, nodes=args.nodes, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
        repeats=args.repeats, threads=args.threads, out=Path(args.out) if args.out else None,
        command=shlex.join(["potluck", *sys.argv[1:]]),
    )
    result = run_benchmark(settings)
    section = render_markdown(result)
    if settings.out is not None:
        write_section(settings.out, section)
        Console(stderr=True).print(f"wrote {settings.out}")
    print(section)
