"""`potluck bench-recovery`: how long a user waits when a node is SIGKILLed mid-generation.

A chain of three real `potluck join` processes (0:10, 10:20, 20:30 on SmolLM2) plus spare
nodes serving the middle span; the client is given every live node as an explicit peer.
For each k, a greedy `generate` of k + `extra_tokens` tokens (EOS suppressed) SIGKILLs the
node serving the middle span of its route right after the k-th new token, between two
decode steps. The session's RecoveryEvent gives detection, re-routing and replay; a
streamer gives what the user sees: the time from the SIGKILL to the next token. Each run's
tokens are compared with plain transformers' greedy tokens on the same prompt. Every kill
takes a node for good, so before each k enough fresh spares are started (in parallel,
between measurements) for every run of that k to find one already serving."""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from transformers.generation.streamers import BaseStreamer

if TYPE_CHECKING:
    from client.session import RecoveryEvent

MARK_START = "<!-- bench:recovery:start -->"
MARK_END = "<!-- bench:recovery:end -->"
DEFAULT_KILLS = (8, 32, 64, 128)
DEFAULT_PROMPT = "The history of the Roman Empire begins with a small town on the banks of the Tiber, where"
TARGET_S = 2.0             # the promise: the next token within this many seconds of a SIGKILL, every time
CHAIN = 3                  # nodes in the chain; the middle one is killed
NODE_FLAGS = ("--no-mdns", "--heartbeat", "1", "--ttl", "4")
START_TIMEOUT = 180.0      # seconds a node may take to print its ready line


@dataclass(frozen=True)
class RecoverySettings:
    model: Path                                 # model folder: config.json + safetensors (+ tokenizer)
    kills: tuple[int, ...] = DEFAULT_KILLS      # kill after this many new tokens, one group of runs each
    repeats: int = 3                            # runs (kills) per k
    extra_tokens: int = 8                       # tokens generated after the kill
    prompt: str = DEFAULT_PROMPT                # prompt text, when the folder has a tokenizer
    prompt_tokens: int = 20                     # length of the seeded random prompt otherwise
    threads: int = 2                            # torch threads per node and here
    out: Path | None = None                     # markdown file whose bench:recovery section is (re)written
    command: str = ""                           # the command line, quoted in the report
    seed: int = 0                               # seed of the random prompt

    def __post_init__(self) -> None:
        if not self.kills or min(self.kills) < 1:
            raise ValueError(f"--kills must be positive token counts, got {self.kills}")
        if self.repeats < 1 or self.extra_tokens < 1 or self.prompt_tokens < 1 or self.threads < 1:
            raise ValueError("--repeats, --extra-tokens, --prompt-tokens and --threads must be at least 1")
        if self.out is not None and (self.out.is_dir() or not self.out.parent.is_dir()):
            raise ValueError(f"--out {self.out}: give a markdown file in an existing folder")


@dataclass
class Trial:
    """One generate with one SIGKILL."""

    kill_at: int                       # new tokens generated before the kill
    tokens: list[int]                  # new tokens generate returned
    identical: bool                    # equal to plain transformers' greedy tokens
    stall_s: float | None = None       # SIGKILL -> the next token reaches the streamer
    step_s: float = 0.0                # median gap between two tokens elsewhere in the same run
    reap_s: float = 0.0                # SIGKILL sent -> the process reaped (the client waits for it here)
    event: RecoveryEvent | None = None # the failover of the killed node
    events: int = 0                    # failovers the session went through (1 expected)
    error: str = ""                    # why the run failed, if it did

    @property
    def phases_s(self) -> float:
        e = self.event
        return 0.0 if e is None else e.detect_s + e.reroute_s + e.replay_s


@dataclass
class RecoveryResult:
    settings: RecoverySettings
    spans: list[tuple[int, int]]
    victim: tuple[int, int]
    prompt_tokens: int
    prompt: str                        # how the prompt was made
    trials: list[Trial]
    machine: dict[str, str]
    seconds: float = 0.0
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))

    def group(self, k: int) -> list[Trial]:
        return [t for t in self.trials if t.kill_at == k]

    @property
    def max_stall(self) -> float | None:
        stalls = [t.stall_s for t in self.trials if t.stall_s is not None]
        return max(stalls) if stalls else None

    @property
    def target_met(self) -> bool:
        ok = all(t.stall_s is not None and not t.error for t in self.trials)
        return ok and self.max_stall is not None and self.max_stall < TARGET_S

    @property
    def identical(self) -> bool:
        return all(t.identical for t in self.trials)


# -- measuring ------------------------------------------------------------------------------------
class KillClock(BaseStreamer):
    """Timestamps every new token; right after the `kill_at`-th, notes the time and calls `kill()`."""

    def __init__(self, kill_at: int, kill: Callable[[], None]):
        self.kill_at, self.kill = kill_at, kill
        self.times: list[float] = []
        self.killed_at: float | None = None   # just before the SIGKILL
        self.reaped_at: float | None = None   # kill() returned: the process is gone
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() puts the prompt first
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        if len(self.times) == self.kill_at:
            self.killed_at = time.perf_counter()
            self.kill()
            self.reaped_at = time.perf_counter()

    def end(self) -> None:
        pass

    @property
    def stall(self) -> float | None:
        if self.killed_at is None or len(self.times) <= self.kill_at:
            return None
        return self.times[self.kill_at] - self.killed_at

    @property
    def reap(self) -> float:
        return 0.0 if self.killed_at is None or self.reaped_at is None else self.reaped_at - self.killed_at

    @property
    def step(self) -> float:
        """Median gap between consecutive tokens, leaving out the one with the kill in it."""
        gaps = [b - a for i, (a, b) in enumerate(zip(self.times, self.times[1:])) if i != self.kill_at - 1]
        return statistics.median(gaps) if gaps else 0.0


class NodePool:
    """Node processes of one bench (each with its own identity file); all stopped by `stop_all`."""

    def __init__(self, model: Path, threads: int, folder: Path):
        self.model, self.threads, self.folder = model, threads, folder
        self.nodes: list = []

    def start(self, spans: list[tuple[int, int]]) -> None:
        from node.launcher import NodeProcess

        batch = []
        for start, end in spans:
            identity = ("--identity", str(self.folder / f"node-{len(self.nodes)}.pem"))
            node = NodeProcess(self.model, start, end, threads=self.threads, extra_args=(*NODE_FLAGS, *identity))
            self.nodes.append(node.start())
            batch.append(node)
        for node in batch:
            node.wait_ready(START_TIMEOUT)

    def live(self, span: tuple[int, int] | None = None) -> list:
        return [n for n in self.nodes if n.address and n.process.poll() is None
                and (span is None or (n.start_layer, n.end_layer) == span)]

    def serving(self, address: str):
        [node] = [n for n in self.nodes if n.address == address]
        return node

    def stop_all(self) -> list[int | None]:
        return [node.stop() for node in self.nodes if node.process is not None and node.process.poll() is None]


def _generate(model, ids: torch.Tensor, new_tokens: int, streamer=None) -> list[int]:
    output = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, temperature=None, top_p=None, top_k=None, streamer=streamer,
    )
    return output[0, ids.shape[1]:].tolist()


def _prompt(settings: RecoverySettings, config) -> tuple[torch.Tensor, str]:
    """The prompt text through the folder's tokenizer, or seeded random ids when it has none; and how it was made."""
    from node.bench.basic import prompt_ids

    if any((settings.model / name).exists() for name in ("tokenizer.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(settings.model)(settings.prompt, return_tensors="pt")["input_ids"]
        return ids, f"“{settings.prompt}” through the model's tokenizer"
    return prompt_ids(config, settings.prompt_tokens, settings.seed), f"seeded random ids (seed {settings.seed})"


def run_trial(pool: NodePool, settings: RecoverySettings, ids: torch.Tensor, reference: list[int], k: int,
              victim: tuple[int, int]) -> Trial:
    """One generate through every live node, killing the one serving `victim` after the k-th token."""
    from client import ClientConfig, DistributedModelForCausalLM
    from client.routing import MissingLayersError
    from client.transport import PeerError

    config = ClientConfig(peers=tuple(n.address for n in pool.live()), mdns=False)
    model = DistributedModelForCausalLM.from_pretrained(str(settings.model), config=config)
    killed: list[str] = []

    def kill() -> None:
        [hop] = [h for h in model.last_session.route if (h.start, h.end) == victim]
        pool.serving(hop.peer.address).kill()
        killed.append(hop.peer.address)

    clock = KillClock(k, kill)
    expected = reference[: k + settings.extra_tokens]
    try:
        tokens = _generate(model, ids, k + settings.extra_tokens, clock)
    except (PeerError, MissingLayersError) as error:  # recorded as a failed run: the target is not met
        return Trial(k, [], False, clock.stall, clock.step, clock.reap, error=f"{type(error).__name__}: {error}")
    finally:
        model.close()
    events = model.last_session.events
    event = next((e for e in events if killed and e.address == killed[0]), None)
    return Trial(k, tokens, tokens == expected, clock.stall, clock.step, clock.reap, event, len(events),
                 "" if event else "no failover recorded for the killed node")


def run_warmup(pool: NodePool, settings: RecoverySettings, ids: torch.Tensor) -> None:
    """A short uninterrupted run through the chain (first-call costs of the client and the chain nodes)."""
    from client import ClientConfig, DistributedModelForCausalLM

    config = ClientConfig(peers=tuple(n.address for n in pool.live()), mdns=False)
    model = DistributedModelForCausalLM.from_pretrained(str(settings.model), config=config)
    try:
        _generate(model, ids, 4)
    finally:
        model.close()


def run_recovery_bench(settings: RecoverySettings, console: Console | None = None) -> RecoveryResult:
    """Local reference tokens, then the kills; every node is stopped at the end."""
    from transformers import AutoModelForCausalLM

    from common.weights.files import ModelFiles
    from node.bench.basic import machine_info
    from node.launcher import even_spans

    console = console or Console(stderr=True)
    began = time.monotonic()
    config = ModelFiles.open(str(settings.model)).config()
    spans = even_spans(config.num_hidden_layers, CHAIN)
    victim = spans[CHAIN // 2]
    machine = machine_info(settings.threads)  # before we load the machine ourselves
    threads_before = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    ids, prompt = _prompt(settings, config)
    longest = max(settings.kills) + settings.extra_tokens
    limit = getattr(config, "max_position_embeddings", None)
    if limit and ids.shape[1] + longest > limit:
        raise ValueError(f"prompt + {longest} new tokens exceed the model's {limit} positions")

    trials: list[Trial] = []
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, refresh_per_second=4) as progress, \
                tempfile.TemporaryDirectory(prefix="potluck-bench-recovery-") as scratch:
            task = progress.add_task("local transformers: reference tokens",
                                     total=2 + len(settings.kills) * (1 + settings.repeats))

            def tick(message: str) -> None:
                progress.update(task, advance=1, description=message)

            # one greedy run of the longest length: a shorter run's tokens are its prefix (EOS is
            # suppressed up to min_new_tokens in both, and token t depends only on the tokens before it)
            local = AutoModelForCausalLM.from_pretrained(settings.model, dtype=torch.float32).eval()
            reference = _generate(local, ids, longest)
            del local
            tick(f"starting the chain {', '.join(f'{a}:{b}' for a, b in spans)}")
            pool = NodePool(settings.model, settings.threads, Path(scratch))
            try:
                pool.start(spans)
                run_warmup(pool, settings, ids)
                for k in settings.kills:
                    spares = settings.repeats + 1 - len(pool.live(victim))
                    tick(f"k={k}: starting {spares} spare node(s) for {victim[0]}:{victim[1]}")
                    pool.start([victim] * spares)
                    for run in range(settings.repeats):
                        trials.append(run_trial(pool, settings, ids, reference, k, victim))
                        t = trials[-1]
                        stall = "no next token" if t.stall_s is None else f"stall {t.stall_s * 1000:.0f} ms"
                        tick(f"k={k}: run {run + 1}/{settings.repeats}, {stall}"
                             + ("" if t.identical else ", tokens DIFFER") + (f", {t.error}" if t.error else ""))
            finally:
                codes = pool.stop_all()
            progress.update(task, completed=progress.tasks[0].total, description="done")
            if any(code not in (0, None) for code in codes):
                console.print(f"[yellow]surviving nodes exited with codes {codes}[/]")
    finally:
        torch.set_num_threads(threads_before)
    return RecoveryResult(settings, spans, victim, ids.shape[1], prompt, trials, machine,
                          seconds=time.monotonic() - began)


# -- reporting ------------------------------------------------------------------------------------
def _fmt(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.1f}" if ms < 10 else f"{ms:.0f}"


def _ms(values: list[float]) -> str:
    """Median (max) in milliseconds."""
    return f"{_fmt(statistics.median(values))} ({_fmt(max(values))})" if values else "-"


def render_markdown(result: RecoveryResult) -> str:
    s, m = result.settings, result.machine
    a, b = result.victim
    max_stall = result.max_stall
    lines = [
        "## Recovery after a SIGKILL mid-generation",
        "",
        f"- date: {result.date}; the whole bench took {result.seconds:.0f} s",
        f"- machine: {m['cpu']}; {m['os']}; Python {m['python']}, torch {m['torch']}, transformers "
        f"{m['transformers']}; "
        f"load average {m['load']} at start",
        f"- command: `{s.command or 'potluck bench-recovery --model ' + str(s.model)}`",
        f"- settings: model `{s.model.name}` fp32, greedy; a chain of real `potluck join` processes on loopback "
        f"serving {', '.join(f'{x}:{y}' for x, y in result.spans)} ({s.threads} torch threads each, `--no-mdns "
        f"--heartbeat 1 --ttl 4`), plus spare nodes serving {a}:{b}; the client is given every live node as an "
        f"explicit peer. The node serving {a}:{b} in the session's route is SIGKILLed right after new token k "
        f"(between two decode steps), another node already serving {a}:{b}; fresh spares are started before each k, "
        f"outside the measurements. Prompt: {result.prompt_tokens} tokens ({result.prompt}); each run generates "
        f"k + {s.extra_tokens} tokens (EOS suppressed) and is compared with plain transformers' greedy tokens; "
        f"{s.repeats} run(s) per k.",
        "",
        f"**Target: the next token within {TARGET_S:g} s of a SIGKILL, every time: "
        f"{'met' if result.target_met else 'NOT met'}** (max {'-' if max_stall is None else f'{max_stall:.2f} s'} "
        f"over {len(result.trials)} kills; tokens identical to plain transformers in every run: "
        f"**{'yes' if result.identical else 'no'}**)",
        "",
        "Milliseconds, median (max) over the runs of each k:",
        "",
        "| kill after k tokens | tokens replayed | SIGKILL to process gone | detect | re-route | replay "
        "| **stall: SIGKILL to next token** | normal token gap | stall minus gap | output = local greedy |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in s.kills:
        group = result.group(k)
        events = [t.event for t in group if t.event is not None]
        stalls = [t.stall_s for t in group if t.stall_s is not None]
        excess = [t.stall_s - t.step_s for t in group if t.stall_s is not None]
        replayed = sorted({e.replayed_tokens for e in events})
        lines.append(
            f"| {k} | {', '.join(map(str, replayed)) or '-'} | {_ms([t.reap_s for t in group])} "
            f"| {_ms([e.detect_s for e in events])} | {_ms([e.reroute_s for e in events])} "
            f"| {_ms([e.replay_s for e in events])} | **{_ms(stalls)}** | {_ms([t.step_s for t in group])} "
            f"| {_ms(excess)} | {sum(t.identical for t in group)}/{len(group)} |"
        )
    failures = [t for t in result.trials if t.error or t.events != 1]
    if failures:
        lines += ["", "Runs that did not go as expected: " + "; ".join(
            f"k={t.kill_at}: {t.error or f'{t.events} failovers'}" for t in failures) + "."]
    lines += ["", "Every stall (ms): " + "; ".join(
        f"k={k}: " + ", ".join("-" if t.stall_s is None else _fmt(t.stall_s) for t in result.group(k))
        for k in s.kills) + "."]
    lines += ["", _interpretation(result), ""]
    return "\n".join(lines)


def _interpretation(result: RecoveryResult) -> str:
    trials = [t for t in result.trials if t.event is not None and t.stall_s is not None]
    if not trials:
        return "No run recovered, so there is nothing to interpret."
    median_ms = lambda values: statistics.median(values) * 1000  # noqa: E731
    text = (
        "How to read it: the stall is what the user sees, from the SIGKILL to the next token; it holds one ordinary "
        "decode step (the normal token gap) plus what the failure costs (stall minus gap), which is the sum of the "
        f"phases before it. *SIGKILL to process gone* (median {median_ms([t.reap_s for t in trials]):.0f} ms) is the "
        "kernel tearing the node down, mostly freeing its memory, which it does before closing its sockets: until "
        "then the client cannot tell (here the bench waits for it; a client stepping at that moment would count it "
        f"as detection). *Detect* (median {median_ms([t.event.detect_s for t in trials]):.1f} ms) is from sending "
        "the step to the dead hop to the error: the closed socket fails the open stream at once. A node that hangs "
        "instead of dying is only caught by the step deadline, at least `ClientConfig.deadline_floor` = 1.5 s, "
        "which this bench does not cover. *Re-route* "
        f"(median {median_ms([t.event.reroute_s for t in trials]):.0f} ms) asks every peer for its Info again and "
        "plans a chain for the lost layers. *Replay* opens a stream to the replacement and sends it the hop's whole "
        "input history (prompt + tokens so far, minus the token being decoded) as one prefill. "
    )
    replayed = [t.event.replayed_tokens for t in trials]
    if len(set(replayed)) > 1:
        kills = result.settings.kills
        replay = statistics.linear_regression(replayed, [t.event.replay_s * 1000 for t in trials])
        fixed = statistics.median((t.stall_s - t.event.replay_s) * 1000 for t in trials)
        stall_first = median_ms([t.stall_s for t in result.group(min(kills)) if t.stall_s is not None])
        stall_last = median_ms([t.stall_s for t in result.group(max(kills)) if t.stall_s is not None])
        text += (
            f"Only the replay grows with the tokens already generated: about {replay.intercept:.0f} ms plus "
            f"{replay.slope * 100:.0f} ms per 100 tokens held (least squares over every run, {min(replayed)} to "
            f"{max(replayed)} tokens); the median stall goes from {stall_first:.0f} ms after {min(kills)} tokens to "
            f"{stall_last:.0f} ms after {max(kills)}. "
        )
        if replay.slope > 0:
            reach = (TARGET_S * 1000 - fixed - replay.intercept) / replay.slope
            text += (
                f"The rest of the stall is not tied to k (stall minus replay, median {fixed:.0f} ms: process "
                "teardown, one decode step, re-route); with that and the replay's slope the stall would pass "
                f"{TARGET_S:g} s at about "
                f"{reach:,.0f} tokens held on this machine, sooner in fact, since attention makes a long prefill "
                "cost more than linearly. "
            )
    text += ("Replay is a prefill, so it costs much less per token than decoding them did; detection and re-routing "
             "do not depend on the position.")
    load, cores = float(result.machine["load"]), os.cpu_count() or 1
    if load >= cores / 2:
        text += (f" Noise: the load average was {load:.2f} on {cores} cores at start, so other processes competed "
                 "with the nodes and the client; token gaps and stalls vary from run to run (see every stall above), "
                 "and an idle machine would give lower ones.")
    return text


def write_section(path: Path, section: str) -> None:
    from node.bench.basic import write_section as write_marked

    write_marked(path, section, MARK_START, MARK_END)


# -- command line ---------------------------------------------------------------------------------
def _kills(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: give comma-separated token counts, e.g. 8,32,64,128") from None


def add_recovery_bench_parser(commands) -> None:
    bench = commands.add_parser("bench-recovery", help="benchmark recovery after a node is SIGKILLed mid-generation")
    bench.add_argument("--model", required=True, help="model folder (config.json + safetensors)")
    bench.add_argument("--kills", type=_kills, default=DEFAULT_KILLS,
                       help="kill after this many new tokens, comma-separated (default 8,32,64,128)")
    bench.add_argument("--repeats", type=int, default=3, help="kills per k, each on a fresh spare (default 3)")
    bench.add_argument("--extra-tokens", type=int, default=8, help="tokens generated after the kill (default 8)")
    bench.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text (used when the model has a tokenizer)")
    bench.add_argument("--threads", type=int, default=2, help="torch threads per node and in the client (default 2)")
    bench.add_argument("--out", default=None, help="markdown file to write the results into (default: print only)")
    bench.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run_recovery_bench_cli(args: argparse.Namespace) -> None:
    model = Path(args.model).expanduser()
    if not model.is_dir():
        raise ValueError(f"--model {args.model}: not a folder (bench-recovery needs a local model folder)")
    settings = RecoverySettings(
        model=model, kills=tuple(args.kills), repeats=args.repeats, extra_tokens=args.extra_tokens,
        prompt=args.prompt, threads=args.threads, out=Path(args.out) if args.out else None,
        command=shlex.join(["potluck", *sys.argv[1:]]),
    )
    section = render_markdown(run_recovery_bench(settings))
    if settings.out is not None:
        write_section(settings.out, section)
        Console(stderr=True).print(f"wrote {settings.out}")
    print(section)
