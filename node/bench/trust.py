"""`potluck bench-trust`: what a private swarm and TLS cost in decode speed, measured in one run.

Three chains of real node processes serve the same model side by side: plaintext, with a swarm key,
and with a swarm key and automatic TLS. Rounds alternate between them (the machine's speed drifts),
and each round's ratio to plaintext is kept; the table gives the medians."""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from rich.console import Console

MARK_START = "<!-- bench:trust:start -->"
MARK_END = "<!-- bench:trust:end -->"
PROMPT = "The history of the printing press begins"


@dataclass(frozen=True)
class Mode:
    name: str
    swarm_key: bool
    tls: str


MODES = (Mode("plaintext", False, "off"), Mode("swarm key", True, "off"), Mode("swarm key + TLS (auto)", True, "auto"))


@dataclass
class TrustResult:
    command: str
    model: str
    nodes: int
    new_tokens: int
    rounds: int
    ms_per_token: dict[str, list[float]] = field(default_factory=dict)
    identical: dict[str, bool] = field(default_factory=dict)

    def median(self, mode: str) -> float:
        return statistics.median(self.ms_per_token[mode])

    def ratio(self, mode: str) -> float:
        """Median over rounds of (plaintext ms / this mode's ms) in the same round: > 1 is faster."""
        base = self.ms_per_token[MODES[0].name]
        return statistics.median(b / m for b, m in zip(base, self.ms_per_token[mode]))


def run_trust_bench(model: Path, nodes: int = 3, new_tokens: int = 32, rounds: int = 3, threads: int = 0,
                    command: str = "", console: Console | None = None) -> TrustResult:
    from transformers import AutoConfig, AutoTokenizer

    from client.model import DistributedModelForCausalLM
    from common.wire.security import SwarmKey
    from node.bench.chains import alternate_rounds, decode_ms, stop_chains
    from node.launcher import start_chain

    console = console or Console(stderr=True)
    num_layers = AutoConfig.from_pretrained(model).num_hidden_layers
    key_file = Path(tempfile.mkdtemp(prefix="potluck-bench-trust-")) / "swarm.key"
    SwarmKey.generate().write(key_file)
    result = TrustResult(command=command, model=model.name, nodes=nodes, new_tokens=new_tokens, rounds=rounds)
    chains, clients = {}, {}
    try:
        for mode in MODES:
            extra = ("--no-mdns", "--tls", mode.tls) + (("--swarm-key", str(key_file)) if mode.swarm_key else ())
            console.print(f"starting {nodes} nodes: {mode.name}")
            chains[mode.name] = start_chain(model, num_layers, nodes, threads=threads, extra_args=extra)
            clients[mode.name] = DistributedModelForCausalLM.from_pretrained(
                str(model), [n.address for n in chains[mode.name]], mdns=False,
                swarm_key=str(key_file) if mode.swarm_key else None, tls=mode.tls)
        ids = AutoTokenizer.from_pretrained(model)(PROMPT, return_tensors="pt").input_ids
        measures = {mode.name: partial(decode_ms, clients[mode.name], ids, new_tokens, exact_length=False)
                    for mode in MODES}
        result.ms_per_token, outputs = alternate_rounds(measures, rounds, console)
        base = outputs[0][MODES[0].name]  # the first round's tokens
        result.identical = {name: torch.equal(out, base) for name, out in outputs[0].items()}
    finally:
        stop_chains(clients, chains)
    return result


def render_markdown(result: TrustResult) -> str:
    lines = [
        "## Trust: what a private swarm and TLS cost",
        "",
        f"Command: `{result.command}`",
        "",
        f"{result.model}, {result.nodes} node processes per chain on this machine's loopback, greedy decode of "
        f"{result.new_tokens} tokens with push; {result.rounds} rounds alternating between the chains, ratios "
        "taken within each round (medians shown).",
        "",
        "| mode | ms per token | speed vs plaintext | tokens equal to plaintext |",
        "|---|---|---|---|",
    ]
    for mode in MODES:
        lines.append(f"| {mode.name} | {result.median(mode.name):.1f} | {result.ratio(mode.name):.2f}x | "
                     f"{'yes' if result.identical[mode.name] else 'no'} |")
    lines += [
        "",
        "A swarm key adds an HMAC token per call (one per session stream, one per pushed step) and a nonce "
        "lookup on the node; TLS adds encryption of every message on every hop. Per-token costs here are "
        "within the machine's noise unless the ratio is clearly below 1.",
    ]
    return "\n".join(lines) + "\n"


def add_trust_bench_parser(commands) -> None:
    from node.bench.basic import add_output_args
    from node.bench.chains import add_chain_bench_args

    bench = commands.add_parser("bench-trust", help="benchmark the cost of a swarm key and TLS on decode speed")
    add_chain_bench_args(bench)
    add_output_args(bench)


def run_trust_bench_cli(args: argparse.Namespace) -> None:
    from node.bench.basic import publish
    from node.bench.chains import chain_bench_model

    model = chain_bench_model(args, "bench-trust")
    result = run_trust_bench(model, args.nodes, args.new_tokens, args.rounds, args.threads,
                             command=shlex.join(["potluck", *sys.argv[1:]]))
    section = render_markdown(result)
    publish(section, args.out, MARK_START, MARK_END)
