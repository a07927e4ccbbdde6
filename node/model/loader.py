"""Build only what a node needs: layers `[start, end)` of a model, from safetensors shards or a GGUF file.

The model skeleton is built on the meta device from the config; only the span's tensors are read
(common/weights/reading.py for safetensors, common/weights/gguf.py for GGUF, dequantised), and
everything else stays on meta and costs no memory."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn
from transformers import PretrainedConfig

from common.progress import progress_bar
from common.weights import gguf
from common.weights.errors import ModelLoadError
from common.weights.files import ModelFiles
from common.weights.reading import (
    LoadStats,
    bytes_of,
    check_materialised,
    decoder_layers,
    layer_keys,
    load_tensors,
    skeleton,
)
from node.model.quant import layer_bytes
from node.model.span import SpanModel

log = logging.getLogger(__name__)


def _fresh_rotary(model: nn.Module, config: PretrainedConfig, device: torch.device) -> nn.Module | None:
    """Rotary modules hold computed buffers (inv_freq): build a real one, never materialise the meta one."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        return None
    return type(rotary)(config=config).to(device)


@dataclass(frozen=True)
class WeightSource:
    """Where a span's projection weights came from, to read one again later (node/runtime/layout.py unpacks
    a packed matrix by reading it again instead of multiplying it by the identity). Safetensors only."""

    files: ModelFiles
    prefix: str                    # the decoder layers' key prefix, e.g. "model.layers"
    dtype: torch.dtype

    @functools.cached_property
    def _weight_map(self) -> dict[str, str]:
        return self.files.weight_map()

    def matrix(self, layer: int, projections: tuple[str, ...]) -> torch.Tensor | None:
        """The weights of `projections` (e.g. "self_attn.q_proj") of global layer `layer`, each as [in, out],
        side by side: [in, sum(out)], contiguous, in `dtype`; None if the checkpoint does not hold them so."""
        weight_map = self._weight_map
        keys = [f"{self.prefix}.{layer}.{projection}.weight" for projection in projections]
        if any(key not in weight_map for key in keys):
            return None
        parts = []
        for key in keys:
            with safe_open(self.files.fetch(weight_map[key]), framework="pt", device="cpu") as handle:
                weight = handle.get_tensor(key)
            if weight.dim() != 2 or not weight.is_floating_point():
                return None
            parts.append(weight.to(self.dtype).t())
        return torch.cat(parts, dim=1).contiguous() if len(parts) > 1 else parts[0].contiguous()


def load_span(
    files: ModelFiles, start: int, end: int, device: torch.device, dtype: torch.dtype, progress: bool = False
) -> tuple[SpanModel, LoadStats]:
    """Layers `[start, end)` of the model, on `device` in `dtype`; nothing else is read or kept.

    `progress`: show a bar of bytes read on stderr."""
    config = files.config()
    n = config.num_hidden_layers
    if not 0 <= start < end <= n:
        raise ModelLoadError(f"span {start}:{end} is not within the model's {n} layers (0:{n})")
    model = skeleton(config, dtype)
    prefix, layers = decoder_layers(model, n)
    if files.gguf is not None:
        stats = _load_gguf_span(files, model, start, end, device, dtype, progress)
    else:
        weight_map = files.weight_map()
        keys = layer_keys(weight_map, prefix, start, end)
        if not keys:
            raise ModelLoadError(f"{files.model_id}: no weights found for layers {start}:{end} under {prefix!r}")
        total = bytes_of(files, weight_map, keys) if progress else 0
        with progress_bar(progress, f"loading layers {start}:{end}", total, bytes_=True) as advance:
            stats = load_tensors(files, model, keys, weight_map, device, dtype, advance if progress else None)
    span_layers = nn.ModuleList(list(layers)[start:end])
    check_materialised(span_layers, f"layers {start}:{end}")
    span = SpanModel(config, start, end, span_layers, _fresh_rotary(model, config, device))
    span.eval().requires_grad_(False)
    if files.gguf is None:
        span.source = WeightSource(files, prefix, dtype)
    log.info(
        "loaded layers %d:%d of %s: %d tensors, %.1f MB read",
        start,
        end,
        files.model_id,
        stats.tensors,
        stats.bytes_read / 1e6,
    )
    return span, stats


def _load_gguf_span(
    files: ModelFiles, model: nn.Module, start: int, end: int, device: torch.device, dtype: torch.dtype, progress: bool
) -> LoadStats:
    """Dequantise only the `blk.{start..end-1}.*` tensors of the GGUF file."""
    header = gguf.read_header(files.gguf)
    total = gguf.span_bytes(header, start, end) if progress else 0
    with progress_bar(progress, f"loading layers {start}:{end}", total, bytes_=True) as advance:
        wanted = lambda name: (i := gguf.layer_of(name)) is not None and start <= i < end  # noqa: E731
        stats = gguf.load_tensors(header, model, wanted, device, dtype, advance if progress else None)
    if not stats.tensors:
        raise ModelLoadError(f"{files.model_id}: no weights found for layers {start}:{end} in {files.gguf.name}")
    return stats


def own_memory(module: nn.Module, max_bytes: int = 32 * 1024 * 1024) -> int:
    """Copy the module's small CPU tensors (norms, biases, rotary buffers) out of the safetensors mapping.

    Loaded tensors are views of the memory-mapped shard; while any view lives, every page of the
    shard that was read stays mapped and counts in the process's RSS. Once the big weights are
    re-laid out (transposed, fused: new memory) the small ones are the last views: copying them
    lets the mapping go (~140 MB less RSS for a 10-layer SmolLM2 node). Returns the bytes copied."""
    copied = 0
    for child in module.modules():
        tensors = list(child.named_parameters(recurse=False)) + list(child.named_buffers(recurse=False))
        for _, tensor in tensors:
            nbytes = tensor.numel() * tensor.element_size()
            if tensor.device.type == "cpu" and not tensor.is_meta and nbytes <= max_bytes:
                tensor.data = tensor.data.clone()
                copied += nbytes
    return copied


def bytes_per_layer(config: PretrainedConfig, dtype: torch.dtype, quant: str = "none") -> int:
    """The largest decoder layer's weight bytes in `dtype` (measured on a meta skeleton); with `quant`
    (node/model/quant.py) its linear projections count at their quantised size."""
    model = skeleton(config, dtype)
    _, layers = decoder_layers(model, config.num_hidden_layers)
    return max(layer_bytes(layer, quant) for layer in layers)


