"""`potluck bench-memory --eight-b`: a Llama-3.1-8B-shaped bfloat16 checkpoint served from one 24 GB machine.

The checkpoint (random weights, ~16 GB in 8 shards) is written one shard at a time into the work folder, with a
tokenizer copied beside it (llama.cpp's converter needs one; the swarm does not). Three `potluck join` processes
serve it (11/11/10 layers, ~5.3 GB each: bf16 exact forms, computed in float32) and a client in this process holds
the embeddings and the head in bfloat16 (2 x 1.05 GB; in float32 they would be 4.2 GB, plus the head's exact form).
Planned: ~18.5 GB in all; the nodes load at once (each ~0.44 GB over its final for a moment), the client after
them. Each process's peak and final memory is read from /proc, and the swarm's decode tokens/s is timed as
(new tokens - 1) / (time of N tokens - time of 1 token) over the same prompt, so the prefill is not in it.

With `--llama-cpp DIR`, after the swarm is stopped (its memory given back), the checkpoint is converted with
llama.cpp's own converter to a bf16 GGUF (as deploy/llamacpp.sh runs it) and `llama-bench -p 0 -n N -t T` decodes
on it: the same weights, the same machine, the same run. The GGUF is deleted after it unless `--keep`.

`--eight-b-shape tiny` runs the same path on a small Llama shape (seconds): the dry run of the 8B case."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from node.bench.memory import MemoryCase, MiB, llama_config, measure_swarm, write_checkpoint

EIGHT_B = dict(hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8, vocab=128256)
SHAPES = {
    "8b": (EIGHT_B, 8),
    "tiny": (dict(hidden=256, layers=6, intermediate=512, heads=4, kv_heads=2, vocab=128256), 3),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MARK_START = "<!-- bench:memory-8b:start -->"
MARK_END = "<!-- bench:memory-8b:end -->"


@dataclass(frozen=True)
class LlamaCppRun:
    """llama-bench's decode on the converted GGUF."""

    tokens_per_s: float
    gguf_bytes: int
    command: str
    convert_s: float


def checkpoint(workdir: Path, shape: str, tokenizer_from: Path | None, console: Console) -> Path:
    """The shape's checkpoint in `workdir` (reused when a complete one is there: `--keep` from an earlier run)."""
    dims, shards = SHAPES[shape]
    folder = workdir / f"llama-{shape}-shaped-bf16"
    if (folder / "config.json").is_file() and (folder / "model.safetensors.index.json").is_file():
        console.print(f"reusing the checkpoint in {folder}")
    else:
        console.print(f"writing a Llama-3.1-{shape.upper()}-shaped bf16 checkpoint into {folder} (one shard at a time)")
        write_checkpoint(folder, llama_config(**dims), shards=shards)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).is_file():
                shutil.copyfile(tokenizer_from / name, folder / name)
    return folder


def find_llama_cpp(path: Path) -> tuple[Path, Path]:
    """(llama-bench, convert_hf_to_gguf.py) of deploy/llamacpp.sh's output folder, given it or its build/ folder."""
    path = path.expanduser()
    root = path.parent if path.name == "build" else path
    bench = next((p for p in (path / "bin" / "llama-bench", root / "build" / "bin" / "llama-bench",
                              path / "llama-bench") if p.is_file()), None)
    converter = root / "src" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if bench is None:
        raise ValueError(f"--llama-cpp {path}: no llama-bench in its bin/ (deploy/llamacpp.sh builds it)")
    if not converter.is_file():
        raise ValueError(f"--llama-cpp {path}: no llama.cpp source beside it ({converter})")
    return bench, converter


def convert(folder: Path, converter: Path, out: Path, console: Console) -> float:
    """llama.cpp's converter, as deploy/llamacpp.sh runs it (its gguf-py, sentencepiece in <root>/pylib), with
    `--outtype bf16`; returns the seconds it took."""
    root = converter.parents[3]
    pylib = root / "pylib"
    if not (pylib / "sentencepiece").is_dir():  # the converter's llama vocabulary code imports it
        console.print(f"installing sentencepiece into {pylib} (as deploy/llamacpp.sh does)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(pylib), "sentencepiece"],
                       check=True)
    env = dict(os.environ, PYTHONPATH=f"{converter.parent / 'gguf-py'}:{pylib}")
    console.print(f"converting {folder} to {out} (bf16)")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(converter), str(folder), "--outtype", "bf16", "--outfile", str(out)],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise RuntimeError(f"convert_hf_to_gguf.py failed (exit {done.returncode}):\n{tail}")
    return time.perf_counter() - started


def llama_bench(bench: Path, gguf: Path, tokens: int, threads: int) -> tuple[float, str]:
    """llama-bench's decode tokens/s (tg over `tokens` tokens, no prompt) and the command that ran."""
    from node.bench.llamacpp import decode_samples

    args = [str(bench), "-m", str(gguf), "-p", "0", "-n", str(tokens), "-t", str(threads), "-r", "1", "-o", "jsonl"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"llama-bench failed (exit {done.returncode}): {tail}")
    samples = decode_samples(done.stdout)
    if not samples:
        raise RuntimeError(f"llama-bench printed no decode result: {done.stdout[-300:]}")
    return max(samples), f"llama-bench -m {gguf.name} -p 0 -n {tokens} -t {threads} -r 1"


def run_eight_b(workdir: Path, shape: str, tokenizer_from: Path | None, llama_cpp: Path | None, keep: bool,
                new_tokens: int, threads: int, console: Console) -> tuple[list[MemoryCase], LlamaCppRun | None]:
    """The 8B case (or `shape`'s): checkpoint, swarm, then llama.cpp; the checkpoint and GGUF deleted unless `keep`."""
    tools = find_llama_cpp(llama_cpp) if llama_cpp is not None else None  # fail before writing 16 GB
    if tools is not None and tokenizer_from is None:
        raise ValueError("--llama-cpp needs a tokenizer to copy into the checkpoint (llama.cpp's converter reads it): "
                         "pass --model SMOLLM2_FOLDER")
    folder = checkpoint(workdir, shape, tokenizer_from, console)
    gguf = workdir / f"{folder.name}.gguf"
    try:
        console.print("serving it: 3 node processes + a client (bfloat16 embeddings and head) in this process")
        cases = measure_swarm(f"Llama-3.1-{shape}-shaped bf16", folder, 3, new_tokens=new_tokens,
                                    threads=0, client_dtype="bfloat16", console=console)
        run = None
        if tools is not None:  # the swarm is stopped: its memory is free for llama.cpp's
            bench, converter = tools
            seconds = convert(folder, converter, gguf, console)
            console.print(f"llama-bench on {gguf.name}: {new_tokens} tokens, {threads} threads")
            rate, command = llama_bench(bench, gguf, new_tokens, threads)
            run = LlamaCppRun(rate, gguf.stat().st_size, command, seconds)
        return cases, run
    finally:
        if not keep:
            gguf.unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)


def render_eight_b(cases: list[MemoryCase], run: LlamaCppRun | None, command: str, shape: str, new_tokens: int,
                   seconds: float) -> str:
    dims, shards = SHAPES[shape]
    total = sum(c.final for c in cases)
    label = "8B" if shape == "8b" else shape
    lines = [
        f"## A Llama-3.1-{label}-shaped model on one machine (`potluck bench-memory --eight-b`)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; command: `{command}`; the whole run took "
        f"{seconds:.0f} s",
        f"- checkpoint: Llama-3.1-{label}-shaped, random bfloat16 weights (hidden {dims['hidden']}, {dims['layers']} "
        f"layers, vocab {dims['vocab']:,}), {shards} safetensors shards written one at a time",
        "- swarm: 3 `potluck join` processes on this machine (`--no-mdns --throughput 10`, every core), bf16 weights "
        "held in their exact form, computed in float32; the client in the bench process, embeddings and head in "
        f"bfloat16; greedy, an 8-token prompt, {new_tokens} new tokens; decode tok/s = (new tokens - 1) / (time for "
        f"{new_tokens} tokens - time for 1), the prefill left out",
        "",
        "| process | span | weights MiB | cache MiB | baseline MiB | peak MiB | final MiB | decode tok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        lines.append(f"| {c.name} | {c.span} | {c.weights / MiB:.0f} | {c.kv_cache / MiB:.1f} | "
                     f"{c.baseline / MiB:.0f} | {c.peak / MiB:.0f} | {c.final / MiB:.0f} | {c.tokens_per_s:.2f} |")
    lines += ["", f"All four processes together: {total / MiB:.0f} MiB final."]
    if run is not None:
        lines += [
            "",
            "| decode on the same weights | what ran | tok/s |",
            "|---|---|---:|",
            f"| Potluck swarm | 3 node processes + client, float32 compute over bf16 weights | "
            f"{cases[0].tokens_per_s:.2f} |",
            f"| llama.cpp | `{run.command}` on the bf16 GGUF that `convert_hf_to_gguf.py --outtype bf16` made of the "
            f"checkpoint ({run.gguf_bytes / 1e9:.2f} GB, converted in {run.convert_s:.0f} s), one process, after the "
            f"swarm stopped | {run.tokens_per_s:.2f} |",
        ]
    return "\n".join(lines) + "\n"
