"""`potluck bench-memory`'s command line: node/bench/memory.py's cases, or with `--eight-b` node/bench/memory_8b.py's
case (its own section of --out)."""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from node.bench import memory_8b
from node.bench.memory import MARK_END, MARK_START, render_markdown, run_memory_bench

# -- command line -------------------------------------------------------------------------------------
SUMMARY = "benchmark a node's memory: weights, cache, baseline, peak and final, per model and span"


def add_memory_bench_parser(commands) -> None:
    from node.bench.basic import add_output_args

    bench = commands.add_parser("bench-memory", help=SUMMARY)
    bench.add_argument("--model", default=None, help="SmolLM2-135M folder (default: the embedded model's folder)")
    bench.add_argument("--gguf", default=None, help="a GGUF file (default: the embedded SmolLM2 GGUF, if installed)")
    bench.add_argument("--no-1b", dest="one_b", action="store_false",
                       help="skip the Llama-3.2-1B-shaped bf16 checkpoint (~2.5 GB written to --workdir)")
    bench.add_argument("--eight-b", action="store_true",
                       help="instead: serve a Llama-3.1-8B-shaped bf16 checkpoint (~16 GB written to --workdir) with "
                            "3 node processes and a client (~19 GB of memory, ~20 GB at peak; its own section of "
                            "--out; node/bench/memory_8b.py)")
    bench.add_argument("--eight-b-shape", default="8b", choices=("8b", "tiny"),
                       help=argparse.SUPPRESS)  # tiny: the 8B path's dry run on a small shape
    bench.add_argument("--llama-cpp", default=None, metavar="DIR",
                       help="with --eight-b: after the swarm, convert the checkpoint to a bf16 GGUF with llama.cpp's "
                            "converter and run its llama-bench on it (DIR: deploy/llamacpp.sh's output folder or its "
                            "build/)")
    bench.add_argument("--new-tokens", type=int, default=16, help="with --eight-b: tokens to decode (default 16)")
    bench.add_argument("--llama-threads", type=int, default=2, help="with --llama-cpp: llama-bench -t (default 2)")
    bench.add_argument("--workdir", default=None,
                       help="where the checkpoints (and the GGUF) are written: in a temp folder under it, deleted "
                            "after the run (default: the system's temp folder)")
    bench.add_argument("--keep", action="store_true",
                       help="with --eight-b: keep the checkpoint (and GGUF) in --workdir itself; reused next time")
    add_output_args(bench)


def run_memory_bench_cli(args: argparse.Namespace) -> None:
    from node.bench.basic import local_model_folder, publish

    smollm = local_model_folder(args.model, "bench-memory") if args.model else _embedded_folder()
    command = shlex.join(["potluck", *sys.argv[1:]])
    if args.workdir:
        Path(args.workdir).expanduser().mkdir(parents=True, exist_ok=True)
    if args.llama_cpp and not args.eight_b:
        raise ValueError("--llama-cpp goes with --eight-b")
    if args.eight_b:
        if args.keep and not args.workdir:
            raise ValueError("--keep needs --workdir (where the checkpoint stays)")
        llama_cpp = Path(args.llama_cpp) if args.llama_cpp else None
        started = time.perf_counter()
        console = Console(stderr=True)
        settings = (args.eight_b_shape, smollm, llama_cpp, args.keep, args.new_tokens, args.llama_threads, console)
        if args.keep:  # in --workdir itself, to be reused
            cases, run = memory_8b.run_eight_b(Path(args.workdir).expanduser(), *settings)
        else:
            with tempfile.TemporaryDirectory(prefix="potluck-bench-memory-", dir=args.workdir) as workdir:
                cases, run = memory_8b.run_eight_b(Path(workdir), *settings)
        section = memory_8b.render_eight_b(cases, run, command, args.eight_b_shape, args.new_tokens,
                                           time.perf_counter() - started)
        publish(section, args.out, memory_8b.MARK_START, memory_8b.MARK_END)
        return
    gguf = Path(args.gguf).expanduser() if args.gguf else _embedded_gguf()
    if gguf is not None and not gguf.is_file():
        raise ValueError(f"--gguf {args.gguf}: no such file")
    with tempfile.TemporaryDirectory(prefix="potluck-bench-memory-", dir=args.workdir) as workdir:
        cases = run_memory_bench(smollm, gguf, args.one_b, Path(workdir))
    publish(render_markdown(cases, command), args.out, MARK_START, MARK_END)


def _embedded_folder() -> Path | None:
    """The embedded SmolLM2 folder if `potluck prepare-model` wrote it (else the case is skipped)."""
    from common.weights import embedded

    return embedded.DEFAULT_DIR if embedded.is_prepared(embedded.DEFAULT_DIR) else None


def _embedded_gguf() -> Path | None:
    """The embedded SmolLM2 GGUF file if installed (else the case is skipped)."""
    from common.weights import embedded
    from common.weights.errors import ModelLoadError

    try:
        return embedded.gguf_path()
    except ModelLoadError:
        return None
