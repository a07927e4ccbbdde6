"""`potluck` command line: join, generate, status, demo, eval, finetune, api, doctor, bench*, prepare-model.

The only place that reads argv and configures logging."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import sys

from node.cli_args import (_add_logging, _add_swarm_args, _non_negative, _positive, add_trust_args, bootstrap_list,
                           trust_options)
from node.config import ConfigError
from node.join_cli import _add_join_args, _join, join_args

log = logging.getLogger("potluck")

DEVICES = ("auto", "cpu", "cuda", "mps")


# Commands defined in their own modules: (module, function adding their parsers, {command: handler}).
_MODULE_COMMANDS = (
    ("node.bench", "add_bench_parser", {"bench": "run_bench"}),
    ("node.bench_perf", "add_perf_bench_parser", {"bench-perf": "run_perf_bench_cli"}),
    ("node.bench_swarm", "add_swarm_bench_parser", {"bench-swarm": "run_swarm_bench_cli"}),
    ("node.bench_recovery", "add_recovery_bench_parser", {"bench-recovery": "run_recovery_bench_cli"}),
    ("node.bench_wire", "add_wire_bench_parser", {"bench-wire": "run_wire_bench_cli"}),
    ("node.latency_proxy", "add_proxy_parser", {"proxy": "run_proxy_cli"}),
    ("node.bench_trust", "add_trust_bench_parser", {"bench-trust": "run_trust_bench_cli"}),
    ("node.bench_relay", "add_relay_bench_parser", {"bench-relay": "run_relay_bench_cli"}),
    ("node.bench_soak", "add_soak_bench_parser", {"bench-soak": "run_soak_bench_cli"}),
    ("node.bench_prefill", "add_prefill_bench_parser", {"bench-prefill": "run_prefill_bench_cli"}),
    ("node.bench_quant", "add_quant_bench_parser", {"bench-quant": "run_quant_bench_cli"}),
    ("node.bench_compile", "add_compile_bench_parser", {"bench-compile": "run_compile_bench_cli"}),
    ("node.bench_speculate", "add_speculate_bench_parser", {"bench-speculate": "run_speculate_bench_cli"}),
    ("client.api", "add_api_parser", {"api": "run_api_cli", "dashboard": "run_api_cli"}),
    ("node.doctor", "add_doctor_parser", {"doctor": "run_doctor_cli"}),
    ("client.eval", "add_eval_parser", {"eval": "run_eval_cli"}),
    ("client.finetune", "add_finetune_parser", {"finetune": "run_finetune_cli"}),
)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser; with `command`, the commands defined in other modules (benchmarks, api, ...)
    other than that one get an empty parser, so `potluck join` does not import them (~1.5 s a process)."""
    parser = argparse.ArgumentParser(prog="potluck", description="Peer-to-peer LLM inference on pooled hardware.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    join = commands.add_parser("join", help="serve a span of a model's layers")
    _add_join_args(join)

    generate = commands.add_parser("generate", help="generate text through a chain of nodes")
    generate.add_argument("--model", required=True, help="model folder, .gguf file or hub id (the one the nodes serve)")
    generate.add_argument("--peers", default=None, help="comma-separated HOST:PORT of nodes (default: discover them)")
    _add_swarm_args(generate)
    add_trust_args(generate)
    add_verify_args(generate)
    _add_generation_args(generate)
    generate.add_argument("--json", action="store_true", help='print {"text": ..., "token_ids": [...]} at the end')
    generate.add_argument("--no-push", action="store_true",
                          help="send every hop its step from the client (default: nodes forward steps along the chain)")
    generate.add_argument("--prefill-chunk", type=int, default=0,
                          help="pipeline prompts of 2x this many tokens or more down the chain in chunks (default 0: off)")
    generate.add_argument("--adapter", default=None, metavar="NAME",
                          help="run with the LoRA adapter the nodes serve as NAME (potluck join --adapter NAME=PATH); "
                               "default: the base model")
    generate.add_argument("--prompt-weights", default=None, metavar="FILE",
                          help="generate with a soft prompt trained by `potluck finetune --method ptune` (docs/finetune.md)")
    _add_logging(generate)

    demo = commands.add_parser("demo", help="start a local 3-node swarm on the embedded model and chat through it")
    demo.add_argument("--model", default=None, help="model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct GGUF)")
    demo.add_argument("--nodes", type=_positive, default=3, help="number of node processes (default 3)")
    demo.add_argument("--threads", type=int, default=0, help="torch threads per node (default: cores / nodes)")
    _add_generation_args(demo, default_prompt="What is the capital of France?", chat_default=True)
    _add_logging(demo)

    status = commands.add_parser("status", help="show the swarm: nodes, spans, coverage, warnings")
    _add_swarm_args(status)
    add_trust_args(status)
    status.add_argument("--wait", type=float, default=2.0, help="seconds to listen for nodes (default 2)")
    status.add_argument("--json", action="store_true", help="print the swarm as JSON")
    _add_logging(status)

    keys = commands.add_parser("swarm-key", help="make a private swarm's key")
    keys.add_argument("action", choices=["new"], help="new: write a fresh random key")
    keys.add_argument("file", help="where to write it (must not exist; readable by you only)")
    _add_logging(keys)

    prepare = commands.add_parser("prepare-model", help="write the embedded SmolLM2 model as a safetensors folder")
    prepare.add_argument("--out", default=None, help="folder to write (default ~/.cache/potluck/models/...)")
    _add_logging(prepare)

    for module, add_parser, runs in _MODULE_COMMANDS:
        if command is None or command in runs:
            getattr(importlib.import_module(module), add_parser)(commands)
        else:
            for name in runs:
                commands.add_parser(name)
    return parser


# speculative decoding's longest draft by default: exact, and a pass of up to 8 tokens costs about one of 1 on CPU
# nodes (docs/performance.md); the draft length adapts, so answers that repeat nothing lose nothing measurable
PROMPT_LOOKUP = 7


def _add_generation_args(parser: argparse.ArgumentParser, default_prompt: str | None = None, chat_default: bool = False) -> None:
    parser.add_argument("--prompt", required=default_prompt is None, default=default_prompt, help="the prompt text")
    parser.add_argument("--chat", action="store_true", default=chat_default, help="wrap the prompt in the chat template")
    parser.add_argument("--max-new-tokens", type=_positive, default=64, help="tokens to generate at most (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); >0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--stop", action="append", default=None, help="stop when this string appears (repeatable)")
    parser.add_argument("--wire-dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8"],
                        help="hidden states on the wire; int8: blockwise quantised (default float32)")
    parser.add_argument("--prompt-lookup", type=_non_negative, default=PROMPT_LOOKUP, metavar="N",
                        help="speculative decoding: each pass also checks up to N tokens that followed the last "
                             "tokens earlier in the text; the same output (sampling: the same distribution), faster when "
                             f"the answer repeats the prompt (default {PROMPT_LOOKUP}; 0: off)")


def add_verify_args(parser: argparse.ArgumentParser) -> None:
    """Which nodes' outputs to accept (quantised weights, docs/quantization.md) and their verification
    (client/verify.py, docs/reliability.md)."""
    parser.add_argument("--accept-quant", default="any", choices=["any", "int8", "none"],
                        help="route through nodes with quantised weights: any (default), int8 (int8 or none), "
                             "none (only unquantised nodes: outputs exact to transformers')")
    parser.add_argument("--verify", default="off", choices=["off", "spot", "full"],
                        help="recompute hops on other nodes serving the same layers and ban nodes caught lying: "
                             "spot = a random share of steps, full = every step (default off)")
    parser.add_argument("--verify-fraction", type=float, default=0.25,
                        help="with --verify spot: the share of steps that trigger a check (default 0.25)")


def verify_options(args: argparse.Namespace) -> dict:
    return {"verify": args.verify, "verify_fraction": args.verify_fraction, "accept_quant": args.accept_quant}


def _generate(args: argparse.Namespace) -> None:
    from client.model import DistributedModelForCausalLM
    from client.textgen import generate_text, load_tokenizer

    peers = [p.strip() for p in (args.peers or "").split(",") if p.strip()]
    model = DistributedModelForCausalLM.from_pretrained(args.model, config=_client_config(args, peers))
    try:
        if args.prompt_weights:
            from client.finetune import load_prompts

            load_prompts(model, args.prompt_weights)
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
        print(f"\n[{len(result.token_ids)} tokens{passes}, {result.decode_tokens_per_s:.1f} tokens/s decode]", file=sys.stderr)


def _client_config(args: argparse.Namespace, peers: list[str]):
    from client.config import ClientConfig

    return ClientConfig(peers=tuple(peers), bootstrap=bootstrap_list(args.bootstrap), mdns=not args.no_mdns,
                        mdns_interface=args.mdns_interface, wire_dtype=args.wire_dtype, push=not args.no_push,
                        prefill_chunk=args.prefill_chunk, adapter=getattr(args, "adapter", None), **trust_options(args),
                        **verify_options(args))


def _swarm_key(args: argparse.Namespace) -> None:
    from node.rpc.security import SwarmKey

    try:
        SwarmKey.generate().write(args.file)
    except FileExistsError:
        raise ConfigError(f"{args.file} exists already; choose another file (keys are never overwritten)") from None
    print(f"wrote a new swarm key to {args.file}: give it to every node and client of the swarm (--swarm-key)")


def _status(args: argparse.Namespace) -> None:
    from rich.console import Console

    from client.status import as_json, collect, group_by_model, render
    from node.swarm.membership import SwarmConfig

    bootstrap = bootstrap_list(args.bootstrap)
    if args.no_mdns and not bootstrap:
        raise ConfigError("--no-mdns needs at least one --bootstrap address")
    config = SwarmConfig(bootstrap=bootstrap, mdns=not args.no_mdns, mdns_interface=args.mdns_interface)
    from node.rpc.security import load_security

    security = load_security(**trust_options(args))
    views = group_by_model(asyncio.run(collect(config, args.wait, security)))
    if args.json:
        print(json.dumps(as_json(views), indent=1))
    else:
        render(views, Console())
    if not views or any(view.missing() for view in views):
        raise SystemExit(1)


def _prepare(args: argparse.Namespace) -> None:
    from pathlib import Path

    from node.model.embedded import DEFAULT_DIR, prepare_embedded_model

    print(prepare_embedded_model(Path(args.out) if args.out else DEFAULT_DIR))


def _demo(args: argparse.Namespace) -> None:
    from node.demo import run_demo

    run_demo(args)


# Errors that are the user's to fix: one line, exit code 2, no traceback. Named by module so that a command
# that never imports torch (proxy, swarm-key) does not import it just to name them: an error can only
# come from a module that was imported.
_USER_ERRORS = (
    ("node.config", "ConfigError"), ("node.model.errors", "ModelLoadError"), ("client.transport", "PeerError"),
    ("client.routing", "MissingLayersError"), ("node.launcher", "NodeStartError"), ("node.swarm.identity", "IdentityError"),
    ("node.rpc.security", "SecurityError"), ("client.verify", "VerificationError"),
)


def _user_errors() -> tuple[type[BaseException], ...]:
    loaded = [getattr(sys.modules[module], name) for module, name in _USER_ERRORS if module in sys.modules]
    return (*loaded, NotImplementedError, ValueError, MemoryError, OSError)


def main(argv: list[str] | None = None) -> int:
    words = [word for word in (sys.argv[1:] if argv is None else argv) if not word.startswith("-")]
    parser = build_parser(words[0] if words else None)
    args = parser.parse_args(argv)
    if args.command == "join" and args.config:
        argv = sys.argv[1:] if argv is None else argv
        try:
            args = join_args(argv[argv.index("join") + 1:])
        except ConfigError as error:
            print(f"potluck join: error: {error}", file=sys.stderr)
            return 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG" and args.command not in ("proxy", "swarm-key"):  # the two that need no transformers
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    handlers = {"join": _join, "generate": _generate, "demo": _demo, "prepare-model": _prepare, "status": _status,
                "swarm-key": _swarm_key}
    for module, _, runs in _MODULE_COMMANDS:
        for command, run in runs.items():
            if command == args.command:
                handlers[command] = getattr(importlib.import_module(module), run)
    try:
        handlers[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        if not isinstance(error, _user_errors()):
            raise
        print(f"potluck {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
