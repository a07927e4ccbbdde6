"""Read exactly the tensors wanted from safetensors shards into a model skeleton built on the meta device.

Only the wanted tensors are read (through transformers' own key conversions, so fused MoE experts and renamed
keys load as they do in `from_pretrained`); everything else stays on meta and costs no memory."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import convert_and_load_state_dict_in_model
from transformers.modeling_utils import LoadStateDictConfig

from common.weights.errors import ModelLoadError

if TYPE_CHECKING:
    from common.weights.files import ModelFiles


@dataclass
class LoadStats:
    """What a load read from disk."""

    tensors: int = 0
    bytes_read: int = 0
    shards: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)  # what the loader made of the weights (forms, sizes), to log


def skeleton(config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as error:
        raise ModelLoadError(
            f"unsupported architecture {getattr(config, 'architectures', None) or config.model_type!r}: {error}"
        ) from error


def decoder_layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
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


def load_tensors(
    files: ModelFiles,
    model: nn.Module,
    keys: list[str],
    weight_map: dict[str, str],
    device: torch.device,
    dtype: torch.dtype,
    advance: Callable[[float], None] | None = None,
) -> LoadStats:
    """Read exactly `keys` from the shards into `model` (through transformers' key conversions).

    `advance(nbytes)` is called as each tensor is read (for a progress bar). Keys that name the model's own
    parameters are read one at a time, each copied out of its shard's mapping into `dtype` before the next
    (a narrower stored form is never held whole in `dtype` beside its mapped pages); others go through
    transformers' conversions."""
    stats = LoadStats()
    if placeable(model, keys):
        for key, tensor in read_layer(files, weight_map, keys, stats, advance, one_at_a_time=True):
            place(model, key, owned(tensor, dtype, device, tensor))
        return stats
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
                nbytes = numel * itemsize(piece.get_dtype())
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


def itemsize(safetensors_dtype: str) -> int:
    return _ITEMSIZE.get(safetensors_dtype, 1)


def bytes_of(files: ModelFiles, weight_map: dict[str, str], keys: list[str]) -> int:
    """The tensors' size on disk, from their shards' headers (no tensor data is read)."""
    total = 0
    for shard in sorted({weight_map[key] for key in keys}):
        with safe_open(files.fetch(shard), framework="pt", device="cpu") as handle:
            for key in (k for k in keys if weight_map[k] == shard):
                piece = handle.get_slice(key)
                numel = 1
                for size in piece.get_shape():
                    numel *= size
                total += numel * itemsize(piece.get_dtype())
    return total


def read_layer(
    files: ModelFiles, weight_map: dict[str, str], keys: list[str], stats: LoadStats,
    advance: Callable[[float], None] | None = None, one_at_a_time: bool = False,
):
    """`keys` (one layer's) as stored (their own dtype), each shard's mapping closed once its keys are read: a dict,
    or with `one_at_a_time` an iterator of (key, tensor) that reads each tensor only when the last was used.

    The tensors may still be views of a shard's mapped pages: the caller makes them into their final form and
    drops them, and the pages go with them (a node reading layer by layer never has more than one layer mapped)."""
    tensors = _read(files, weight_map, keys, stats, advance)
    return tensors if one_at_a_time else dict(tensors)


def _read(files, weight_map, keys, stats, advance):
    by_shard: dict[str, list[str]] = {}
    for key in keys:
        by_shard.setdefault(weight_map[key], []).append(key)
    for shard, shard_keys in sorted(by_shard.items()):
        stats.shards.add(shard)
        with safe_open(files.fetch(shard), framework="pt", device="cpu") as handle:
            for key in shard_keys:
                tensor = handle.get_tensor(key)
                nbytes = tensor.numel() * tensor.element_size()
                stats.tensors += 1
                stats.bytes_read += nbytes
                if advance is not None:
                    advance(nbytes)
                yield key, tensor
                del tensor


def placeable(model: nn.Module, keys: list[str]) -> bool:
    """Whether every key names a parameter or buffer of `model` as it is (no conversion: renamed or fused keys)."""
    names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return all(key in names for key in keys)


def place(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put `tensor` as it is at parameter or buffer `key` of `model` (no gradient)."""
    path, _, leaf = key.rpartition(".")
    module = model.get_submodule(path) if path else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def owned(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device, source: torch.Tensor) -> torch.Tensor:
    """`tensor` in `dtype` on `device`, in memory of its own: never a view of `source`'s (a mapped shard's) pages."""
    out = tensor.to(device=device, dtype=dtype)
    if out.device.type == "cpu" and out.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        out = out.clone()
    return out


def layer_keys(weight_map: dict[str, str], prefix: str, start: int, end: int) -> list[str]:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return [key for key in weight_map if (m := pattern.match(key)) and start <= int(m.group(1)) < end]


def check_materialised(module: nn.Module, what: str) -> None:
    missing = [name for name, tensor in module.state_dict().items() if tensor.is_meta]
    if missing:
        raise ModelLoadError(
            f"{what}: the checkpoint has no weights for {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
        )
