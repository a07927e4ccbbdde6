"""`potluck generate`: text through a chain of nodes, streamed to the terminal (or as JSON)."""

from __future__ import annotations

import argparse
import json
import sys

from node.cli.args import (
    add_generation_args,
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


def add_generate_parser(commands) -> None:
    generate = commands.add_parser("generate", help="generate text through a chain of nodes")
    generate.add_argument("--model", required=True, help="model folder, .gguf file or hub id (the one the nodes serve)")
    add_peers_arg(generate)
    add_swarm_args(generate)
    add_trust_args(generate)
    add_verify_args(generate)
    add_generation_args(generate)
    generate.add_argument("--json", action="store_true", help='print {"text": ..., "token_ids": [...]} at the end')
    generate.add_argument("--no-push", action="store_true",
                          help="send every hop its step from the client (default: nodes forward steps along the chain)")
    generate.add_argument(
        "--prefill-chunk",
        type=int,
        default=0,
        help="pipeline prompts of 2x this many tokens or more down the chain in chunks (default 0: off)",
    )
    generate.add_argument("--adapter", default=None, metavar="NAME",
                          help="run with the LoRA adapter the nodes serve as NAME (potluck join --adapter NAME=PATH); "
                               "default: the base model")
    generate.add_argument(
        "--prompt-weights",
        default=None,
        metavar="FILE",
        help="generate with a soft prompt trained by `potluck finetune --method ptune` (docs/finetune.md)",
    )
    add_logging(generate)


def run_generate(args: argparse.Namespace) -> None:
    from client.finetune import apply_prompts, read_prompts
    from client.model import DistributedModelForCausalLM
    from client.textgen import generate_text, load_tokenizer

    peers = args.peers
    prompts = read_prompts(args.prompt_weights) if args.prompt_weights else None  # a wrong file: said before dialing
    model = DistributedModelForCausalLM.from_pretrained(args.model, config=client_config(args, peers))
    try:
        if prompts is not None:
            apply_prompts(model, prompts, args.prompt_weights)
        tokenizer = load_tokenizer(args.model)
        result = generate_text(
            model, tokenizer, args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=args.stop,
            out=None if args.json else sys.stdout, prompt_lookup=args.prompt_lookup,
        )
    finally:
        model.close()
    if args.json:
        print(json.dumps(result.as_json()))
    else:
        passes = f" in {result.passes} passes" if args.prompt_lookup and result.passes else ""
        print(
            f"\n[{len(result.token_ids)} tokens{passes}, {result.decode_tokens_per_s:.1f} tokens/s decode]",
            file=sys.stderr,
        )


def client_config(args: argparse.Namespace, peers: tuple[str, ...]):
    from client.config import ClientConfig

    return ClientConfig(peers=tuple(peers), bootstrap=bootstrap_list(args.bootstrap), **discovery_options(args),
                          mdns=not args.no_mdns,
                        mdns_interface=args.mdns_interface, wire_dtype=args.wire_dtype, push=not args.no_push,
                        prefill_chunk=args.prefill_chunk, adapter=getattr(args, "adapter", None), **trust_options(args),
                        **verify_options(args))
