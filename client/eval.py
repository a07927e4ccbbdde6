"""Perplexity over a text, through the swarm or any local causal LM: the quality check to run
before trusting a swarm (quantised nodes, a new family, a node you do not know).

Sliding window, as in transformers' perplexity guide: windows of `window` tokens start every
`stride` tokens; each token is scored once, in the first window that ends after it, with as much
left context as that window gives it. One function for both sides, so a swarm and a local model
are scored by exactly the same arithmetic."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Perplexity:
    nll: float      # mean negative log-likelihood per scored token, in nats
    tokens: int     # tokens scored (every token after the first)
    windows: int    # forward passes made

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    def as_json(self) -> dict:
        return {"perplexity": self.perplexity, "nll": self.nll, "tokens": self.tokens, "windows": self.windows}


def window_starts(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of every window over `length` tokens. Pure; tested directly.

    The first window scores its tokens 1..window-1; each next one ends `stride` tokens later and
    scores only those, so every token keeps at least `window - stride` tokens of context."""
    if window < 2 or not 0 < stride < window:
        raise ValueError(f"need window >= 2 and 0 < stride < window (got window={window}, stride={stride})")
    end = min(window, length)
    spans = [(0, end, 1)]  # the first token has no context: it is never scored
    while end < length:
        first, end = end, min(end + stride, length)
        spans.append((max(0, end - window), end, first))
    return spans


@torch.inference_mode()
def perplexity(model, input_ids: torch.Tensor, window: int = 512, stride: int = 256,
               advance: Callable[[float], None] | None = None) -> Perplexity:
    """Perplexity of `model` (anything called as `model(input_ids=...).logits`) over `input_ids` [tokens] or [1, tokens]."""
    ids = input_ids.reshape(-1).to(torch.long)
    if ids.numel() < 2:
        raise ValueError("the text must have at least 2 tokens")
    total, count, spans = 0.0, 0, window_starts(ids.numel(), window, stride)
    for begin, end, scored in spans:
        logits = model(input_ids=ids[begin:end].unsqueeze(0)).logits[0].float()
        # logits at position p predict token p + 1; score the targets scored..end-1
        predictions = logits[scored - 1 - begin : end - 1 - begin]
        targets = ids[scored:end]
        total += F.cross_entropy(predictions, targets, reduction="sum").item()
        count += targets.numel()
        if advance is not None:
            advance(1)
    return Perplexity(nll=total / count, tokens=count, windows=len(spans))


# -- potluck eval --------------------------------------------------------------------------------
def add_eval_parser(commands) -> None:
    from node.cli import _add_logging, _add_swarm_args, add_trust_args, add_verify_args

    parser = commands.add_parser("eval", help="perplexity of a text through the swarm (and, with --local, on this machine)")
    parser.add_argument("--model", required=True, help="model folder, .gguf file or hub id (the one the nodes serve)")
    parser.add_argument("--text", required=True, help="a UTF-8 text file to score")
    parser.add_argument("--peers", default=None, help="comma-separated HOST:PORT of nodes (default: discover them)")
    parser.add_argument("--window", type=int, default=512, help="tokens per forward pass (default 512)")
    parser.add_argument("--stride", type=int, default=256, help="tokens between window starts (default 256)")
    parser.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens of the text (default: all)")
    parser.add_argument("--local", action="store_true",
                        help="also score with plain transformers on this machine and print the difference")
    parser.add_argument("--wire-dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8"],
                        help="hidden states on the wire (default float32)")
    parser.add_argument("--adapter", default=None, metavar="NAME",
                        help="score with the LoRA adapter the nodes serve as NAME (the swarm side only)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_swarm_args(parser)
    add_trust_args(parser)
    add_verify_args(parser)
    _add_logging(parser)


def _local_model(model: str):
    """The same weights in plain transformers (folder, hub id or .gguf file)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()


def run_eval_cli(args: argparse.Namespace) -> None:
    from pathlib import Path

    from client.config import ClientConfig
    from client.model import DistributedModelForCausalLM
    from client.textgen import load_tokenizer
    from node.cli import ConfigError, bootstrap_list, trust_options, verify_options
    from node.progress import progress_bar

    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--text {args.text}: {error}") from None
    ids = load_tokenizer(args.model)(text, return_tensors="pt").input_ids[0]
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    if ids.numel() < 2:
        raise ConfigError(f"--text {args.text} has fewer than 2 tokens")
    try:
        window_starts(ids.numel(), args.window, args.stride)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    peers = tuple(p.strip() for p in (args.peers or "").split(",") if p.strip())
    config = ClientConfig(peers=peers, bootstrap=bootstrap_list(args.bootstrap), mdns=not args.no_mdns,
                          mdns_interface=args.mdns_interface, wire_dtype=args.wire_dtype, adapter=args.adapter,
                          **trust_options(args), **verify_options(args))
    results = {}
    windows = len(window_starts(ids.numel(), args.window, args.stride))
    model = DistributedModelForCausalLM.from_pretrained(args.model, config=config)
    try:
        with progress_bar(sys.stderr.isatty(), "scoring through the swarm", windows) as advance:
            results["swarm"] = perplexity(model, ids, args.window, args.stride, advance)
    finally:
        model.close()
    if args.local:
        local = _local_model(args.model)
        with progress_bar(sys.stderr.isatty(), "scoring locally", windows) as advance:
            results["local"] = perplexity(local, ids, args.window, args.stride, advance)
    if args.json:
        print(json.dumps({name: result.as_json() for name, result in results.items()}))
        return
    for name, result in results.items():
        print(f"{name:6s} perplexity {result.perplexity:.4f}  (mean NLL {result.nll:.6f} nats over {result.tokens} tokens, "
              f"{result.windows} windows of {args.window}, stride {args.stride})")
    if "local" in results:
        swarm, local = results["swarm"], results["local"]
        print(f"swarm / local perplexity: {swarm.perplexity / local.perplexity:.6f} "
              f"(NLL difference {swarm.nll - local.nll:+.2e} nats)")
