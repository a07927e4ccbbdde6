"""`potluck bench-compile`: does torch.compile (and CUDA graphs, on a GPU) speed up a span's decode step?

The lean runtime (node/model/lean.py) runs eagerly. This benchmark writes the same one-token decode
step of a LLaMA-style span as one traceable function, compiles it with torch.compile (inductor; mode
"reduce-overhead", i.e. CUDA graphs, on CUDA) with the cache length dynamic, and times it against
the runtime's own eager step on the same weights, after the same prompt. It reports the compile
time, ms per step of both and the largest difference of their outputs, so the choice for a device
is measured rather than assumed."""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

MARK_START, MARK_END = "<!-- bench:compile:start -->", "<!-- bench:compile:end -->"


@dataclass
class CompileSettings:
    model: Path
    start: int = 0
    end: int | None = None       # default: a third of the layers, as one node of a 3-node chain
    prompt_tokens: int = 128
    steps: int = 30
    device: str = "cpu"
    threads: int = 2
    backend: str = "inductor"    # torch.compile backend; "aot_eager" traces the same graph without code generation
    out: Path | None = None


@dataclass
class CompileResult:
    settings: CompileSettings
    span: tuple[int, int]
    mode: str
    compile_s: float
    eager_ms: list[float]
    compiled_ms: list[float]
    max_abs_diff: float
    machine: str
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def decode_step(lean):
    """The one-row, one-token decode step of `lean`'s layers as a plain function (no row lists): what
    torch.compile traces. Arguments: x [1, hidden], cos and signed sin [1, 1, head_dim] (as LeanSpan._rotary
    gives them), keys/values of a StaticKV, and `past`, the tokens already cached."""
    q_heads, kv_heads, d = lean.q_heads, lean.kv_heads, lean.head_dim
    for layer in lean.layers:
        if layer.qkv_bias is not None or layer.q_norm is not None or lean.window is not None:
            raise ValueError("bench-compile covers LLaMA-style spans without biases, q/k norms or sliding windows")
    layers = lean.layers
    q_size, kv_size, half = q_heads * d, kv_heads * d, d // 2

    def step(x, cos, sin, keys, values, past: int):
        for index, layer in enumerate(layers):
            h = F.rms_norm(x, (x.shape[-1],), layer.input_norm, layer.eps)
            qkv = h @ layer.qkv_t
            qk = qkv[:, : q_size + kv_size].view(1, q_heads + kv_heads, d)
            swapped = qk.view(1, q_heads + kv_heads, 2, half).flip(-2).view(1, q_heads + kv_heads, d)
            qk = torch.addcmul(qk * cos, swapped, sin)
            q = qk[:, :q_heads].reshape(1, kv_heads, q_heads // kv_heads, d)
            keys[index, :, :, past : past + 1] = qk[:, q_heads:].reshape(1, kv_heads, 1, d)
            values[index, :, :, past : past + 1] = qkv[:, q_size + kv_size :].reshape(1, kv_heads, 1, d)
            attended = F.scaled_dot_product_attention(q, keys[index, :, :, : past + 1], values[index, :, :, : past + 1],
                                                      scale=layer.scaling)
            x = x + attended.reshape(1, q_size) @ layer.o_t
            h = F.rms_norm(x, (x.shape[-1],), layer.post_norm, layer.eps)
            gate, up = (h @ layer.gate_up_t).chunk(2, dim=-1)
            x = x + (layer.act(gate) * up) @ layer.down_t
        return x

    return step


def run_benchmark(settings: CompileSettings, console: Console | None = None) -> CompileResult:
    from common.weights.fast_linear import transpose_linears
    from common.weights.files import ModelFiles
    from node.bench.basic import machine_info
    from node.model.lean import LeanSpan, Row
    from node.model.loader import load_span

    console = console or Console(stderr=True)
    torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    files = ModelFiles.open(str(settings.model))
    layers = files.config().num_hidden_layers
    end = settings.end if settings.end is not None else max(1, layers // 3)
    if not 0 <= settings.start < end <= layers:
        raise ValueError(f"--blocks {settings.start}:{end} is not within the model's {layers} layers")
    span, _ = load_span(files, settings.start, end, device, torch.float32)
    if device.type == "cpu":
        transpose_linears(span)
    lean = LeanSpan(span)
    step = decode_step(lean)
    length = settings.prompt_tokens + settings.steps + 8
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, settings.prompt_tokens, span.config.hidden_size, generator=generator).to(device)
    tokens = torch.randn(settings.steps + 2, 1, 1, span.config.hidden_size, generator=generator).to(device)
    caches = [lean.new_cache(settings.start, end, 1, length) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:  # the same prompt in both: the eager and the compiled step see equal caches
            lean.run(
                [Row(prompt, torch.arange(settings.prompt_tokens, device=device)[None], 0, cache)], settings.start, end
            )

    def eager(i: int) -> torch.Tensor:
        past = settings.prompt_tokens + i
        row = Row(tokens[i], torch.tensor([[past]], device=device), past, caches[0])
        return lean.run([row], settings.start, end)[0][0]

    def rotary(i: int):
        past = settings.prompt_tokens + i
        return lean._rotary(tokens[i][0], [Row(tokens[i], torch.tensor([[past]], device=device), past, None)])

    mode = "reduce-overhead" if device.type == "cuda" else "default"
    if settings.backend == "inductor":
        compiled_step = torch.compile(step, dynamic=True, mode=mode)
    else:
        mode = f"backend {settings.backend}"
        compiled_step = torch.compile(step, dynamic=True, backend=settings.backend)

    def compiled(i: int) -> torch.Tensor:
        cos, sin = rotary(i)
        return compiled_step(tokens[i][0], cos, sin, caches[1].keys, caches[1].values, settings.prompt_tokens + i)

    def timed(fn, i: int) -> tuple[float, torch.Tensor]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = fn(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - started) * 1000, out.clone()

    eager_ms, compiled_ms, diff = [], [], 0.0
    with torch.inference_mode():
        console.print(f"compiling the decode step of layers {settings.start}:{end} (mode {mode}) ...")
        compile_ms, first = timed(compiled, 0)
        _, reference = timed(eager, 0)
        diff = float((first - reference).abs().max())
        _, _ = timed(compiled, 1)  # a second length: dynamic shapes settle here
        _, _ = timed(eager, 1)
        for i in range(2, settings.steps + 2):  # alternate, so that drift hits both alike
            ms, a = timed(eager, i)
            eager_ms.append(ms)
            ms, b = timed(compiled, i)
            compiled_ms.append(ms)
            diff = max(diff, float((a - b).abs().max()))
    info = machine_info(settings.threads)
    gpu = f"; {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    machine = (f"{info['cpu']}{gpu}; {info['os']}; Python {info['python']}, torch {info['torch']}, "
               f"transformers {info['transformers']}")
    return CompileResult(settings, (settings.start, end), mode, compile_ms / 1000, eager_ms, compiled_ms, diff, machine)


def render_markdown(result: CompileResult) -> str:
    s = result.settings
    eager, compiled = statistics.median(result.eager_ms), statistics.median(result.compiled_ms)
    command = f"potluck bench-compile --model {s.model} --blocks {result.span[0]}:{result.span[1]} --device {s.device}"
    return "\n".join(
        [
            MARK_START,
            "## torch.compile on the decode step",
            "",
            f"- date: {result.date}",
            f"- machine: {result.machine}; {s.threads} torch threads",
            f"- command: `{command} --out docs/benchmarks.md`",
            f"- settings: layers {result.span[0]}:{result.span[1]} float32, one token after a "
            f"{s.prompt_tokens}-token prompt, "
            f"{s.steps} steps alternating eager and compiled; torch.compile(dynamic=True, "
            + (f'mode="{result.mode}")' if s.backend == "inductor" else f'backend="{s.backend}")'),
            "",
            "| step | ms per token (median) | vs eager |",
            "|---|---:|---:|",
            f"| lean runtime, eager | {eager:.2f} | 1.00x |",
            f"| torch.compile | {compiled:.2f} | {eager / compiled:.2f}x |",
            "",
            f"Compile time (first call): {result.compile_s:.1f} s. Largest difference between the two outputs: "
            f"{result.max_abs_diff:.2e}.",
            "",
            "The node runs the eager lean runtime on every device: compile it only where this table shows a gain.",
            MARK_END,
        ]
    )


def add_compile_bench_parser(commands) -> None:
    bench = commands.add_parser(
        "bench-compile", help="time torch.compile (CUDA graphs on a GPU) against the eager decode step"
    )
    bench.add_argument("--model", required=True, help="model folder (config.json + safetensors)")
    bench.add_argument("--blocks", default=None, help="START:END layers to time (default: the first third)")
    bench.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    bench.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    bench.add_argument("--steps", type=int, default=30, help="decode steps timed (default 30)")
    bench.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                       help="torch.compile backend (default inductor; the others trace without generating code)")
    from node.bench.basic import add_output_args

    add_output_args(bench)


def run_compile_bench_cli(args: argparse.Namespace) -> None:
    from node.bench.basic import local_model_folder, publish
    from node.config import parse_blocks

    start, end = parse_blocks(args.blocks) if args.blocks else (0, None)
    if args.steps < 1:
        raise ValueError("--steps must be at least 1")
    settings = CompileSettings(model=local_model_folder(args.model, "bench-compile"), start=start, end=end,
                               steps=args.steps, device=args.device, threads=args.threads, backend=args.backend)
    publish(render_markdown(run_benchmark(settings)), args.out, MARK_START, MARK_END)
