"""`potluck bench-prefill`: a long prompt in one step vs pipelined in chunks, through 3 node processes.

With push, chunk c+1 starts on node 1 while node 2 computes chunk c; the gain depends on the nodes
having their own cores (here they share this machine's, so the run is made with 1 and with 2 torch
threads per node). Rounds alternate between the clients; ratios are taken within each round."""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

MARK_START = "<!-- bench:prefill:start -->"
MARK_END = "<!-- bench:prefill:end -->"


@dataclass
class PrefillRow:
    threads: int
    chunk: int
    seconds: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # one-step seconds / these seconds, per round
    first_token_equal: bool = True


def run_prefill_bench(model: Path, tokens: int = 512, chunks: tuple[int, ...] = (128, 64), rounds: int = 3,
                      thread_counts: tuple[int, ...] = (1, 2), console: Console | None = None) -> list[PrefillRow]:
    from transformers import AutoModelForCausalLM

    from client.config import ClientConfig
    from client.model import DistributedModelForCausalLM
    from node.bench.basic import prompt_ids, timed_generate
    from node.launcher import start_chain

    console = console or Console(stderr=True)
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ids = prompt_ids(reference.config, tokens, 7)
    expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)[0, -1]
    layers = reference.config.num_hidden_layers
    del reference
    rows: list[PrefillRow] = []
    for threads in thread_counts:
        console.print(f"3 nodes, {threads} torch thread(s) each")
        nodes = start_chain(model, layers, 3, threads=threads, extra_args=("--no-mdns",))
        clients = {}
        try:
            peers = tuple(n.address for n in nodes)
            for chunk in (0, *chunks):
                clients[chunk] = DistributedModelForCausalLM.from_pretrained(
                    str(model), config=ClientConfig(peers=peers, prefill_chunk=chunk))
                timed_generate(clients[chunk], ids[:, :32], 2)  # warm up
            table = {chunk: PrefillRow(threads, chunk) for chunk in clients}
            for round_ in range(rounds):
                for chunk, client in clients.items():
                    run = timed_generate(client, ids, 2)
                    table[chunk].seconds.append(run.prefill_s)
                    out = client.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
                    table[chunk].first_token_equal &= bool(out[0, -1] == expected)
                for chunk in clients:
                    table[chunk].ratios.append(table[0].seconds[-1] / table[chunk].seconds[-1])
                console.print(f"round {round_ + 1}: " + ", ".join(
                    f"chunk {c or 'none'} {table[c].seconds[-1]:.2f} s" for c in clients))
            rows.extend(table.values())
        finally:
            for client in clients.values():
                client.close()
            for node in nodes:
                node.stop()
    return rows


def render_markdown(rows: list[PrefillRow], tokens: int, command: str) -> str:
    lines = [
        "## Pipelined prefill",
        "",
        f"Command: `{command}`",
        "",
        f"A {tokens}-token prompt through 3 node processes on this 2-core machine's loopback (push on): one step "
        "per hop, or chunks that follow each other down the chain. Medians over rounds; the speed-up is "
        "taken within each round.",
        "",
        "| torch threads per node | chunk | prefill seconds | speed-up vs one step | first token equals transformers |",
        "|---:|---|---:|---:|---|",
    ]
    for row in rows:
        lines.append(f"| {row.threads} | {row.chunk or 'one step'} | {statistics.median(row.seconds):.2f} | "
                     f"{statistics.median(row.ratios):.2f}x | {'yes' if row.first_token_equal else 'no'} |")
    lines += [
        "",
        "Pipelining overlaps the nodes' compute; it pays where nodes have their own hardware. Here three nodes "
        "share two cores: with one thread per node two of them can compute at once, with two threads each "
        "they mostly take turns, so the second block shows what the chunking itself costs.",
    ]
    return "\n".join(lines) + "\n"


def add_prefill_bench_parser(commands) -> None:
    from node.bench.basic import add_output_args

    bench = commands.add_parser("bench-prefill", help="benchmark pipelined (chunked) prefill against one step")
    bench.add_argument("--model", required=True, help="model folder (config.json + safetensors)")
    bench.add_argument("--tokens", type=int, default=512, help="prompt length (default 512)")
    bench.add_argument("--rounds", type=int, default=3, help="rounds alternating between the clients (default 3)")
    add_output_args(bench)


def run_prefill_bench_cli(args: argparse.Namespace) -> None:
    from node.bench.basic import local_model_folder, publish

    model = local_model_folder(args.model, "bench-prefill")
    if args.tokens < 16 or args.rounds < 1:
        raise ValueError("need --tokens >= 16 and --rounds >= 1")
    rows = run_prefill_bench(model, args.tokens, rounds=args.rounds)
    section = render_markdown(rows, args.tokens, shlex.join(["potluck", *sys.argv[1:]]))
    publish(section, args.out, MARK_START, MARK_END)
