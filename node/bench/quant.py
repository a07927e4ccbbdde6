"""`potluck bench-quant`: what `--quant int8|nf4` saves and costs, per model family, beside exact compact weights.

Modes: `none` (dense float32, `--no-exact`), `exact` (the float32 values held in the narrow form they are exact in,
common/weights/exact.py: a node's default; dense where there is none), `int8`, `nf4`.

For each model (the given folder, plus tiny random Mixtral and Qwen2 models built here) and each mode:
- memory per layer: what placement counts (`bytes_per_layer`) and what a loaded, quantised span holds;
- decode tokens/s of the whole model as one span in this process (no network: the kernels' speed);
- perplexity of node/bench/eval-text.txt through a swarm of two node processes started with `--quant`, against
  the unquantised model in plain transformers on this machine (client/eval.py, the same sliding window)."""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

MARK_START = "<!-- bench:quant:start -->"
MARK_END = "<!-- bench:quant:end -->"
MODES = ("none", "exact", "int8", "nf4")
TINY_FAMILIES = ("mixtral", "qwen2")
NOTES = (
    "Notes: Mixtral's experts are fused 3-D parameters and stay float (only attention is quantised: 0.92x of the "
    "float bytes). int8 decodes faster than float32 here because torch's int8 kernel runs in bfloat16 for "
    "decode-sized products (docs/quantization.md); nf4 on CPU dequantises every matrix for every product, so it "
    "decodes several times slower. The machine is shared: decode speeds vary by tens of percent between runs; "
    "perplexities are deterministic. The random tiny models' ratios below 1 are noise, not a gain. `exact` changes "
    "no weight: a matrix is held narrow only if every value survives bit for bit (the random tiny models' float32 "
    "values do not, so theirs stay dense), and its perplexity is the float model's."
)

EVAL_TEXT = Path(__file__).with_name("eval-text.txt")  # what bench-quant scores by default


@dataclass
class QuantRow:
    model: str
    family: str
    mode: str
    counted_bytes: int      # bytes_per_layer: what placement uses
    held_bytes: float       # a loaded span's weight bytes / its layers
    decode_tps: float       # tokens/s, whole model as one span, this process
    swarm_ppl: float        # through two node processes with --quant
    local_ppl: float        # plain transformers, float32


def tiny_model(family: str, folder: Path) -> Path:
    """A tiny random model of `family` (hidden 256, 4 layers, vocab 512), saved to `folder`."""
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2Config

    common = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  tie_word_embeddings=False)
    config = MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2) if family == "mixtral" \
        else Qwen2Config(**common)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder


def _quant(mode: str) -> str:
    """The `--quant` mode a bench mode runs with (exact weights are float32 weights)."""
    return "none" if mode == "exact" else mode


def _span(folder: Path, mode: str):
    from common.weights.fast_linear import transpose_linears
    from common.weights.files import ModelFiles
    from node.model.compact import exact_span
    from node.model.loader import load_span
    from node.model.quant import quantize_span

    files = ModelFiles.open(str(folder))
    span, _ = load_span(files, 0, files.config().num_hidden_layers, torch.device("cpu"), torch.float32)
    if _quant(mode) == "none":
        transpose_linears(span)  # as a CPU node does
    span.make_lean()
    quantize_span(span, _quant(mode))
    if mode == "exact":
        exact_span(span)
    return span


@torch.inference_mode()
def decode_speeds(spans: dict, hidden_size: int, steps: int = 16, rounds: int = 3) -> dict[str, float]:
    """Tokens/s of one-token steps after a 16-token prefill, per span: rounds alternate between the spans and
    each keeps its best round (the machine is shared: load that comes and goes hits every mode alike)."""
    torch.manual_seed(0)
    x = torch.randn(1, 17, hidden_size) * 0.1
    best = dict.fromkeys(spans, 0.0)
    for _ in range(rounds):
        for mode, span in spans.items():
            cache = span.new_cache(1, 64)
            span(x[:, :16], torch.arange(16)[None], cache=cache)
            span(x[:, 16:], torch.tensor([[16]]), cache=cache)  # warm up
            started = time.perf_counter()
            for step in range(steps):
                span(x[:, 16:], torch.tensor([[17 + step]]), cache=cache)
            best[mode] = max(best[mode], steps / (time.perf_counter() - started))
    return best


def swarm_perplexity(folder: Path, mode: str, ids: torch.Tensor, window: int, stride: int, layers: int) -> float:
    from client.config import ClientConfig
    from client.eval import perplexity
    from client.model import DistributedModelForCausalLM
    from node.launcher import NodeProcess

    half = layers // 2
    flags = ("--no-mdns", "--throughput", "20", "--quant", _quant(mode), *(("--no-exact",) if mode == "none" else ()))
    nodes = [NodeProcess(folder, a, b, threads=1, extra_args=flags).start() for a, b in ((0, half), (half, layers))]
    try:
        peers = tuple(node.wait_ready() for node in nodes)
        model = DistributedModelForCausalLM.from_pretrained(str(folder), config=ClientConfig(peers=peers, mdns=False))
        try:
            return perplexity(model, ids, window, stride).perplexity
        finally:
            model.close()
    finally:
        for node in nodes:
            node.stop()


def run_quant_bench(model: Path, text: str, window: int = 256, stride: int = 128,
                    console: Console | None = None) -> list[QuantRow]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from client.eval import perplexity
    from common.weights.files import ModelFiles
    from node.model.loader import bytes_per_layer
    from node.model.quant import weight_bytes

    console = console or Console(stderr=True)
    text_ids = AutoTokenizer.from_pretrained(model)(text, return_tensors="pt").input_ids[0]
    rows: list[QuantRow] = []
    with tempfile.TemporaryDirectory(prefix="potluck-bench-quant-") as scratch:
        folders = [(model.name, model)] + [(f"tiny {f}", tiny_model(f, Path(scratch) / f)) for f in TINY_FAMILIES]
        for name, folder in folders:
            config = ModelFiles.open(str(folder)).config()
            ids = text_ids % config.vocab_size  # the tiny models' vocabularies are smaller: ids folded into them
            reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            local = perplexity(reference, ids, window, stride).perplexity
            del reference
            spans = {mode: _span(folder, mode) for mode in MODES}
            layers = config.num_hidden_layers
            held = {mode: weight_bytes(span) / layers for mode, span in spans.items()}
            speeds = decode_speeds(spans, config.hidden_size)
            del spans
            for mode in MODES:
                swarm = swarm_perplexity(folder, mode, ids, window, stride, layers)
                rows.append(
                    QuantRow(
                        name,
                        config.model_type,
                        mode,
                        bytes_per_layer(config, torch.float32, _quant(mode)),
                        held[mode],
                        speeds[mode],
                        swarm,
                        local,
                    )
                )
                console.print(f"{name} {mode}: {held[mode] / 1e6:.2f} MB/layer, {speeds[mode]:.1f} tok/s, perplexity "
                              f"{swarm:.4f} (local float {local:.4f})")
    return rows


def render_markdown(rows: list[QuantRow], tokens: int, window: int, stride: int, threads: int, command: str) -> str:
    lines = [
        "## Quantised weights (`--quant`)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; command: `{command}`",
        "- memory per layer: *counted* is `bytes_per_layer(config, float32, quant)`, what placement divides the "
        "budget by; *held* is a loaded span's weight bytes (node/model/quant.py `weight_bytes`) per layer.",
        f"- decode: the whole model as one span in this process, {threads} torch thread(s), one token a step after "
        "a 16-token prefill; 3 rounds of 16 steps alternating between the modes, the best round of each (no "
        "network; the lean runtime where the family has one).",
        f"- perplexity: node/bench/eval-text.txt ({tokens} tokens), window {window}, stride {stride} (client/eval.py), "
        "through two node processes each serving half the layers with `--quant`, against the float32 model in "
        "plain transformers. The tiny models are random (their perplexity is near their 512-token vocabulary); "
        "only the ratio means something there.",
        "",
        "| model | family | quant | counted MB/layer | held MB/layer | vs float | decode tok/s | swarm perplexity | "
        "local float32 | ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {row.model: row for row in rows if row.mode == "none"}
    for row in rows:
        lines.append(
            f"| {row.model} | {row.family} | {row.mode} | {row.counted_bytes / 1e6:.3f} | {row.held_bytes / 1e6:.3f} | "
            f"{row.held_bytes / base[row.model].held_bytes:.3f} | {row.decode_tps:.1f} | {row.swarm_ppl:.4f} | "
            f"{row.local_ppl:.4f} | {row.swarm_ppl / row.local_ppl:.4f} |")
    lines += ["", NOTES]
    return "\n".join(lines) + "\n"


def add_quant_bench_parser(commands) -> None:
    from node.bench.basic import add_output_args

    bench = commands.add_parser(
        "bench-quant", help="benchmark --quant int8/nf4: memory per layer, decode speed, perplexity"
    )
    bench.add_argument("--model", required=True, help="model folder (config.json + safetensors)")
    bench.add_argument("--text", default=str(EVAL_TEXT), help="text to score (default node/bench/eval-text.txt)")
    bench.add_argument("--window", type=int, default=256, help="tokens per scored window (default 256)")
    bench.add_argument("--stride", type=int, default=128, help="tokens between windows (default 128)")
    bench.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the in-process decode (default 1: on a shared machine more threads spin)",
    )
    add_output_args(bench)


def run_quant_bench_cli(args: argparse.Namespace) -> None:
    from node.bench.basic import local_model_folder, publish

    model = local_model_folder(args.model, "bench-quant")
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"--text {args.text}: {error.strerror or error}") from None
    torch.set_num_threads(args.threads)
    rows = run_quant_bench(model, text, args.window, args.stride)
    from transformers import AutoTokenizer

    tokens = len(AutoTokenizer.from_pretrained(model)(text).input_ids)
    section = render_markdown(rows, tokens, args.window, args.stride, args.threads,
                              shlex.join(["potluck", *sys.argv[1:]]))
    publish(section, args.out, MARK_START, MARK_END)
