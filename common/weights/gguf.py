"""Read a model straight from a GGUF file: its config, its tokenizer, and only the tensors asked for.

The file is memory-mapped; a node dequantises (with `gguf.quants.dequantize`) only its span's tensors,
one at a time, and a client only the embeddings, the final norm and the head. The config, the
GGUF -> transformers tensor names and the weight fix-ups (llama.cpp's Q/K row permutation, norms
stored as `w - 1`, ...) are transformers' own (`modeling_gguf_pytorch_utils`), so a span equals the
same layers of `AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`.

The header is parsed here rather than with `gguf.GGUFReader`, which builds a numpy view per token
of the vocabulary (8-20 s for SmolLM2's 49k tokens); this walk skips arrays and takes ~0.1 s.
transformers' config and tokenizer builders still use the slow reader, so their results are written
once per file into a small sidecar folder (config.json, tokenizer files) that later loads reuse."""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from torch import nn

from common.weights.errors import ModelLoadError
from common.weights.reading import LoadStats

log = logging.getLogger(__name__)

SUFFIX = ".gguf"
SIDECAR_ROOT = Path("~/.cache/potluck/gguf").expanduser()
_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
# fixed-size metadata value types (gguf.GGUFValueType): struct format of one value
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorEntry:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order (ggml lists the fastest-moving dimension first)
    offset: int  # from the start of the file
    nbytes: int


@dataclass(frozen=True)
class GgufHeader:
    """A GGUF file's scalar metadata and tensor table; no tensor data is read."""

    path: Path
    metadata: dict  # scalars and strings; arrays are kept as their length
    tensors: dict[str, TensorEntry]
    digest: str  # of the metadata and tensor table: the same file gives the same digest anywhere

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    def quant_types(self) -> dict[str, int]:
        """ggml type name -> number of tensors stored in it."""
        counts: dict[str, int] = {}
        for entry in self.tensors.values():
            counts[entry.qtype.name] = counts.get(entry.qtype.name, 0) + 1
        return counts


def read_header(path: Path) -> GgufHeader:
    """Parse `path`'s header; ModelLoadError if it is not a whole, readable GGUF file."""
    try:
        blob = np.memmap(path, mode="r", dtype=np.uint8)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error
    try:
        header = _parse(path, blob)
    except (struct.error, UnicodeDecodeError, KeyError, ValueError, OverflowError) as error:
        raise ModelLoadError(f"{path} is not a valid GGUF file ({type(error).__name__}: {error})") from error
    finally:
        del blob
    return header


def _parse(path: Path, blob: np.ndarray) -> GgufHeader:
    if bytes(blob[:4]) != _MAGIC:
        raise ValueError("it does not start with the GGUF magic bytes")
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", blob, 4)
    if version not in _VERSIONS:
        raise ValueError(f"GGUF version {version} (supported: {', '.join(map(str, _VERSIONS))})")
    pos, metadata = 24, {}
    for _ in range(kv_count):
        key, pos = _string(blob, pos)
        (kind,) = struct.unpack_from("<I", blob, pos)
        metadata[key], pos = _value(blob, pos + 4, kind)
    if "general.architecture" not in metadata:
        raise ValueError("no general.architecture in its metadata")
    entries = []
    for _ in range(tensor_count):
        name, pos = _string(blob, pos)
        (dims,) = struct.unpack_from("<I", blob, pos)
        shape = struct.unpack_from(f"<{dims}Q", blob, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * dims)
        pos += 4 + 8 * dims + 12
        entries.append((name, tuple(reversed(shape)), GGMLQuantizationType(qtype), offset))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = (pos + alignment - 1) // alignment * alignment
    tensors = {}
    for name, shape, qtype, offset in entries:
        block, size = GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape, dtype=np.int64)) // block * size
        start = data_start + offset
        if start + nbytes > len(blob):
            raise ValueError(f"tensor {name} ends at byte {start + nbytes} but the file has {len(blob)} (truncated?)")
        tensors[name] = TensorEntry(name, qtype, shape, start, nbytes)
    digest = hashlib.sha256(bytes(blob[:data_start])).hexdigest()[:16]
    return GgufHeader(path=path, metadata=metadata, tensors=tensors, digest=digest)


def _string(blob: np.ndarray, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    if pos + 8 + length > len(blob):
        raise ValueError(f"a string at byte {pos} runs past the end of the file")
    return bytes(blob[pos + 8 : pos + 8 + length]).decode("utf-8"), pos + 8 + length


def _value(blob: np.ndarray, pos: int, kind: int):
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)
    if kind == _STRING:
        return _string(blob, pos)
    if kind == _ARRAY:
        item, count = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        if item in _SCALARS:
            return count, pos + count * struct.calcsize(_SCALARS[item])
        if item != _STRING:
            raise ValueError(f"an array of metadata type {item}")
        for _ in range(count):
            (length,) = struct.unpack_from("<Q", blob, pos)
            pos += 8 + length
        return count, pos
    raise ValueError(f"unknown metadata value type {kind}")


def check_supported(header: GgufHeader) -> None:
    """ModelLoadError unless transformers' GGUF loader (the legacy, dequantising one) knows the architecture."""
    from transformers.integrations.gguf import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = header.architecture
    if arch in GGUF_ARCHS or arch not in GGUF_SUPPORTED_ARCHITECTURES:
        known = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - set(GGUF_ARCHS) - {"general", "tokenizer"})
        raise ModelLoadError(
            f"{header.path.name}: GGUF architecture {arch!r} is not supported (supported: {', '.join(known)})"
        )


def sidecar_folder(header: GgufHeader, root: Path = SIDECAR_ROOT) -> Path:
    """Where this file's config.json and tokenizer files are kept once written (both depend on the header only)."""
    import transformers

    return root / f"{header.path.stem}-{header.digest}-transformers-{transformers.__version__}"


def ensure_config(header: GgufHeader, folder: Path) -> None:
    """Write transformers' config for the file into `folder` (once); nodes and clients then read the same JSON."""
    if (folder / "config.json").is_file():
        return
    from transformers import AutoConfig

    config = _read_with_transformers(header, AutoConfig, "config")
    config.name_or_path = header.path.stem
    # in the config hash: another quantisation of the same model is other weights, so another model in the swarm
    config.gguf_header_digest = header.digest
    _write_atomically(folder, config.save_pretrained)


def ensure_tokenizer(header: GgufHeader, folder: Path) -> None:
    """Write the file's tokenizer (transformers' conversion of its vocabulary) into `folder` (once)."""
    if (folder / "tokenizer_config.json").is_file():
        return
    from transformers import AutoTokenizer

    tokenizer = _read_with_transformers(header, AutoTokenizer, "tokenizer")
    _write_atomically(folder, tokenizer.save_pretrained, last="tokenizer_config.json")


def _read_with_transformers(header: GgufHeader, auto_class: type, what: str):
    """`auto_class.from_pretrained` on the file (transformers' slow reader), its errors as ModelLoadError."""
    log.info("reading the %s of %s (once)", what, header.path.name)
    try:
        return auto_class.from_pretrained(header.path.parent, gguf_file=header.path.name)
    except (ValueError, KeyError, OSError) as error:
        raise ModelLoadError(f"cannot build a {what} from {header.path.name}: {str(error).splitlines()[0]}") from error


def _write_atomically(folder: Path, save: Callable[[str], object], last: str | None = None) -> None:
    """`save(tmp)` then move its files into `folder` (`last` moved last: its presence means complete)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".partial-") as tmp:
        save(tmp)
        names = sorted(os.listdir(tmp), key=lambda name: name == last)
        for name in names:
            os.replace(os.path.join(tmp, name), folder / name)


class _NamesOnly:
    """What `get_gguf_hf_weights_map` reads of a module (config, state_dict keys, children), for one level.

    transformers walks every submodule and rebuilds gguf's name table (~25 ms) at each of them: ~400
    times, 10 s, for SmolLM2. Asking for the model and its direct children only gives the same map for
    the decoder families (block tensors only ever match under their full name)."""

    def __init__(self, config, names: list[str]):
        self.config, self._names = config, names

    def state_dict(self) -> dict:
        return dict.fromkeys(self._names)

    def named_children(self) -> list:
        return []


def _processor_and_names(model: nn.Module, header: GgufHeader):
    """transformers' tensor processor for the architecture and its GGUF -> transformers name map."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    processor = TENSOR_PROCESSORS.get(header.architecture, TensorProcessor)(config=model.config.to_dict())
    keys = list(model.state_dict())
    try:
        names = get_gguf_hf_weights_map(_NamesOnly(model.config, keys), processor)
        for child, _ in model.named_children():
            inner = [key[len(child) + 1 :] for key in keys if key.startswith(child + ".")]
            sub = get_gguf_hf_weights_map(_NamesOnly(model.config, inner), processor, qual_name=f"{child}.")
            names.update({k: v for k, v in sub.items() if k not in names})
    except NotImplementedError as error:
        raise ModelLoadError(f"{header.path.name}: {error}") from error
    return processor, names


def layer_of(gguf_name: str) -> int | None:
    """`blk.12.attn_q.weight` -> 12; None for tensors outside the decoder layers."""
    parts = gguf_name.split(".")
    return int(parts[1]) if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit() else None


def tensor_mapping(model: nn.Module, header: GgufHeader):
    """transformers' tensor processor and GGUF -> transformers name map for `model` (build once per load)."""
    return _processor_and_names(model, header)


def read_tensors(
    header: GgufHeader, mapping, wanted: Callable[[str], bool], stats: LoadStats,
    advance: Callable[[float], None] | None = None,
) -> dict:
    """The file's tensors whose GGUF name passes `wanted`, dequantised (float32, memory of their own) one at a
    time, by transformers name; the file is mapped for this call only (its pages go when it returns).

    Tensors transformers does not map (e.g. llama 3's `rope_freqs`) are neither read nor counted."""
    processor, names = mapping
    chosen = [entry for name, entry in header.tensors.items() if name in names and wanted(name)]
    stats.shards.add(header.path.name)
    parsed: dict = {"tensors": {}}
    blob = np.memmap(header.path, mode="r", dtype=np.uint8)
    try:
        for entry in chosen:
            raw = blob[entry.offset : entry.offset + entry.nbytes]
            block, size = GGML_QUANT_SIZES[entry.qtype]
            rows = raw.reshape(*entry.shape[:-1], entry.shape[-1] // block * size)
            try:
                values = dequantize(rows, entry.qtype)
            except NotImplementedError as error:
                raise ModelLoadError(
                    f"{header.path.name}: {entry.name} is {entry.qtype.name}, which cannot be dequantised: {error}"
                ) from error
            del rows, raw
            result = processor.process(
                weights=values, name=entry.name, tensor_key_mapping=names, parsed_parameters=parsed
            )
            if result.name is not None and result.name in names:
                weights = np.ascontiguousarray(result.weights)
                if np.shares_memory(weights, blob):
                    weights = np.copy(weights)
                parsed["tensors"][names[result.name]] = torch.from_numpy(weights)
            stats.tensors += 1
            stats.bytes_read += entry.nbytes
            if advance is not None:
                advance(entry.nbytes)
    finally:
        del blob  # our tensors are copies: the mapping (and its pages in RSS) goes now
    return parsed["tensors"]


def load_tensors(
    header: GgufHeader, model: nn.Module, wanted: Callable[[str], bool], device: torch.device, dtype: torch.dtype,
    advance: Callable[[float], None] | None = None,
) -> LoadStats:
    """Dequantise the file's tensors whose GGUF name passes `wanted` into `model` in `dtype`, one at a time
    (each put in place as it is read: one float32 tensor at a time beside the result)."""
    from common.weights.reading import place, placeable

    stats = LoadStats()
    mapping = tensor_mapping(model, header)
    keys = [mapping[1][name] for name in header.tensors if name in mapping[1] and wanted(name)]
    if placeable(model, keys):
        for name in (name for name in header.tensors if name in mapping[1] and wanted(name)):
            for key, tensor in read_tensors(header, mapping, lambda n, name=name: n == name, stats, advance).items():
                place(model, key, tensor.to(device=device, dtype=dtype))
        return stats
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    tensors = {key: tensor.to(dtype) for key, tensor in read_tensors(header, mapping, wanted, stats, advance).items()}
    load_config = LoadStateDictConfig(
        device_map={"": device}, dtype=dtype, dtype_plan=model._get_dtype_plan(dtype),
        weight_mapping=get_model_conversion_mapping(model),
    )
    convert_and_load_state_dict_in_model(model=model, state_dict=tensors, load_config=load_config)
    return stats


def span_bytes(header: GgufHeader, start: int, end: int) -> int:
    """The span's tensors' bytes in the file (for a progress bar)."""
    return sum(e.nbytes for name, e in header.tensors.items() if (i := layer_of(name)) is not None and start <= i < end)
