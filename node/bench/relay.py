"""`potluck bench-relay`: decode speed through a relay against direct connections, in one run.

Two chains of real node processes serve the same model side by side on this machine's loopback: one
dialed directly, one whose every node serves through a relay (`--relay-via`, so every hop and every
pushed step crosses the relay: the worst case). Rounds alternate between them (the machine's speed
drifts) and each round's ratio is kept; the table gives the medians."""

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

MARK_START = "<!-- bench:relay:start -->"
MARK_END = "<!-- bench:relay:end -->"
PROMPT = "The history of the printing press begins"
MODES = ("direct", "through a relay")


@dataclass
class RelayResult:
    command: str
    model: str
    nodes: int
    new_tokens: int
    rounds: int
    ms_per_token: dict[str, list[float]] = field(default_factory=dict)
    identical: bool = False

    def median(self, mode: str) -> float:
        return statistics.median(self.ms_per_token[mode])

    def tokens_per_s(self, mode: str) -> float:
        return 1000.0 / self.median(mode)

    def ratio(self) -> float:
        """Median over rounds of (direct ms / relayed ms): below 1 is slower through the relay."""
        return statistics.median(d / r for d, r in zip(*(self.ms_per_token[m] for m in MODES)))


def run_relay_bench(model: Path, nodes: int = 3, new_tokens: int = 32, rounds: int = 3, threads: int = 0,
                    command: str = "", console: Console | None = None) -> RelayResult:
    from transformers import AutoConfig, AutoTokenizer

    from client.model import DistributedModelForCausalLM
    from node.bench.chains import alternate_rounds, decode_ms, stop_chains
    from node.launcher import NodeProcess, start_chain

    console = console or Console(stderr=True)
    num_layers = AutoConfig.from_pretrained(model).num_hidden_layers
    result = RelayResult(command=command, model=model.name, nodes=nodes, new_tokens=new_tokens, rounds=rounds)
    relay, chains, clients = None, {}, {}
    try:
        console.print("starting the relay")
        relay = NodeProcess(model, 0, 1, threads=1, extra_args=("--no-mdns", "--relay", "--throughput", "1")).start()
        relay.wait_ready(180)
        for mode, extra in zip(MODES, [(), ("--relay-via", relay.address)]):
            console.print(f"starting {nodes} nodes: {mode}")
            chains[mode] = start_chain(model, num_layers, nodes, threads=threads, extra_args=("--no-mdns", *extra))
            clients[mode] = DistributedModelForCausalLM.from_pretrained(str(model), [n.address for n in chains[mode]],
                                                                        mdns=False)
        try:
            ids = AutoTokenizer.from_pretrained(model)(PROMPT, return_tensors="pt").input_ids
        except (OSError, ValueError):  # a model folder without a tokenizer (the tiny random model)
            ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
        measures = {mode: partial(decode_ms, clients[mode], ids, new_tokens) for mode in MODES}
        result.ms_per_token, outputs = alternate_rounds(measures, rounds, console)
        result.identical = torch.equal(*(outputs[-1][m] for m in MODES))
    finally:
        stop_chains(clients, chains)
        if relay is not None:
            relay.stop()
    return result


def tiny_model(folder: Path) -> Path:
    """A tiny random Llama (6 layers, hidden size 64): compute is negligible, so transport dominates."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder


def render_markdown(results: list[RelayResult]) -> str:
    direct, relayed = MODES
    first = results[0]
    lines = [
        "## Relays: decode speed through a relay (issue 10)",
        "",
        f"Command: `{first.command}`",
        "",
        f"{first.nodes} node processes per chain on this machine's loopback, greedy decode of {first.new_tokens} "
        "tokens with push; in the relayed chain every node serves through one relay (`--relay-via`), so every "
        f"hop and every pushed step crosses it. {first.rounds} rounds alternating between the chains, ratios "
        "taken within each round (medians shown). The tiny random model's compute is negligible: its row shows "
        "what the relay itself costs per token.",
        "",
        "| model | mode | ms per token | tokens/s | speed vs direct | tokens equal to direct |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        lines += [
            f"| {result.model} | {direct} | {result.median(direct):.1f} | {result.tokens_per_s(direct):.1f} | "
            "1.00x | yes |",
            f"| {result.model} | {relayed} | {result.median(relayed):.1f} | {result.tokens_per_s(relayed):.1f} | "
            f"{result.ratio():.2f}x | {'yes' if result.identical else 'no'} |",
        ]
    lines += [
        "",
        "On loopback the relay adds one more process to cross per hop (two socket copies and a gRPC frame each "
        "way) but no network delay; across the internet add the relay's round trip to every relayed hop. The "
        "machine is shared: differences within a few percent are noise.",
    ]
    return "\n".join(lines) + "\n"


def add_relay_bench_parser(commands) -> None:
    from node.bench.basic import add_output_args
    from node.bench.chains import add_chain_bench_args

    bench = commands.add_parser("bench-relay", help="benchmark decode speed through a relay against direct")
    add_chain_bench_args(bench)
    bench.add_argument("--no-tiny", action="store_true",
                       help="skip the second run on a tiny random model (the relay's own cost per token)")
    add_output_args(bench)


def run_relay_bench_cli(args: argparse.Namespace) -> None:
    from node.bench.basic import publish
    from node.bench.chains import chain_bench_model

    model = chain_bench_model(args, "bench-relay")
    command = shlex.join(["potluck", *sys.argv[1:]])
    models = [model]
    if not args.no_tiny:
        models.append(tiny_model(Path(tempfile.mkdtemp(prefix="potluck-bench-relay-")) / "tiny-random-llama"))
    results = [run_relay_bench(m, args.nodes, args.new_tokens, args.rounds, args.threads, command=command)
               for m in models]
    publish(render_markdown(results), args.out, MARK_START, MARK_END)
