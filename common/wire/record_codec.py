"""Signed records <-> messages: the part of the wire format gossip needs, without torch (so `potluck status`
and other record-only readers start fast). common.wire.codec re-exports both functions."""

from __future__ import annotations

import msgpack

from common.swarm.records import SignedRecord
from common.wire.generated import potluck_pb2 as pb


def encode_records(records, key=None) -> list[pb.SignedRecord]:
    """common.swarm.records.SignedRecord -> messages. With a swarm key (common.wire.security.SwarmKey) each
    record is sealed whole into `payload`: outside the private swarm it can be neither read nor used."""
    if key is None:
        return [pb.SignedRecord(payload=r.payload, public_key=r.public_key, signature=r.signature) for r in records]
    return [pb.SignedRecord(payload=key.seal(msgpack.packb([r.payload, r.public_key, r.signature])))
            for r in records]


def decode_records(messages, key=None) -> list:
    """Messages -> common.swarm.records.SignedRecord (verification is the registry's job). With a swarm
    key, records not sealed with it are dropped (another swarm's, or a public node's)."""
    if key is None:
        return [SignedRecord(payload=m.payload, public_key=m.public_key, signature=m.signature) for m in messages]
    records = []
    for message in messages:
        opened = key.unseal(message.payload)
        try:
            payload, public_key, signature = msgpack.unpackb(opened) if opened is not None else (None,) * 3
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            continue
        if isinstance(payload, bytes) and isinstance(public_key, bytes) and isinstance(signature, bytes):
            records.append(SignedRecord(payload=payload, public_key=public_key, signature=signature))
    return records
