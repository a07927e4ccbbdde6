"""Build only what a node needs: layers `[start, end)` of a model, from safetensors shards or a GGUF file.

The model skeleton is built on the meta device from the config; only the span's tensors are read
(common/weights/reading.py for safetensors, common/weights/gguf.py for GGUF, dequantised), and
everything else stays on meta and costs no memory. The span is read layer by layer, each layer made into its
final form (`SpanForm`: lean fused matrices, exact compact forms, int8/nf4) before the next is read, so a node's
peak is its final memory plus one layer as stored (docs/memory.md)."""

from __future__ import annotations

import ctypes
import functools
import logging
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn
from transformers import PretrainedConfig

from common.progress import progress_bar
from common.weights import gguf
from common.weights.errors import ModelLoadError
from common.weights.exact import shared_kernels
from common.weights.fast_linear import transpose_linears
from common.weights.files import ModelFiles
from common.weights.reading import (
    LoadStats,
    ShardReader,
    bytes_of,
    decoder_layers,
    layer_keys,
    load_tensors,
    place,
    placeable,
    skeleton,
)
from node.model.compact import HeldForms, exact_layer
from node.model.lean import LEAN_MATRICES, LEAN_PROJECTIONS, LeanSpan, lean_unsupported
from node.model.quant import check_mode, layer_bytes, quantize_linears, weight_bytes
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


@dataclass(frozen=True)
class SpanForm:
    """What a span's matrices become as each layer is read (the defaults: transformers' layers in the compute dtype).

    The loader makes every layer into this form before it reads the next one, so a node never holds its span in a
    wider form than the final one, nor more than one layer's mapped shard pages."""

    lean: bool = False       # the lean runtime's fused matrices (node/model/lean.py), where the family has one
    quant: str = "none"      # node/model/quant.py: none | int8 | nf4
    exact: bool = False      # exact compact forms of float32 CPU matrices (node/model/compact.py)
    transpose: bool = False  # transformers' own linears stored transposed (common/weights/fast_linear.py)
    numerics: str = "exact"  # exact | fast: the exact forms' products in llama.cpp's numerics (docs/performance.md)


def load_span(
    files: ModelFiles, start: int, end: int, device: torch.device, dtype: torch.dtype, progress: bool = False,
    form: SpanForm = SpanForm(),
) -> tuple[SpanModel, LoadStats]:
    """Layers `[start, end)` of the model, on `device` in `dtype`, in `form`; nothing else is read or kept.

    The layers are read one at a time (plain file reads: no shard is mapped), each tensor straight into its final
    form (`form`) before the next layer is read; `progress`: show a bar of bytes read on stderr."""
    config = files.config()
    n = config.num_hidden_layers
    if not 0 <= start < end <= n:
        raise ModelLoadError(f"span {start}:{end} is not within the model's {n} layers (0:{n})")
    check_mode(form.quant)
    model = skeleton(config, dtype)
    prefix, layers = decoder_layers(model, n)
    span = SpanModel(config, start, end, nn.ModuleList(list(layers)[start:end]), _fresh_rotary(model, config, device))
    span.eval().requires_grad_(False)
    builder = _Builder(span, form, device, dtype)
    if files.gguf is not None:
        header = gguf.read_header(files.gguf)
        total = gguf.span_bytes(header, start, end) if progress else 0
        read = _gguf_reader(header, model, builder)
    else:
        weight_map = files.weight_map()
        keys = layer_keys(weight_map, prefix, start, end)
        if not keys:
            raise ModelLoadError(f"{files.model_id}: no weights found for layers {start}:{end} under {prefix!r}")
        total = bytes_of(files, weight_map, keys) if progress else 0
        read = _safetensors_reader(files, model, weight_map, prefix, keys, builder)
    stats = LoadStats(resident_before=_resident())  # the skeleton, the kernels, the family's code: all but weights
    with progress_bar(progress, f"loading layers {start}:{end}", total, bytes_=True) as advance:
        for index in range(start, end):
            read(index, stats, advance if progress else None)
            builder.check(layers[index], f"layer {index}")
            builder.finish(layers[index])
            release_free_heap()  # this layer's temporaries (read buffers, float copies) leave the process now
    if not stats.tensors:
        where = files.gguf.name if files.gguf is not None else prefix
        raise ModelLoadError(f"{files.model_id}: no weights found for layers {start}:{end} in {where}")
    builder.done(stats)
    if files.gguf is None:
        span.source = WeightSource(files, prefix, dtype)
    log.info("loaded layers %d:%d of %s: %d tensors, %.1f MB read%s", start, end, files.model_id, stats.tensors,
             stats.bytes_read / 1e6, "".join(f"; {note}" for note in stats.notes))
    return span, stats


def _safetensors_reader(files: ModelFiles, model: nn.Module, weight_map: dict[str, str], prefix: str,
                        keys: list[str], builder: "_Builder"):
    """read(index, stats, advance): put layer `index`'s tensors into `model`, one tensor at a time (a lean span's
    projections are left to the builder, which reads each fused matrix straight into one buffer)."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    by_layer: dict[int, list[str]] = {}
    for key in keys:
        by_layer.setdefault(int(pattern.match(key).group(1)), []).append(key)
    direct = placeable(model, keys)

    def read(index: int, stats: LoadStats, advance) -> None:
        wanted = by_layer.get(index, [])
        if not direct:  # renamed or fused keys: transformers' conversions, in the compute dtype
            loaded = load_tensors(files, model, wanted, weight_map, builder.device, builder.dtype, advance)
            stats.tensors, stats.bytes_read = stats.tensors + loaded.tensors, stats.bytes_read + loaded.bytes_read
            stats.shards |= loaded.shards
            return
        reader = ShardReader(files, weight_map, stats, advance)
        for key in sorted(wanted, key=lambda k: (weight_map[k], k)):
            if builder.is_projection(key):
                builder.defer(model.get_parameter(key), key, reader)
            else:
                builder.put(model, key, reader.read(key))

    return read


def _gguf_reader(header, model: nn.Module, builder: "_Builder"):
    """read(index, stats, advance): dequantise layer `index`'s tensors of the GGUF file into `model`."""
    mapping = gguf.tensor_mapping(model, header)

    def read(index: int, stats: LoadStats, advance) -> None:
        tensors = gguf.read_tensors(header, mapping, lambda name: gguf.layer_of(name) == index, stats, advance)
        for key in list(tensors):
            builder.put(model, key, tensors.pop(key))

    return read


class _Builder:
    """Makes each loaded layer into the span's final form (`SpanForm`) before the next is read."""

    def __init__(self, span: SpanModel, form: SpanForm, device: torch.device, dtype: torch.dtype):
        self.span, self.form, self.device, self.dtype = span, form, device, dtype
        self.kernels = None
        if form.exact and form.quant == "none" and device.type == "cpu" and dtype == torch.float32:
            self.kernels = shared_kernels()
        self.quantised = 0
        self.lean: LeanSpan | None = None
        self.forms = HeldForms(dtype, form.quant, self.kernels, form.numerics)
        self._deferred: dict[int, tuple[str, ShardReader]] = {}  # id(meta parameter) -> its key, its reader
        if form.lean:
            reason = lean_unsupported(span)
            if reason is None:
                self.lean = LeanSpan(span, held=self._held, build=False, device=device)
            else:
                log.info("no lean runtime for this family (%s); using transformers' layers", reason)
        self._projections = tuple(f".{p}.weight" for names in LEAN_PROJECTIONS.values() for p in names)

    def is_projection(self, key: str) -> bool:
        """Whether the builder makes this tensor (a lean projection weight) into its form itself."""
        return self.lean is not None and key.endswith(self._projections)

    def defer(self, parameter: torch.Tensor, key: str, reader: ShardReader) -> None:
        """Leave a lean projection's (meta) parameter unread: `_held` reads it when its matrix is made."""
        self._deferred[id(parameter)] = (key, reader)

    def put(self, model: nn.Module, key: str, tensor: torch.Tensor) -> None:
        """A read tensor (memory of its own) into the model: as stored when it is a lean projection (`HeldForms`
        makes its form from it), else in the compute dtype."""
        if self.is_projection(key):
            place(model, key, tensor.to(self.device))
        else:
            place(model, key, tensor.to(device=self.device, dtype=self.dtype))

    def _held(self, name: str, weights: list[torch.Tensor]):
        """A lean matrix in its final form: deferred projections read as one fused buffer first."""
        sizes = [w.shape[0] for w in weights]
        deferred = [self._deferred.pop(id(w), None) for w in weights]
        if all(d is not None for d in deferred):
            fused = deferred[0][1].read_rows([key for key, _ in deferred]).to(self.device)
        elif any(d is not None for d in deferred):
            raise ModelLoadError(f"layer projections {name} are partly missing")
        else:
            fused = weights[0] if len(weights) == 1 else torch.cat(weights)
        return self.forms.make(fused, sizes)

    def check(self, layer: nn.Module, what: str) -> None:
        """Every tensor of the layer is read, or deferred to `_held`."""
        missing = [name for name, tensor in layer.state_dict(keep_vars=True).items()
                   if tensor.is_meta and id(tensor) not in self._deferred]
        if missing:
            raise ModelLoadError(f"{what}: the checkpoint has no weights for {', '.join(missing[:5])}"
                                 + (" ..." if len(missing) > 5 else ""))

    def finish(self, layer: nn.Module) -> None:
        if self.lean is not None:
            self.lean.add_layer(layer)
        else:
            if self.form.transpose and self.form.quant == "none" and self.device.type == "cpu":
                transpose_linears(layer)
            if self.form.quant != "none":
                self.quantised += quantize_linears(layer, self.form.quant, self.dtype)
            elif self.kernels is not None:
                exact_layer(layer, self.kernels, self.forms.tally)
        if self.device.type == "cpu":
            own_memory(layer)

    def done(self, stats: LoadStats) -> None:
        span = self.span
        if self.lean is not None:
            span.lean = self.lean
            if self.form.quant != "none":
                self.quantised = len(self.lean.layers) * len(LEAN_MATRICES)
        report = self.forms.report(span)
        if self.quantised:
            stats.notes.append(f"quantised {self.quantised} weight matrices to {self.form.quant}")
        if report is not None:
            stats.notes.append(report.describe())
        stats.notes.append(f"{weight_bytes(span) / 1e6:.1f} MB of weights held")


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library's symbols as loaded in this process (no lookup that starts a process: find_library runs
    ldconfig); None where there is no malloc_trim (not glibc)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def release_free_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere). Freed temporaries
    under glibc's mmap threshold (up to 32 MB once it adapts) otherwise stay resident: ~100 MB after quantising
    a 190 MB span."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _resident() -> int:
    """This process's resident bytes (VmRSS); 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            return next((int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:")), 0)
    except OSError:
        return 0


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


def stored_dtype(config: PretrainedConfig) -> torch.dtype | None:
    """The dtype a safetensors checkpoint's config says its weights are stored in (None: not said)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def bytes_per_layer(config: PretrainedConfig, dtype: torch.dtype, quant: str = "none",
                    stored: torch.dtype | None = None, exact: bool = False) -> int:
    """The largest decoder layer's weight bytes as a node holds them (measured on a meta skeleton): in `dtype`; with
    `quant` (node/model/quant.py) its linear projections at their quantised size; with `exact` (float32 CPU spans)
    and bfloat16 `stored` weights, its projections at 2 bytes a weight (their bf16 exact form)."""
    model = skeleton(config, dtype)
    _, layers = decoder_layers(model, config.num_hidden_layers)
    if exact and quant == "none" and dtype == torch.float32 and stored == torch.bfloat16:
        return max(layer_bytes(layer, "none") - _projection_numel(layer) * 2 for layer in layers)
    return max(layer_bytes(layer, quant) for layer in layers)


def _projection_numel(layer: nn.Module) -> int:
    return sum(m.weight.numel() for m in layer.modules() if type(m) is nn.Linear)


def loading_bytes(config: PretrainedConfig, stored: torch.dtype | None) -> int:
    """What loading holds for a moment beside the span (one fused matrix as read, before its final form is made):
    at most one layer's weights as stored (float32 where the stored dtype is not known)."""
    model = skeleton(config, stored or torch.float32)
    _, layers = decoder_layers(model, config.num_hidden_layers)
    return max(sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers)
