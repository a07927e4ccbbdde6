"""A model's weights fingerprint: which weights, not just which architecture (config_hash).

The fingerprint hashes the config hash and the sha256 of every tensor OUTSIDE the decoder layers (token
embeddings, final norm, LM head: the "client parts"), each as stored in the files: raw bytes read at the
tensor's offsets, no dtype conversion. Every node and every client with the files computes the same value
from a few hundred MB at most, without reading the layers (docs/swarm.md: why this and not a hash of all
weights). Two checkpoints of one architecture with different weights (another seed, a fine-tune that
trained its embeddings or head) get different fingerprints, so a client does not mix them in one chain."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterable
from pathlib import Path

from common.weights import gguf
from common.weights.errors import ModelLoadError
from common.weights.files import ModelFiles, config_hash

# What a node serves a client that lacks the model's files (rpc ModelFile, node/rpc/model_files.py): these
# metadata files, and CLIENT_PARTS_FILE, a safetensors file of the client parts (checked by the fingerprint).
SHARED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                "vocab.json", "merges.txt", "tokenizer.model")
CLIENT_PARTS_FILE = "client_parts.safetensors"
FINGERPRINT_CHARS = 32  # hex characters of a fingerprint (128 bits)
_CHUNK = 8 << 20
_LAYER_KEY = re.compile(r"(^|\.)(layers|h|blocks|block)\.\d+\.")  # a decoder layer's tensor ("model.layers.3.")


def is_client_key(name: str) -> bool:
    """True for a safetensors tensor outside the decoder layers (embeddings, final norm, head)."""
    return _LAYER_KEY.search(name) is None


def _digest_range(handle, begin: int, end: int, head: bytes) -> str:
    digest = hashlib.sha256(head)
    handle.seek(begin)
    remaining = end - begin
    while remaining > 0:
        chunk = handle.read(min(_CHUNK, remaining))
        if not chunk:
            raise ModelLoadError(f"{handle.name}: truncated at byte {end - remaining} of a tensor")
        digest.update(chunk)
        remaining -= len(chunk)
    return digest.hexdigest()


def read_safetensors_header(handle) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and where its data starts."""
    (length,) = struct.unpack("<Q", handle.read(8))
    if length > 100 << 20:
        raise ModelLoadError(f"{handle.name}: a safetensors header of {length} bytes")
    return json.loads(handle.read(length)), 8 + length


def client_tensors(files: ModelFiles) -> dict[str, list[str]]:
    """shard file name -> the names of its tensors outside the decoder layers (safetensors only)."""
    by_shard: dict[str, list[str]] = {}
    for name, shard in files.weight_map().items():
        if is_client_key(name):
            by_shard.setdefault(shard, []).append(name)
    return by_shard


def safetensors_digests(path: Path, names: Iterable[str]) -> dict[str, str]:
    """name -> sha256 of (dtype, shape, raw bytes) of each named tensor of one safetensors file."""
    out = {}
    with open(path, "rb") as handle:
        header, data_start = read_safetensors_header(handle)
        for name in names:
            entry = header.get(name)
            if not isinstance(entry, dict):
                raise ModelLoadError(f"{path.name} has no tensor {name!r}")
            begin, end = entry["data_offsets"]
            head = f"{entry['dtype']}{entry['shape']}".encode()
            out[name] = _digest_range(handle, data_start + begin, data_start + end, head)
    return out


def client_digests(files: ModelFiles) -> dict[str, str]:
    """name -> digest of each tensor outside the decoder layers, as stored (safetensors or GGUF)."""
    if files.gguf is not None:
        header = gguf.read_header(files.gguf)
        with open(header.path, "rb") as handle:
            return {entry.name: _digest_range(handle, entry.offset, entry.offset + entry.nbytes,
                                              f"{entry.qtype.name}{list(entry.shape)}".encode())
                    for entry in header.tensors.values() if gguf.layer_of(entry.name) is None}
    out: dict[str, str] = {}
    for shard, names in sorted(client_tensors(files).items()):
        out.update(safetensors_digests(files.fetch(shard), names))
    return out


def fingerprint_of(chash: str, digests: dict[str, str]) -> str:
    """The weights fingerprint of a model of config hash `chash` whose client parts have `digests`."""
    if not digests:
        raise ModelLoadError("no tensors outside the decoder layers: nothing to fingerprint")
    text = "potluck-weights-1\n" + chash + "\n" + "".join(f"{name}={digests[name]}\n" for name in sorted(digests))
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_CHARS]


def weights_fingerprint(files: ModelFiles) -> str:
    """The fingerprint of the model in `files` (reads its client parts once; the layers are not read)."""
    return fingerprint_of(config_hash(files.config()), client_digests(files))
