"""`potluck demo`: a local swarm of node processes on the embedded model, one chat answer streamed; and
`potluck prepare-model`: the embedded model written as a safetensors folder."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from node.cli.args import add_generation_args, add_logging, positive


def add_demo_parser(commands) -> None:
    demo = commands.add_parser("demo", help="start a local 3-node swarm on the embedded model and chat through it")
    demo.add_argument(
        "--model", default=None, help="model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct GGUF)"
    )
    demo.add_argument("--nodes", type=positive, default=3, help="number of node processes (default 3)")
    demo.add_argument("--threads", type=int, default=0, help="torch threads per node (default: cores / nodes)")
    add_generation_args(demo, default_prompt="What is the capital of France?", chat_default=True)
    add_logging(demo)


def add_prepare_parser(commands) -> None:
    prepare = commands.add_parser("prepare-model", help="write the embedded SmolLM2 model as a safetensors folder")
    prepare.add_argument("--out", default=None, help="folder to write (default ~/.cache/potluck/models/...)")
    add_logging(prepare)


def run_prepare(args: argparse.Namespace) -> None:
    from common.weights.embedded import DEFAULT_DIR, prepare_embedded_model

    print(prepare_embedded_model(Path(args.out) if args.out else DEFAULT_DIR))


def default_threads() -> int:
    # The chain runs one hop at a time, so every node may use all cores while it computes.
    return os.cpu_count() or 1


def run_demo(args: argparse.Namespace) -> None:
    from rich.console import Console

    from client.model import DistributedModelForCausalLM
    from client.textgen import generate_text, load_tokenizer
    from common.weights.embedded import gguf_path
    from common.weights.files import ModelFiles
    from node.launcher import start_chain

    console = Console(stderr=True)
    # The embedded model is served from its GGUF file as it is: each node dequantises only its span.
    model_dir = Path(args.model) if args.model else gguf_path()
    with console.status(f"Reading the config of {model_dir.name}..."):
        # before the nodes start: a GGUF's config is built once and kept for them (common/weights/gguf.py)
        num_layers = ModelFiles.open(str(model_dir)).config().num_hidden_layers
    threads = args.threads or default_threads()
    with console.status(f"Starting {args.nodes} nodes over {num_layers} layers..."):
        nodes = start_chain(model_dir, num_layers, args.nodes, threads=threads)
    try:
        for node in nodes:
            console.print(f"  node [bold]{node.address}[/] serves layers {node.start_layer}:{node.end_layer}")
        tokenizer = load_tokenizer(str(model_dir))
        model = DistributedModelForCausalLM.from_pretrained(str(model_dir), peers=[n.address for n in nodes],
                                                            wire_dtype=args.wire_dtype)
        try:
            route = " -> ".join(f"{h.peer.address}[{h.start}:{h.end})" for h in model.swarm.route())
            console.print(f"  route: {route}")
            console.print(f"[bold]You:[/] {args.prompt}")
            console.print("[bold]Model:[/] ", end="")
            result = generate_text(
                model, tokenizer, args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=args.stop, out=sys.stdout,
                prompt_lookup=args.prompt_lookup,
            )
            print()
        finally:
            model.close()
        console.print(
            f"[dim]{len(result.token_ids)} tokens in {result.total_seconds:.2f}s: prefill "
            f"{result.prompt_tokens} tokens "
            f"in {result.prefill_seconds * 1000:.0f} ms, decode {result.decode_tokens_per_s:.1f} tokens/s"
            + (f", {result.passes} passes through the swarm" if args.prompt_lookup and result.passes else "")
            + "[/]"
        )
    finally:
        codes = [node.stop() for node in nodes]
        console.print(f"[dim]nodes stopped (exit codes {codes})[/]")
