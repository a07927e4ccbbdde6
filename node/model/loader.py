"""Build only what a node (a span of layers) or a client (embeddings, norm, head) needs.

The model skeleton is built on the meta device from the config; only the wanted
tensors are read from the safetensors shards (through transformers' own key
conversions, so fused MoE experts and renamed keys load as they do in
`from_pretrained`), and everything else stays on meta and costs no memory. A `.gguf` file is read
through node/model/gguf.py: the same skeleton, filled with only the span's tensors, dequantised."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.core_model_loading import convert_and_load_state_dict_in_model
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.modeling_utils import LoadStateDictConfig

from node.model.errors import ModelLoadError  # noqa: F401  (re-exported: raised by every loader)
from node.model.span import SpanModel
from node.progress import progress_bar

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
# Files a node or client needs besides weights (config, tokenizer, generation defaults).
METADATA_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template*",
    "vocab*",
    "merges.txt",
    "*.model",
    SAFETENSORS_INDEX,
]


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {name}: CUDA is not available on this machine")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError("--device mps: MPS is not available on this machine")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is float32 on CPU (exact and, for small spans, fast) and bfloat16 on accelerators."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return parse_dtype(name)


def split_revision(model: str, revision: str | None = None) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev') for hub ids; local paths (even with an '@') are kept whole.

    A revision given both ways must agree."""
    if "@" not in model or Path(model).expanduser().exists() or model.startswith((".", "/", "~")):
        return model, revision
    name, _, pinned = model.rpartition("@")
    if name.count("/") != 1 or not pinned:
        return model, revision
    if revision is not None and revision != pinned:
        raise ModelLoadError(f"{model!r} pins revision {pinned!r} but --revision says {revision!r}")
    return name, pinned


@dataclass
class ModelFiles:
    """A model's files: a local folder, or a hub repository fetched lazily, shard by shard."""

    root: Path
    model_id: str
    repo_id: str | None = None  # set when the files come from the hub
    revision: str | None = None
    gguf: Path | None = None  # a GGUF file: its weights; `root` then holds its config.json and tokenizer

    @classmethod
    def open(cls, path_or_id: str, revision: str | None = None) -> "ModelFiles":
        """A model folder (config.json + safetensors), a hub id, or a `.gguf` file (model_id: its stem)."""
        path_or_id, revision = split_revision(path_or_id, revision)
        path = Path(path_or_id).expanduser()
        if path.suffix.lower() == ".gguf":
            from node.model import gguf

            if not path.is_file():
                raise ModelLoadError(f"{path}: no such GGUF file")
            header = gguf.read_header(path.resolve())
            gguf.check_supported(header)
            return cls(root=gguf.sidecar_folder(header), model_id=path.stem, gguf=header.path)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"{path} has no config.json: is it a transformers model folder?")
            return cls(root=path.resolve(), model_id=path.name)
        if path.exists() or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
            raise ModelLoadError(f"{path_or_id!r} is neither a model folder nor a hub id like 'org/name'")
        from huggingface_hub import snapshot_download

        try:
            root = snapshot_download(path_or_id, revision=revision, allow_patterns=METADATA_PATTERNS)
        except Exception as error:  # network, auth, missing repo: all end up here
            raise ModelLoadError(f"cannot fetch {path_or_id!r} from the hub: {error}") from error
        return cls(root=Path(root), model_id=path_or_id, repo_id=path_or_id, revision=revision)

    def config(self) -> PretrainedConfig:
        if self.gguf is not None:
            from node.model import gguf

            gguf.ensure_config(gguf.read_header(self.gguf), self.root)
        try:
            return AutoConfig.from_pretrained(self.root)
        except (ValueError, KeyError) as error:
            raise ModelLoadError(f"cannot read the config of {self.model_id}: {error}") from error

    def weight_map(self) -> dict[str, str]:
        """Tensor name -> shard file name."""
        if self.gguf is not None:
            raise ModelLoadError(f"{self.model_id} is a GGUF file: it has no safetensors weight map")
        index = self.root / SAFETENSORS_INDEX
        if index.is_file():
            return json.loads(index.read_text())["weight_map"]
        single = self.fetch(SAFETENSORS_SINGLE)
        with safe_open(single, framework="pt") as handle:
            return {key: SAFETENSORS_SINGLE for key in handle.keys()}

    def fetch(self, filename: str) -> Path:
        local = self.root / filename
        if local.is_file() or self.repo_id is None:
            if not local.is_file():
                raise ModelLoadError(f"{self.model_id} has no {filename} (only safetensors weights are supported)")
            return local
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(self.repo_id, filename, revision=self.revision))


def config_hash(config: PretrainedConfig) -> str:
    """A stable fingerprint of the architecture, shared by nodes and clients of one model."""
    data = config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config", "use_cache"):
        data.pop(volatile, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class LoadStats:
    """What a load read from disk."""

    tensors: int = 0
    bytes_read: int = 0
    shards: set[str] = field(default_factory=set)


def _skeleton(config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as error:
        raise ModelLoadError(
            f"unsupported architecture {getattr(config, 'architectures', None) or config.model_type!r}: {error}"
        ) from error


def _decoder_layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers") and len(module) == num_layers:
            return name, module
    raise ModelLoadError(f"{type(model).__name__} has no list of {num_layers} decoder layers")


class _CountedSlice:
    """A safetensors slice that reports its bytes once transformers reads it (`piece[...]`)."""

    def __init__(self, piece, nbytes: int, advance: Callable[[float], None]):
        self._piece, self._nbytes, self._advance = piece, nbytes, advance

    def __getitem__(self, index):
        out = self._piece[index]
        self._advance(self._nbytes)
        return out

    def __getattr__(self, name):
        return getattr(self._piece, name)


def _load_tensors(
    files: ModelFiles, model: nn.Module, keys: list[str], weight_map: dict[str, str], device: torch.device, dtype: torch.dtype,
    advance: Callable[[float], None] | None = None,
) -> LoadStats:
    """Read exactly `keys` from the shards into `model` (through transformers' key conversions).

    `advance(nbytes)` is called as each tensor is read (for a progress bar)."""
    stats = LoadStats()
    by_shard: dict[str, list[str]] = {}
    for key in keys:
        by_shard.setdefault(weight_map[key], []).append(key)
    handles = []
    state: dict = {}
    try:
        for shard, shard_keys in sorted(by_shard.items()):
            handle = safe_open(files.fetch(shard), framework="pt", device="cpu")
            handles.append(handle)
            stats.shards.add(shard)
            for key in shard_keys:
                piece = handle.get_slice(key)
                state[key] = piece
                numel = 1
                for size in piece.get_shape():
                    numel *= size
                nbytes = numel * _itemsize(piece.get_dtype())
                if advance is not None:
                    state[key] = _CountedSlice(piece, nbytes, advance)
                stats.bytes_read += nbytes
                stats.tensors += 1
        load_config = LoadStateDictConfig(
            device_map={"": device},
            dtype=dtype,
            dtype_plan=model._get_dtype_plan(dtype),
            weight_mapping=get_model_conversion_mapping(model),
        )
        convert_and_load_state_dict_in_model(model=model, state_dict=state, load_config=load_config)
    finally:
        for handle in handles:
            handle.__exit__(None, None, None)
    return stats


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _itemsize(safetensors_dtype: str) -> int:
    return _ITEMSIZE.get(safetensors_dtype, 1)


def _bytes_of(files: ModelFiles, weight_map: dict[str, str], keys: list[str]) -> int:
    """The tensors' size on disk, from their shards' headers (no tensor data is read)."""
    total = 0
    for shard in sorted({weight_map[key] for key in keys}):
        with safe_open(files.fetch(shard), framework="pt", device="cpu") as handle:
            for key in (k for k in keys if weight_map[k] == shard):
                piece = handle.get_slice(key)
                numel = 1
                for size in piece.get_shape():
                    numel *= size
                total += numel * _itemsize(piece.get_dtype())
    return total


def _layer_keys(weight_map: dict[str, str], prefix: str, start: int, end: int) -> list[str]:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return [key for key in weight_map if (m := pattern.match(key)) and start <= int(m.group(1)) < end]


def _check_materialised(module: nn.Module, what: str) -> None:
    missing = [name for name, tensor in module.state_dict().items() if tensor.is_meta]
    if missing:
        raise ModelLoadError(f"{what}: the checkpoint has no weights for {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))


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
    model = _skeleton(config, dtype)
    prefix, layers = _decoder_layers(model, n)
    if files.gguf is not None:
        stats = _load_gguf_span(files, model, start, end, device, dtype, progress)
    else:
        weight_map = files.weight_map()
        keys = _layer_keys(weight_map, prefix, start, end)
        if not keys:
            raise ModelLoadError(f"{files.model_id}: no weights found for layers {start}:{end} under {prefix!r}")
        total = _bytes_of(files, weight_map, keys) if progress else 0
        with progress_bar(progress, f"loading layers {start}:{end}", total, bytes_=True) as advance:
            stats = _load_tensors(files, model, keys, weight_map, device, dtype, advance if progress else None)
    span_layers = nn.ModuleList(list(layers)[start:end])
    _check_materialised(span_layers, f"layers {start}:{end}")
    span = SpanModel(config, start, end, span_layers, _fresh_rotary(model, config, device))
    span.eval().requires_grad_(False)
    if files.gguf is None:
        span.source = WeightSource(files, prefix, dtype)
    log.info("loaded layers %d:%d of %s: %d tensors, %.1f MB read", start, end, files.model_id, stats.tensors, stats.bytes_read / 1e6)
    return span, stats


def _load_gguf_span(
    files: ModelFiles, model: nn.Module, start: int, end: int, device: torch.device, dtype: torch.dtype, progress: bool
) -> LoadStats:
    """Dequantise only the `blk.{start..end-1}.*` tensors of the GGUF file."""
    from node.model import gguf

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


@dataclass
class ClientParts:
    """What a client runs locally: token embeddings, the final norm and the LM head."""

    config: PretrainedConfig
    embed_tokens: nn.Module
    norm: nn.Module
    lm_head: nn.Module
    stats: LoadStats


def load_client_parts(files: ModelFiles, device: torch.device, dtype: torch.dtype) -> ClientParts:
    config = files.config()
    model = _skeleton(config, dtype)
    prefix, _ = _decoder_layers(model, config.num_hidden_layers)
    if files.gguf is not None:
        from node.model import gguf

        outside_layers = lambda name: gguf.layer_of(name) is None  # noqa: E731
        stats = gguf.load_tensors(gguf.read_header(files.gguf), model, outside_layers, device, dtype)
    else:
        weight_map = files.weight_map()
        keys = [key for key in weight_map if not key.startswith(prefix + ".")]
        stats = _load_tensors(files, model, keys, weight_map, device, dtype)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight.is_meta and getattr(config, "tie_word_embeddings", False):
        head.weight = embed.weight
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    norm = getattr(base, "norm", None)
    if norm is None:
        raise ModelLoadError(f"{type(model).__name__} has no final norm at '{prefix.rsplit('.', 1)[0]}.norm'")
    parts = ClientParts(config=config, embed_tokens=embed, norm=norm, lm_head=head, stats=stats)
    for name, module in (("embeddings", embed), ("final norm", norm), ("LM head", head)):
        _check_materialised(module, name)
        module.eval().requires_grad_(False)
    return parts


def bytes_per_layer(config: PretrainedConfig, dtype: torch.dtype, quant: str = "none") -> int:
    """The largest decoder layer's weight bytes in `dtype` (measured on a meta skeleton); with `quant`
    (node/model/quant.py) its linear projections count at their quantised size."""
    from node.model.quant import layer_bytes

    model = _skeleton(config, dtype)
    _, layers = _decoder_layers(model, config.num_hidden_layers)
    return max(layer_bytes(layer, quant) for layer in layers)


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` now (CUDA: the driver's figure; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30  # unknown platform: assume a modest machine
