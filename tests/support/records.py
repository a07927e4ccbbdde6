"""Signed records as an older node would send them (a field it did not know yet left out)."""

from __future__ import annotations

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.swarm.records import PeerRecord, SignedRecord, node_id_of, verify_record


def verified_with_and_without(field: str, value) -> tuple[PeerRecord, PeerRecord]:
    """A record carrying `field` = `value`, verified as sent, and verified again signed without the field."""
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes_raw()
    record = PeerRecord(node_id=node_id_of(public), addresses=("a:1",), model_id="m", config_hash="c", num_layers=4,
                        start=0, end=2, issued_at=1000.0, expires_at=1010.0, seq=1, **{field: value})

    def signed(data: dict) -> SignedRecord:
        payload = msgpack.packb(data, use_bin_type=True)
        return SignedRecord(payload=payload, public_key=public, signature=key.sign(payload))

    data = record.to_payload()
    with_field = verify_record(signed(data), now=1001.0)
    del data[field]
    return with_field, verify_record(signed(data), now=1001.0)
