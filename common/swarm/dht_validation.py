"""What a potluck DHT peer agrees to store: only a node's own signed record, under its own subkey.

Anyone may write any key of a DHT, and hivemind keeps, per subkey, the entry that expires last. Without a
check on the storing peers, a stranger could write garbage (or its own record) under an honest node's subkey
with an expiry an hour away: readers would drop it as unverifiable, and the honest node's re-stores, expiring
sooner, would lose to it: the node vanishes from the swarm until the junk expires. So every potluck DHT peer
installs `RecordOwnerValidator`, which hivemind runs on each store another peer asks of it and on each entry
a peer returns to it:

- the value is one `SignedRecord` message (sealed with the swarm key in a private swarm) whose signature holds;
- the subkey is the record's own node id (block keys) or its config hash (the models index), so a record can
  only ever replace that node's own entries;
- the entry expires no later than the signed record does, so an old record cannot be replayed with a long life.

Only imported when a DHT backend starts (hivemind is the optional `dht` extra)."""

from __future__ import annotations

import time

import msgpack
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from common.swarm.records import RecordError, verify_record
from common.wire import record_codec as codec
from common.wire.generated import potluck_pb2 as pb

EXPIRY_SLACK = 1.0  # seconds an entry may outlive its record (float rounding on the way through the DHT)


def entry_is_valid(subkey: bytes | None, value: bytes, expiration_time: float, swarm_key=None,
                   now: float | None = None) -> bool:
    """Whether a DHT entry (hivemind's serialized subkey and value) is a record its subkey's owner signed."""
    if subkey is None:
        return False  # potluck keys are dictionaries: node id (or config hash) -> record
    try:
        name, blob = msgpack.unpackb(subkey), msgpack.unpackb(value)
        message = pb.SignedRecord()
        message.ParseFromString(blob)
    except Exception:  # msgpack and protobuf raise many kinds on garbage; anyone may write an entry
        return False
    if not isinstance(name, str):
        return False
    signed = codec.decode_records([message], swarm_key)
    if len(signed) != 1:
        return False
    try:
        record = verify_record(signed[0], now=time.time() if now is None else now)
    except RecordError:
        return False
    return name in (record.node_id, record.config_hash) and expiration_time <= record.expires_at + EXPIRY_SLACK


class RecordOwnerValidator(RecordValidatorBase):
    """hivemind's hook for `entry_is_valid` (DHT(record_validators=[...]))."""

    def __init__(self, swarm_key=None):
        self.swarm_key = swarm_key

    def validate(self, record: DHTRecord) -> bool:
        return entry_is_valid(record.subkey, record.value, record.expiration_time, self.swarm_key)
