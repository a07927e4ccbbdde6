"""`potluck eval`: perplexity of a text through the swarm (client/eval.py), and with --local on this machine."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.wire.contract import WIRE_FORMATS
from node.cli.args import (
    add_logging,
    add_peers_arg,
    add_swarm_args,
    add_trust_args,
    add_verify_args,
    bootstrap_list,
    discovery_options,
    trust_options,
    verify_options,
)
from node.config import ConfigError


def add_eval_parser(commands) -> None:
    parser = commands.add_parser(
        "eval", help="perplexity of a text through the swarm (and, with --local, on this machine)"
    )
    parser.add_argument("--model", required=True, help="model folder, .gguf file or hub id (the one the nodes serve)")
    parser.add_argument("--text", required=True, help="a UTF-8 text file to score")
    add_peers_arg(parser)
    parser.add_argument("--window", type=int, default=512, help="tokens per forward pass (default 512)")
    parser.add_argument("--stride", type=int, default=256, help="tokens between window starts (default 256)")
    parser.add_argument(
        "--max-tokens", type=int, default=0, help="score only the first N tokens of the text (default: all)"
    )
    parser.add_argument("--local", action="store_true",
                        help="also score with plain transformers on this machine (the exact reference) and print the "
                             "difference and the greedy agreement: the share of tokens where both pick the same next "
                             "token (for nodes run with --numerics fast or --quant)")
    parser.add_argument("--wire-dtype", default="float32", choices=WIRE_FORMATS,
                        help="hidden states on the wire (default float32)")
    parser.add_argument("--adapter", default=None, metavar="NAME",
                        help="score with the LoRA adapter the nodes serve as NAME (the swarm side only)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_swarm_args(parser)
    add_trust_args(parser)
    add_verify_args(parser)
    add_logging(parser)


def _local_model(model: str):
    """The same weights in plain transformers (folder, hub id or .gguf file)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()


def run_eval_cli(args: argparse.Namespace) -> None:
    from client.config import ClientConfig
    from client.eval import greedy_agreement, perplexity, window_starts
    from client.model import DistributedModelForCausalLM
    from client.textgen import load_tokenizer
    from common.progress import progress_bar

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
    peers = args.peers
    config = ClientConfig(peers=peers, bootstrap=bootstrap_list(args.bootstrap), **discovery_options(args),
                          mdns=not args.no_mdns,
                          mdns_interface=args.mdns_interface, wire_dtype=args.wire_dtype, adapter=args.adapter,
                          **trust_options(args), **verify_options(args))
    results, greedy = {}, {"swarm": [], "local": []}
    windows = len(window_starts(ids.numel(), args.window, args.stride))
    model = DistributedModelForCausalLM.from_pretrained(args.model, config=config)
    try:
        with progress_bar(sys.stderr.isatty(), "scoring through the swarm", windows) as advance:
            results["swarm"] = perplexity(model, ids, args.window, args.stride, advance, greedy["swarm"])
    finally:
        model.close()
    if args.local:
        local = _local_model(args.model)
        with progress_bar(sys.stderr.isatty(), "scoring locally", windows) as advance:
            results["local"] = perplexity(local, ids, args.window, args.stride, advance, greedy["local"])
    agreement = greedy_agreement(greedy["swarm"], greedy["local"]) if "local" in results else None
    if args.json:
        report = {name: result.as_json() for name, result in results.items()}
        if agreement is not None:
            report["comparison"] = {"perplexity_ratio": results["swarm"].perplexity / results["local"].perplexity,
                                    "greedy_agreement": agreement, "tokens": results["swarm"].tokens}
        print(json.dumps(report))
        return
    for name, result in results.items():
        print(
            f"{name:6s} perplexity {result.perplexity:.4f}  (mean NLL {result.nll:.6f} nats over "
            f"{result.tokens} tokens, "
            f"{result.windows} windows of {args.window}, stride {args.stride})"
        )
    if "local" in results:
        swarm, local = results["swarm"], results["local"]
        print(f"swarm / local perplexity: {swarm.perplexity / local.perplexity:.6f} "
              f"(NLL difference {swarm.nll - local.nll:+.2e} nats)")
        print(f"greedy agreement: {agreement:.4f} (the same next token as local on {round(agreement * swarm.tokens)} "
              f"of {swarm.tokens} tokens)")
