"""rpc ModelFile: the files a client needs besides the swarm, from this node's own model folder.

Only a fixed allow-list is served: the config, generation defaults, tokenizer files and chat template, and
"client_parts.safetensors", a safetensors file made on request of the tensors outside the decoder layers
(embeddings, final norm, head) with their bytes as stored, so that its weights fingerprint is the model's
(common/weights/fingerprint.py). Nothing is held in memory: the file is streamed from the shards' ranges."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator
from pathlib import Path

from common.weights.files import ModelFiles
from common.weights.fingerprint import CLIENT_PARTS_FILE, SHARED_FILES, client_tensors, read_safetensors_header
from node.runtime.errors import NotFound

CLIENT_PARTS = CLIENT_PARTS_FILE
METADATA_FILES = SHARED_FILES
MAX_METADATA_BYTES = 64 << 20  # a tokenizer.json is a few MB; nothing else on the list is near this
CHUNK_BYTES = 1 << 20

Range = tuple[Path, int, int]  # a file, and [begin, end) in it


def client_parts_layout(files: ModelFiles) -> tuple[bytes, list[Range]]:
    """The header of a safetensors file of the client parts, and the shard ranges its data is made of."""
    header: dict = {}
    ranges: list[Range] = []
    offset = 0
    for shard, names in sorted(client_tensors(files).items()):
        path = files.fetch(shard)
        with open(path, "rb") as handle:
            source, data_start = read_safetensors_header(handle)
        for name in sorted(names):
            begin, end = source[name]["data_offsets"]
            header[name] = {"dtype": source[name]["dtype"], "shape": source[name]["shape"],
                            "data_offsets": [offset, offset + end - begin]}
            ranges.append((path, data_start + begin, data_start + end))
            offset += end - begin
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob, ranges


class ModelFileServer:
    """The allow-listed files of one model folder (a GGUF node serves only its metadata)."""

    def __init__(self, files: ModelFiles):
        self.files = files

    def open(self, name: str) -> tuple[int, AsyncIterator[bytes]]:
        """The size of file `name` and its chunks; NotFound for a name off the list or a file the node lacks."""
        if name == CLIENT_PARTS:
            if self.files.gguf is not None:
                raise NotFound(f"{CLIENT_PARTS}: this node serves a GGUF file, not safetensors")
            head, ranges = client_parts_layout(self.files)
            return len(head) + sum(end - begin for _, begin, end in ranges), _chunks(head, ranges)
        if name not in METADATA_FILES:
            raise NotFound(f"{name!r} is not a file nodes serve (they serve {', '.join(METADATA_FILES)}, "
                           f"{CLIENT_PARTS})")
        path = self.files.root / name
        if not path.is_file() or path.stat().st_size > MAX_METADATA_BYTES:
            raise NotFound(f"this node's model has no {name}")
        size = path.stat().st_size
        return size, _chunks(b"", [(path, 0, size)])


async def _chunks(head: bytes, ranges: list[Range]) -> AsyncIterator[bytes]:
    if head:
        yield head
    for path, begin, end in ranges:
        while begin < end:
            data = await asyncio.to_thread(_read, path, begin, min(CHUNK_BYTES, end - begin))
            if not data:
                raise NotFound(f"{path.name} is shorter than its header says")
            yield data
            begin += len(data)


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)
