"""Anti-entropy digests: what a registry holds, compactly, so that an exchange sends only what is missing.

A digest is packed bytes, one 16-byte entry per record: the first 8 bytes of the node id and the record's
seq (big-endian). 1,000 records make a 16 KB digest (about 11 KB after gRPC's gzip), where the records
themselves are about 630 KB. An id prefix that two nodes share (2^-64 odds unless ground on purpose) only
means one of them is not passed on by this exchange."""

from __future__ import annotations

import struct
from functools import lru_cache

ENTRY = struct.Struct(">8sQ")


@lru_cache(maxsize=1 << 16)  # a pure function called for every record of every exchange
def prefix(node_id: str) -> bytes:
    return bytes.fromhex(node_id[:16])


def pack(entries) -> bytes:
    """(node_id, seq) pairs -> a digest."""
    return b"".join(ENTRY.pack(prefix(node_id), seq) for node_id, seq in entries)


def unpack(data: bytes) -> dict[bytes, int]:
    """A digest -> {id prefix: seq}; ValueError if it is not whole entries."""
    if len(data) % ENTRY.size:
        raise ValueError(f"a digest of {len(data)} bytes is not a whole number of {ENTRY.size}-byte entries")
    return dict(ENTRY.iter_unpack(data))


def missing(held, theirs: dict[bytes, int]) -> list[str]:
    """Node ids among `held` ((node_id, seq) pairs) of which `theirs` lacks the record or holds an older one."""
    return [node_id for node_id, seq in held if theirs.get(prefix(node_id), -1) < seq]


def wanted(held: dict[bytes, int], theirs: dict[bytes, int], new_at_most: int | None = None) -> bytes:
    """Packed 8-byte id prefixes of the records `theirs` holds newer than `held` (or that `held` lacks); of those
    `held` lacks, at most `new_at_most` (None: all)."""
    keys, new = [], 0
    for key, seq in theirs.items():
        if key in held:
            if held[key] < seq:
                keys.append(key)
        elif new_at_most is None or new < new_at_most:
            keys.append(key)
            new += 1
    return b"".join(keys)
