"""`potluck` command line: join, generate, demo, bench, prepare-model.

The only place that reads argv and configures logging."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from node.config import ConfigError, NodeConfig, parse_blocks
from node.model.loader import ModelLoadError

log = logging.getLogger("potluck")

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _add_logging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="potluck", description="Peer-to-peer LLM inference on pooled hardware.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    join = commands.add_parser("join", help="serve a span of a model's layers")
    join.add_argument("--model", required=True, help="model folder or hub id (org/name)")
    join.add_argument("--blocks", required=True, help="layers to serve, START:END (half-open), e.g. 0:10")
    join.add_argument("--host", default="127.0.0.1", help="address to bind and advertise (default 127.0.0.1)")
    join.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (default)")
    join.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps (default auto)")
    join.add_argument("--dtype", default="auto", choices=DTYPES, help="compute dtype (auto: fp32 on CPU, bf16 on GPU)")
    join.add_argument("--max-length", type=_positive, default=8192, help="longest session in tokens (default 8192)")
    join.add_argument("--cache-tokens", type=_positive, default=65536, help="KV cache budget in tokens (default 65536)")
    join.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    join.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    join.add_argument("--node-id", default="", help="a name for this node (default host:port)")
    _add_logging(join)

    generate = commands.add_parser("generate", help="generate text through a chain of nodes")
    generate.add_argument("--model", required=True, help="model folder or hub id (the one the nodes serve)")
    generate.add_argument("--peers", required=True, help="comma-separated HOST:PORT of nodes")
    _add_generation_args(generate)
    generate.add_argument("--json", action="store_true", help='print {"text": ..., "token_ids": [...]} at the end')
    _add_logging(generate)

    demo = commands.add_parser("demo", help="start a local 3-node swarm on the embedded model and chat through it")
    demo.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    demo.add_argument("--nodes", type=_positive, default=3, help="number of node processes (default 3)")
    demo.add_argument("--threads", type=int, default=0, help="torch threads per node (default: cores / nodes)")
    _add_generation_args(demo, default_prompt="What is the capital of France?", chat_default=True)
    _add_logging(demo)

    prepare = commands.add_parser("prepare-model", help="write the embedded SmolLM2 model as a safetensors folder")
    prepare.add_argument("--out", default=None, help="folder to write (default ~/.cache/potluck/models/...)")
    _add_logging(prepare)

    from node.bench import add_bench_parser

    add_bench_parser(commands)
    return parser


def _add_generation_args(parser: argparse.ArgumentParser, default_prompt: str | None = None, chat_default: bool = False) -> None:
    parser.add_argument("--prompt", required=default_prompt is None, default=default_prompt, help="the prompt text")
    parser.add_argument("--chat", action="store_true", default=chat_default, help="wrap the prompt in the chat template")
    parser.add_argument("--max-new-tokens", type=_positive, default=64, help="tokens to generate at most (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); >0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--stop", action="append", default=None, help="stop when this string appears (repeatable)")
    parser.add_argument("--wire-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of activations on the wire (default float32)")


def _join(args: argparse.Namespace) -> None:
    from node.server import run_node

    start, end = parse_blocks(args.blocks)
    config = NodeConfig(
        model=args.model, start=start, end=end, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
        max_length=args.max_length, cache_tokens=args.cache_tokens, threads=args.threads, revision=args.revision,
        node_id=args.node_id,
    )
    asyncio.run(run_node(config))


def _generate(args: argparse.Namespace) -> None:
    from client.model import DistributedModelForCausalLM
    from client.textgen import generate_text, load_tokenizer

    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    model = DistributedModelForCausalLM.from_pretrained(args.model, peers=peers, wire_dtype=args.wire_dtype)
    try:
        tokenizer = load_tokenizer(args.model)
        result = generate_text(
            model, tokenizer, args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=args.stop,
            out=None if args.json else sys.stdout,
        )
    finally:
        model.close()
    if args.json:
        print(json.dumps(result.as_json()))
    else:
        print(f"\n[{len(result.token_ids)} tokens, {result.decode_tokens_per_s:.1f} tokens/s decode]", file=sys.stderr)


def _prepare(args: argparse.Namespace) -> None:
    from pathlib import Path

    from node.model.embedded import DEFAULT_DIR, prepare_embedded_model

    print(prepare_embedded_model(Path(args.out) if args.out else DEFAULT_DIR))


def _demo(args: argparse.Namespace) -> None:
    from node.demo import run_demo

    run_demo(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    handlers = {"join": _join, "generate": _generate, "demo": _demo, "prepare-model": _prepare}
    from node.bench import run_bench

    handlers["bench"] = run_bench
    from client.routing import MissingLayersError
    from client.transport import PeerError
    from node.launcher import NodeStartError

    try:
        handlers[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (ConfigError, ModelLoadError, PeerError, MissingLayersError, NodeStartError, NotImplementedError, ValueError) as error:
        print(f"potluck {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
