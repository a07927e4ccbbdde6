"""`potluck bench-speculate`: speculative decoding by prompt lookup, through 3 node processes and in plain transformers.

A pass through the swarm costs about as much for a few tokens as for one (the weights are read once either way,
and the hops' hand-overs are paid once), so checking a draft of N tokens in one pass gains whenever part of it is
right. Prompt lookup drafts the tokens that followed the last ones earlier in the text; greedy output is
unchanged (checked here against plain transformers on every run). Four systems take turns on each task, in
rounds: transformers `generate`, the same with prompt lookup, the swarm, the swarm with prompt lookup.

With `--sessions 4,8` it also runs that many sessions of one client at once, with and without prompt lookup: a
session drafts only while its generate call is the client's only one (client/draft.py), which this checks costs
nothing there."""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from rich.console import Console

SYSTEMS = ("transformers", "transformers, prompt lookup", "swarm", "swarm, prompt lookup")

NOTES = ("Meeting notes, 14 March. Present: Amal, Bruno, Chen. The lab opens its GPU pool to the village school "
         "from 1 April. Bruno sets up two nodes in room 12; Chen writes the sign-up page. Next meeting: "
         "Thursday 21 March at 10:00 in room 12.")


@dataclass(frozen=True)
class Task:
    name: str
    prompt: str | None  # None: the seeded random prompt of bench-perf
    chat: bool


TASKS = (
    Task("copy a sentence", "Repeat this sentence exactly, word for word: the village school shares one computer "
         "between forty children, so every lesson starts with a queue.", True),
    Task("fix spelling", "Correct the spelling and write the whole text out again: Evry voluntear brings a dish, "
         "and the computors of the hole village run one big modle together.", True),
    Task("answer from notes", f"{NOTES}\n\nWho sets up the nodes, where, and when is the next meeting?", True),
    Task("code", "def fibonacci(n):", False),
    Task("open question", "Write a haiku about sharing food with neighbours.", True),
    Task("random ids (bench-perf's prompt)", None, False),
)


@dataclass
class Run:
    tokens: list[int]
    total_s: float
    first_s: float      # prompt in, first new tokens out
    first_tokens: int   # tokens that came with the prompt's pass
    passes: int | None  # passes through the swarm (None: local)

    @property
    def decode_tps(self) -> float:
        decoded = len(self.tokens) - self.first_tokens
        return decoded / (self.total_s - self.first_s) if decoded > 0 and self.total_s > self.first_s else 0.0

    @property
    def tps(self) -> float:
        return len(self.tokens) / self.total_s


@dataclass
class TaskResult:
    task: Task
    prompt_tokens: int
    runs: dict[str, list[Run]] = field(default_factory=lambda: {name: [] for name in SYSTEMS})
    equal: bool = True  # every run's tokens are plain transformers' greedy ones

    def median(self, system: str, attr: str = "decode_tps") -> float:
        return statistics.median(getattr(run, attr) for run in self.runs[system])

    def ratio(self, system: str, against: str, attr: str = "decode_tps") -> float:
        """Median over rounds of system / against, each round's runs taken together."""
        return statistics.median(getattr(a, attr) / getattr(b, attr)
                                 for a, b in zip(self.runs[system], self.runs[against]))

    @property
    def tokens_per_pass(self) -> float:
        runs = self.runs["swarm, prompt lookup"]
        return statistics.median(len(r.tokens) / r.passes for r in runs)


@dataclass
class SessionsResult:
    """Several sessions of one client at once: aggregate new tokens/s per round, without and with prompt lookup."""

    sessions: int
    tps: dict[str, list[float]] = field(default_factory=lambda: {"swarm": [], "swarm, prompt lookup": []})
    equal: bool = True  # every session's tokens are plain transformers' greedy ones

    def median(self, system: str) -> float:
        return statistics.median(self.tps[system])

    @property
    def ratio(self) -> float:
        return statistics.median(b / a for a, b in zip(self.tps["swarm"], self.tps["swarm, prompt lookup"]))


def greedy_tokens(model, ids: torch.Tensor, new_tokens: int, lookup: int) -> list[int]:
    extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}
    output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                            **extra)
    return output[0, ids.shape[1]:].tolist()


def at_once(model, prompts: list[torch.Tensor], new_tokens: int, lookup: int) -> tuple[float, list[list[int]]]:
    """Aggregate new tokens/s of one generate call per prompt, all at once (a thread each), and their tokens."""
    from node.bench.basic import all_at_once

    elapsed, outputs = all_at_once([partial(greedy_tokens, model, ids, new_tokens, lookup) for ids in prompts])
    return len(prompts) * new_tokens / elapsed, outputs


def run_sessions(swarm, local, counts: tuple[int, ...], lookup: int, new_tokens: int, rounds: int,
                 console: Console) -> list[SessionsResult]:
    from node.bench.basic import prompt_ids

    results = []
    for count in counts:
        prompts = [prompt_ids(local.config, 16, 100 + i) for i in range(count)]
        expected = [greedy_tokens(local, ids, new_tokens, 0) for ids in prompts]
        result = SessionsResult(count)
        for _ in range(rounds):
            for name, k in (("swarm", 0), ("swarm, prompt lookup", lookup)):
                tps, outputs = at_once(swarm, prompts, new_tokens, k)
                result.tps[name].append(tps)
                result.equal &= outputs == expected
        console.print(f"{count} sessions at once: swarm {result.median('swarm'):.1f}, with prompt lookup "
                      f"{result.median('swarm, prompt lookup'):.1f} tok/s in all ({result.ratio:.2f}x); "
                      f"equal: {result.equal}")
        results.append(result)
    return results


def timed(model, ids: torch.Tensor, new_tokens: int, lookup: int) -> Run:
    from node.bench.basic import FirstTokenClock

    clock = FirstTokenClock()
    extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}
    started = time.perf_counter()
    output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                            temperature=None, top_p=None, top_k=None, streamer=clock, **extra)
    finished = time.perf_counter()
    session = getattr(model, "last_session", None)
    first_at = clock.first_at or finished
    return Run(output[0, ids.shape[1]:].tolist(), finished - started, first_at - started, max(clock.first_tokens, 1),
               session.steps if session is not None else None)


def task_ids(task: Task, tokenizer, config) -> torch.Tensor:
    from client.textgen import encode_prompt
    from node.bench.basic import prompt_ids

    return prompt_ids(config, 32, 0) if task.prompt is None else encode_prompt(tokenizer, task.prompt, task.chat)


def run_speculate_bench(model: Path, lookup: int = 8, new_tokens: int = 48, rounds: int = 3, threads: int = 2,
                        tasks: tuple[Task, ...] = TASKS, delay_ms: float = 0.0, sessions: tuple[int, ...] = (),
                        console: Console | None = None) -> tuple[list[TaskResult], list[SessionsResult]]:
    """With `delay_ms`, the client and the nodes reach every node through a latency proxy (a simulated WAN);
    `sessions`: counts of sessions of one client to run at once, on bench-perf's random prompts (32 tokens each
    at most `new_tokens`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from client.config import ClientConfig
    from client.model import DistributedModelForCausalLM
    from node.bench.perf import ProxyProcess
    from node.launcher import start_chain

    console = console or Console(stderr=True)
    torch.set_num_threads(threads)
    local = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model) if any(task.prompt is not None for task in tasks) else None
    nodes = start_chain(model, local.config.num_hidden_layers, 3, threads=threads, extra_args=("--no-mdns",))
    swarm, proxies = None, []
    try:
        proxies = [ProxyProcess(node.address, delay_ms) for node in nodes] if delay_ms else []
        swarm = DistributedModelForCausalLM.from_pretrained(str(model), config=ClientConfig(
            peers=tuple(p.address for p in proxies) or tuple(n.address for n in nodes)))
        systems = {"transformers": (local, 0), "transformers, prompt lookup": (local, lookup),
                   "swarm": (swarm, 0), "swarm, prompt lookup": (swarm, lookup)}
        for target, _ in systems.values():  # warm-up: allocations, thread pools, channels
            timed(target, task_ids(tasks[0], tokenizer, local.config), 4, 0)
        results = []
        for task in tasks:
            ids = task_ids(task, tokenizer, local.config)
            result = TaskResult(task, ids.shape[1])
            for _ in range(rounds):
                for name, (target, k) in systems.items():
                    result.runs[name].append(timed(target, ids, new_tokens, k))
                expected = result.runs["transformers"][-1].tokens
                result.equal &= all(runs[-1].tokens == expected for runs in result.runs.values())
            console.print(f"{task.name}: " + ", ".join(f"{n} {result.median(n):.1f}" for n in SYSTEMS)
                          + f" tok/s decode; {result.tokens_per_pass:.2f} tokens per pass; equal: {result.equal}")
            results.append(result)
        return results, run_sessions(swarm, local, sessions, lookup, min(new_tokens, 32), rounds, console)
    finally:
        if swarm is not None:
            swarm.close()
        for proxy in proxies:
            proxy.stop()
        for node in nodes:
            node.stop()


def marks(delay_ms: float) -> tuple[str, str]:
    """The section's markers in benchmarks.md: one section on loopback, one per simulated delay."""
    name = f"speculate-{delay_ms:g}ms" if delay_ms else "speculate"
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def render_markdown(results: list[TaskResult], lookup: int, new_tokens: int, rounds: int, threads: int,
                    command: str, machine: str, delay_ms: float = 0.0,
                    sessions: list[SessionsResult] | tuple = ()) -> str:
    where = (f"each behind a latency proxy adding {delay_ms:g} ms one way (`potluck proxy`; a pass takes 4 "
             "one-way trips with push)" if delay_ms else "on loopback")
    lines = [
        "## Speculative decoding by prompt lookup (exact)" + (f", {delay_ms:g} ms per hop" if delay_ms else ""),
        "",
        f"- {machine}",
        f"- command: `{command}`",
        f"- settings: SmolLM2-135M-Instruct fp32, greedy, at most {new_tokens} new tokens (EOS ends an answer), "
        f"prompt lookup drafts of up to {lookup} tokens (`prompt_lookup_num_tokens`), 3 node "
        f"processes{',' if delay_ms else ''} {where} "
        f"(0:10, 10:20, 20:30, push, {threads} torch threads each, {threads} here); {rounds} round(s), each running "
        "the four systems in turn on the task; medians over the rounds, ratios taken within each round",
        "",
        "Decode tokens/s counts the tokens after the prompt's pass (which already brings the first token, and "
        "with prompt lookup maybe more) over the time after it, as in the other sections.",
        "",
        "| task | prompt tokens | new tokens | transformers | transformers, lookup | swarm | **swarm, lookup** "
        "| tokens per pass | **swarm lookup vs transformers** | swarm lookup vs transformers lookup | "
        "swarm lookup vs swarm | tokens = transformers' |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.task.name} | {r.prompt_tokens} | {len(r.runs['transformers'][0].tokens)} | "
            + " | ".join(f"{r.median(name):.1f}" if name != "swarm, prompt lookup" else f"**{r.median(name):.1f}**"
                         for name in SYSTEMS)
            + f" | {r.tokens_per_pass:.2f} | **{r.ratio('swarm, prompt lookup', 'transformers'):.2f}x** | "
            f"{r.ratio('swarm, prompt lookup', 'transformers, prompt lookup'):.2f}x | "
            f"{r.ratio('swarm, prompt lookup', 'swarm'):.2f}x | {'yes' if r.equal else '**no**'} |")
    totals = {name: sum(run.total_s for r in results for run in r.runs[name]) for name in SYSTEMS}
    tokens = sum(len(run.tokens) for r in results for run in r.runs["transformers"])
    lines += [
        "",
        "Whole answers, every task and round together (prompt included): "
        + ", ".join(f"{name} {tokens / totals[name]:.1f} tok/s" for name in SYSTEMS)
        + f"; the swarm with prompt lookup {totals['transformers'] / totals['swarm, prompt lookup']:.2f}x "
        f"transformers, {totals['swarm'] / totals['swarm, prompt lookup']:.2f}x the swarm without it.",
        "",
        "Per round, decode tok/s (transformers / transformers lookup / swarm / swarm lookup): "
        + "; ".join(
            f"{r.task.name}: "
            + ", ".join(
                " / ".join(f"{r.runs[name][i].decode_tps:.1f}" for name in SYSTEMS) for i in range(len(r.runs["swarm"]))
            )
            for r in results
        )
        + ".",
        "",
        "How to read it: a pass through the swarm checks the draft and yields one more token, so tokens per pass "
        "is 1 + the draft tokens accepted. When answers repeat the prompt (copying, correcting, answering from "
        "a text) most drafts are right and a pass brings several tokens; on open questions few drafts come up "
        "and the swarm runs as without lookup, at the cost of a slightly longer pass when a draft is wrong. The "
        "output is transformers' greedy output either way (last column, every run).",
    ]
    if sessions:
        lines += [
            "",
            f"Several sessions of one client at once (a thread each calling `generate`, bench-perf's random prompts, "
            f"{min(new_tokens, 32)} new tokens each; {rounds} round(s), the swarm without and with prompt lookup in "
            "turn). A session drafts only while its generate call is the client's only one: with others at once the "
            "nodes' passes already carry a row per session, and drafts would lengthen them for all.",
            "",
            "| sessions | swarm, tok/s in all | swarm, prompt lookup | lookup vs without | tokens = transformers' |",
            "|---:|---:|---:|---:|---|",
        ]
        lines += [f"| {s.sessions} | {s.median('swarm'):.1f} | {s.median('swarm, prompt lookup'):.1f} | "
                  f"{s.ratio:.2f}x | {'yes' if s.equal else '**no**'} |" for s in sessions]
    return "\n".join(lines) + "\n"


def add_speculate_bench_parser(commands) -> None:
    from node.bench.basic import add_output_args

    bench = commands.add_parser("bench-speculate",
                                help="benchmark speculative decoding by prompt lookup: swarm vs transformers")
    bench.add_argument("--model", required=True, help="model folder (config.json + safetensors)")
    bench.add_argument("--lookup", type=int, default=8, help="draft tokens per pass at most (default 8)")
    bench.add_argument("--new-tokens", type=int, default=48, help="new tokens per answer at most (default 48)")
    bench.add_argument("--rounds", type=int, default=3, help="rounds over the four systems (default 3)")
    bench.add_argument("--threads", type=int, default=2, help="torch threads here and per node (default 2)")
    bench.add_argument("--delay-ms", type=float, default=0.0,
                       help="one-way delay a latency proxy adds in front of every node (default 0: loopback); "
                            "written to a section of its own")
    bench.add_argument("--sessions", type=_counts, default=(), metavar="N,N",
                       help="also run this many sessions of one client at once, with and without prompt lookup "
                            "(e.g. 4,8; default: none)")
    add_output_args(bench)


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected session counts like 4,8, got {text!r}")
    return counts


def run_speculate_bench_cli(args: argparse.Namespace) -> None:
    from node.bench.basic import local_model_folder, machine_info, publish

    model = local_model_folder(args.model, "bench-speculate")
    if args.lookup < 1 or args.new_tokens < 2 or args.rounds < 1 or args.threads < 1 or args.delay_ms < 0:
        raise ValueError("need --lookup >= 1, --new-tokens >= 2, --rounds >= 1, --threads >= 1 and --delay-ms >= 0")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    info = machine_info(args.threads)
    results, sessions = run_speculate_bench(model, args.lookup, args.new_tokens, args.rounds, args.threads,
                                            delay_ms=args.delay_ms, sessions=args.sessions)
    machine = (f"date: {started}; machine: {info['cpu']}; torch {info['torch']}, "
               f"transformers {info['transformers']}; load average {info['load']} at start")
    section = render_markdown(results, args.lookup, args.new_tokens, args.rounds, args.threads,
                              shlex.join(["potluck", *sys.argv[1:]]), machine, args.delay_ms, sessions)
    publish(section, args.out, *marks(args.delay_ms))
