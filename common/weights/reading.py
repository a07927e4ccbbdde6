"""Read exactly the tensors wanted from safetensors shards into a model skeleton built on the meta device.

Only the wanted tensors are read (through transformers' own key conversions, so fused MoE experts and renamed
keys load as they do in `from_pretrained`); everything else stays on meta and costs no memory."""

from __future__ import annotations

import json
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
    resident_before: int = 0  # the process's resident bytes just before the first tensor was read (0: unknown)


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
    parameters are read one at a time with plain file reads (no shard mapping) and put in `dtype` before the
    next; others go through transformers' conversions."""
    stats = LoadStats()
    if placeable(model, keys):
        for key, tensor in read_layer(files, weight_map, keys, stats, advance):
            place(model, key, tensor.to(device=device, dtype=dtype))
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


_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class ShardReader:
    """Tensors of safetensors shards read with plain file reads into memory of their own: no mapping, so no
    shard page ever counts in the process's memory; each shard's header is parsed once."""

    def __init__(self, files: ModelFiles, weight_map: dict[str, str], stats: LoadStats,
                 advance: Callable[[float], None] | None = None):
        self.files, self.weight_map, self.stats, self.advance = files, weight_map, stats, advance
        self._headers: dict[str, tuple[dict, int, str]] = {}

    def entry(self, key: str) -> tuple[str, torch.dtype, tuple[int, ...], int, int]:
        """(path, dtype, shape, offset, nbytes) of `key`."""
        shard = self.weight_map[key]
        if shard not in self._headers:
            path = self.files.fetch(shard)
            with open(path, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                self._headers[shard] = (json.loads(handle.read(size)), 8 + size, str(path))
            self.stats.shards.add(shard)
        header, base, path = self._headers[shard]
        info = header[key]
        begin, stop = info["data_offsets"]
        dtype = _TORCH_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ModelLoadError(f"{shard}: {key} is stored as {info['dtype']}, which cannot be read")
        return path, dtype, tuple(info["shape"]), base + begin, stop - begin

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """`key` as stored; into `out` (a contiguous CPU tensor of its dtype and shape) when given."""
        path, dtype, shape, offset, nbytes = self.entry(key)
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        if tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"{key}: cannot read {dtype} {list(shape)} into {out.dtype} {list(out.shape)}")
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        with open(path, "rb", buffering=0) as handle:
            handle.seek(offset)
            done = 0
            while done < nbytes:
                count = handle.readinto(view[done:])
                if not count:
                    raise ModelLoadError(f"{path}: {key} is cut short (truncated shard?)")
                done += count
        self.stats.tensors += 1
        self.stats.bytes_read += nbytes
        if self.advance is not None:
            self.advance(nbytes)
        return out

    def read_rows(self, keys: list[str]) -> torch.Tensor:
        """Several [out_i, in] tensors of one dtype read straight into one [sum(out), in] tensor (a fused matrix
        as stored: no part is held twice)."""
        entries = [self.entry(key) for key in keys]
        dtypes, widths = {e[1] for e in entries}, {e[2][1:] for e in entries}
        if len(dtypes) != 1 or len(widths) != 1 or any(len(e[2]) != 2 for e in entries):
            return torch.cat([self.read(key) for key in keys])
        rows = [e[2][0] for e in entries]
        out = torch.empty((sum(rows), *widths.pop()), dtype=dtypes.pop())
        start = 0
        for key, count in zip(keys, rows):
            self.read(key, out[start : start + count])
            start += count
        return out


def read_layer(
    files: ModelFiles, weight_map: dict[str, str], keys: list[str], stats: LoadStats,
    advance: Callable[[float], None] | None = None,
):
    """(key, tensor) for each of `keys`, as stored, read one at a time when asked for (memory of their own)."""
    reader = ShardReader(files, weight_map, stats, advance)
    for key in sorted(keys, key=lambda k: (weight_map[k], k)):
        yield key, reader.read(key)


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


def layer_keys(weight_map: dict[str, str], prefix: str, start: int, end: int) -> list[str]:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return [key for key in weight_map if (m := pattern.match(key)) and start <= int(m.group(1)) < end]


def check_materialised(module: nn.Module, what: str) -> None:
    missing = [name for name, tensor in module.state_dict().items() if tensor.is_meta]
    if missing:
        raise ModelLoadError(
            f"{what}: the checkpoint has no weights for {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
        )
