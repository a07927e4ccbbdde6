"""A node's own speed for its span: decode and prefill tokens/s, measured once and cached."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.progress import progress_bar
from node.model.span import SpanModel

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path("~/.cache/potluck/throughput.json").expanduser()


@dataclass(frozen=True)
class Throughput:
    decode: float   # tokens/s through the whole span, one token per step with a warm cache
    prefill: float  # tokens/s through the whole span for a prompt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure(span: SpanModel, prompt_tokens: int = 64, decode_steps: int = 8, progress: bool = False) -> Throughput:
    with progress_bar(progress, f"measuring layers {span.start}:{span.end}", 2 + decode_steps) as advance:
        return _measure(span, prompt_tokens, decode_steps, advance)


def _measure(span: SpanModel, prompt_tokens: int, decode_steps: int, advance) -> Throughput:
    device, dtype = span.device, span.dtype
    hidden = torch.randn(1, prompt_tokens, span.config.hidden_size, device=device, dtype=dtype) * 0.02
    cache = span.new_cache()
    span(hidden, torch.arange(prompt_tokens, device=device)[None], None, cache)  # warm-up
    advance(1)
    cache = span.new_cache()
    _sync(device)
    started = time.perf_counter()
    span(hidden, torch.arange(prompt_tokens, device=device)[None], None, cache)
    _sync(device)
    prefill = prompt_tokens / (time.perf_counter() - started)
    advance(1)
    times = []
    for step in range(decode_steps):
        position = torch.tensor([[prompt_tokens + step]], device=device)
        _sync(device)
        started = time.perf_counter()
        span(hidden[:, :1], position, None, cache)
        _sync(device)
        times.append(time.perf_counter() - started)
        advance(1)
    times.sort()
    decode = 1.0 / times[len(times) // 2]
    return Throughput(decode=decode, prefill=prefill)


def cached_measure(
    span: SpanModel, key: str, cache_file: Path | None = DEFAULT_CACHE, progress: bool = False
) -> Throughput:
    """Measure once per (model, device, dtype, span, threads) key; reuse the stored figures after."""
    stored: dict = {}
    if cache_file is not None and cache_file.is_file():
        try:
            stored = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            stored = {}
    if key in stored:
        return Throughput(**stored[key])
    result = measure(span, progress=progress)
    log.info("measured throughput: decode %.1f tok/s, prefill %.1f tok/s", result.decode, result.prefill)
    if cache_file is not None:
        stored[key] = {"decode": result.decode, "prefill": result.prefill}
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(stored, indent=1))
        except OSError as error:
            log.warning("cannot cache throughput in %s: %s", cache_file, error)
    return result
