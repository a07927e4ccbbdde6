"""Peer records are untrusted data: every way a record can be bad is rejected, with a reason."""

from dataclasses import replace

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.swarm.records import (
    MAX_CLOCK_SKEW,
    MAX_PAYLOAD_BYTES,
    MAX_TTL,
    Limits,
    NodeState,
    PeerRecord,
    RecordError,
    Registry,
    SignedRecord,
    node_id_of,
    renewed,
    sign_record,
    verify_record,
)
from common.wire.contract import PROTOCOL_VERSION

NOW = 1_700_000_000.0


def public_of(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def make_record(key: Ed25519PrivateKey, **changes) -> PeerRecord:
    record = PeerRecord(
        node_id=node_id_of(public_of(key)),
        addresses=("10.0.0.1:5000",),
        model_id="tiny/llama",
        config_hash="cfg-a",
        num_layers=30,
        start=0,
        end=10,
        throughput=12.5,
        issued_at=NOW,
        expires_at=NOW + 60,
        seq=1,
    )
    return replace(record, **changes)


def sign_payload(data: dict, key: Ed25519PrivateKey) -> SignedRecord:
    """Sign an arbitrary map, bypassing PeerRecord (the way a hostile or newer peer could)."""
    payload = msgpack.packb(data, use_bin_type=True)
    return SignedRecord(payload=payload, public_key=public_of(key), signature=key.sign(payload))


def sign_bytes(payload: bytes, key: Ed25519PrivateKey) -> SignedRecord:
    return SignedRecord(payload=payload, public_key=public_of(key), signature=key.sign(payload))


@pytest.fixture(scope="module")
def key():
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def other_key():
    return Ed25519PrivateKey.generate()


def valid_payload(key) -> dict:
    return make_record(key).to_payload()


# --- the good case -------------------------------------------------------------------------------


def test_node_id_is_a_short_hash_of_the_key(key, other_key):
    node_id = node_id_of(public_of(key))
    assert len(node_id) == 40 and int(node_id, 16) >= 0
    assert node_id == node_id_of(public_of(key))
    assert node_id != node_id_of(public_of(other_key))


def test_valid_record_round_trips(key):
    record = make_record(key, addresses=("a:1", "b:2"), state=NodeState.JOINING, load=2.0, name="n1")
    assert verify_record(sign_record(record, key), now=NOW) == record
    assert record.address == "a:1"
    assert record.short_id == record.node_id[:8]


def test_sign_refuses_a_record_of_another_node(key, other_key):
    with pytest.raises(ValueError, match="not this key"):
        sign_record(make_record(key), other_key)


def test_unknown_fields_are_ignored(key):
    data = valid_payload(key)
    data["gpu_temperature"] = 71.5
    data["future_feature"] = {"nested": [1, 2, 3]}
    assert verify_record(sign_payload(data, key), now=NOW) == make_record(key)


def test_optional_fields_may_be_absent(key):
    data = valid_payload(key)
    for name in ("dtype", "device", "throughput", "name", "load"):
        del data[name]
    record = verify_record(sign_payload(data, key), now=NOW)
    assert record.dtype == "float32" and record.throughput == 0.0 and record.name == ""


def test_integer_where_float_is_allowed(key):
    data = valid_payload(key)
    data.update(throughput=7, issued_at=int(NOW), expires_at=int(NOW) + 60)
    assert verify_record(sign_payload(data, key), now=NOW).throughput == 7


# --- signatures ----------------------------------------------------------------------------------


def test_unsigned_record_is_rejected(key):
    signed = sign_record(make_record(key), key)
    with pytest.raises(RecordError, match="unsigned"):
        verify_record(replace(signed, signature=b""), now=NOW)
    with pytest.raises(RecordError, match="unsigned"):
        verify_record(replace(signed, public_key=b""), now=NOW)


def test_signed_by_another_key_claiming_this_node_id(key, other_key):
    # a valid signature by other_key over a payload that claims key's node id
    payload = sign_record(make_record(key), key).payload
    with pytest.raises(RecordError, match="forged.*node_id"):
        verify_record(sign_bytes(payload, other_key), now=NOW)


def test_signature_from_another_key_presented_with_this_public_key(key, other_key):
    signed = sign_record(make_record(key), key)
    forged = replace(signed, signature=other_key.sign(signed.payload))
    with pytest.raises(RecordError, match="forged.*signature"):
        verify_record(forged, now=NOW)


def test_altered_signature_bytes(key):
    signed = sign_record(make_record(key), key)
    flipped = bytes([signed.signature[0] ^ 1]) + signed.signature[1:]
    with pytest.raises(RecordError, match="forged"):
        verify_record(replace(signed, signature=flipped), now=NOW)
    with pytest.raises(RecordError, match="forged"):
        verify_record(replace(signed, signature=signed.signature[:-1]), now=NOW)


def test_garbage_public_key(key):
    signed = sign_record(make_record(key), key)
    with pytest.raises(RecordError, match="forged"):
        verify_record(replace(signed, public_key=b"\x01" * 7), now=NOW)


def test_tampered_payload(key):
    signed = sign_record(make_record(key), key)
    tampered = msgpack.packb({**valid_payload(key), "end": 30}, use_bin_type=True)
    with pytest.raises(RecordError, match="forged.*signature"):
        verify_record(replace(signed, payload=tampered), now=NOW)
    one_byte = signed.payload[:-1] + bytes([signed.payload[-1] ^ 1])
    with pytest.raises(RecordError, match="forged"):
        verify_record(replace(signed, payload=one_byte), now=NOW)


def test_oversized_payload(key):
    data = valid_payload(key)
    data["padding"] = "x" * MAX_PAYLOAD_BYTES
    with pytest.raises(RecordError, match="exceeds"):
        verify_record(sign_payload(data, key), now=NOW)


# --- times ---------------------------------------------------------------------------------------


def test_expired_record(key):
    signed = sign_record(make_record(key), key)
    with pytest.raises(RecordError, match="expired"):
        verify_record(signed, now=NOW + 60)  # expires_at itself is already too late
    with pytest.raises(RecordError, match="expired"):
        verify_record(signed, now=NOW + 3600)
    assert verify_record(signed, now=NOW + 59.9).seq == 1


def test_issued_far_in_the_future(key):
    signed = sign_record(make_record(key, issued_at=NOW + 1000, expires_at=NOW + 1100), key)
    with pytest.raises(RecordError, match="implausible"):
        verify_record(signed, now=NOW)


def test_small_clock_skew_is_tolerated(key):
    record = make_record(key, issued_at=NOW + MAX_CLOCK_SKEW / 2, expires_at=NOW + 100)
    assert verify_record(sign_record(record, key), now=NOW) == record


def test_ttl_longer_than_max(key):
    signed = sign_record(make_record(key, expires_at=NOW + MAX_TTL + 1), key)
    with pytest.raises(RecordError, match="implausible"):
        verify_record(signed, now=NOW)
    ok = make_record(key, expires_at=NOW + MAX_TTL)
    assert verify_record(sign_record(ok, key), now=NOW) == ok


# --- protocol version ----------------------------------------------------------------------------


def test_wrong_protocol_version(key):
    signed = sign_record(make_record(key, protocol_version=999), key)
    with pytest.raises(RecordError, match=f"protocol version 999.*{PROTOCOL_VERSION}"):
        verify_record(signed, now=NOW)


def test_missing_protocol_version(key):
    data = valid_payload(key)
    del data["protocol_version"]
    with pytest.raises(RecordError, match="protocol version"):
        verify_record(sign_payload(data, key), now=NOW)


@pytest.mark.parametrize("version", [True, float(PROTOCOL_VERSION), str(PROTOCOL_VERSION)])
def test_protocol_version_of_the_wrong_type(key, version):
    data = {**valid_payload(key), "protocol_version": version}
    with pytest.raises(RecordError):
        verify_record(sign_payload(data, key), now=NOW)


# --- malformed payloads --------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"\x92\x01", b"\x81\xa1a", b"not msgpack at all \xff\xfe"])
def test_payload_that_is_not_msgpack(key, payload):
    with pytest.raises(RecordError, match="malformed"):
        verify_record(sign_bytes(payload, key), now=NOW)


@pytest.mark.parametrize("value", [[1, 2, 3], "a string", 42, None])
def test_payload_that_is_not_a_map(key, value):
    with pytest.raises(RecordError, match="malformed record: not a map"):
        verify_record(sign_bytes(msgpack.packb(value), key), now=NOW)


def test_map_with_non_string_keys(key):
    data = {**valid_payload(key), 7: "seven"}
    with pytest.raises(RecordError, match="malformed"):
        verify_record(sign_payload(data, key), now=NOW)


@pytest.mark.parametrize(
    "name", ["node_id", "addresses", "model_id", "config_hash", "num_layers", "start", "end", "issued_at",
             "expires_at", "seq", "state"],
)
def test_missing_required_field(key, name):
    data = valid_payload(key)
    del data[name]
    with pytest.raises(RecordError, match=f"malformed record: missing {name}"):
        verify_record(sign_payload(data, key), now=NOW)


@pytest.mark.parametrize(
    "name, value",
    [
        ("node_id", 5),
        ("addresses", "10.0.0.1:5000"),
        ("model_id", None),
        ("config_hash", b"cfg-a"),
        ("num_layers", 30.0),
        ("start", "0"),
        ("end", [10]),
        ("throughput", "fast"),
        ("load", None),
        ("issued_at", "yesterday"),
        ("seq", 1.5),
        ("state", 1),
        ("name", {"first": "n"}),
        ("free_cache_tokens", 1.0),
    ],
)
def test_field_of_the_wrong_type(key, name, value):
    data = {**valid_payload(key), name: value}
    with pytest.raises(RecordError, match=f"malformed record: {name} has type"):
        verify_record(sign_payload(data, key), now=NOW)


@pytest.mark.parametrize("name", ["num_layers", "start", "end", "seq", "free_cache_tokens", "max_length",
                                  "throughput", "load"])
def test_bool_where_number_is_expected(key, name):
    data = {**valid_payload(key), name: True}
    with pytest.raises(RecordError, match=f"malformed record: {name} has type bool"):
        verify_record(sign_payload(data, key), now=NOW)


@pytest.mark.parametrize("name", ["throughput", "prefill_throughput", "load", "issued_at", "expires_at"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers(key, name, value):
    data = {**valid_payload(key), name: value}
    with pytest.raises(RecordError, match=f"malformed record: {name} is not finite"):
        verify_record(sign_payload(data, key), now=NOW)


@pytest.mark.parametrize("start, end, num_layers", [(0, 31, 30), (-1, 10, 30), (10, 10, 30), (12, 10, 30),
                                                    (0, 1, 0), (0, 5, -5)])
def test_span_outside_the_model(key, start, end, num_layers):
    data = {**valid_payload(key), "start": start, "end": end, "num_layers": num_layers}
    with pytest.raises(RecordError, match="malformed record: span"):
        verify_record(sign_payload(data, key), now=NOW)


def test_span_reaching_the_last_layer_is_fine(key):
    record = make_record(key, start=20, end=30)
    assert verify_record(sign_record(record, key), now=NOW) == record


@pytest.mark.parametrize("state", ["online", "SLEEPING", ""])
def test_unknown_state(key, state):
    data = {**valid_payload(key), "state": state}
    with pytest.raises(RecordError, match="malformed record: unknown state"):
        verify_record(sign_payload(data, key), now=NOW)


@pytest.mark.parametrize("name", ["throughput", "prefill_throughput", "load", "free_cache_tokens", "max_length",
                                  "seq"])
def test_negative_numbers(key, name):
    data = {**valid_payload(key), name: -1}
    with pytest.raises(RecordError, match=f"malformed record: {name} is negative"):
        verify_record(sign_payload(data, key), now=NOW)


@pytest.mark.parametrize(
    "addresses",
    [[], [f"10.0.0.{i}:5000" for i in range(9)], [""], ["a:1", 5], ["x" * 256], [None]],
    ids=["none", "too-many", "empty-string", "not-a-string", "too-long", "null"],
)
def test_bad_addresses(key, addresses):
    data = {**valid_payload(key), "addresses": addresses}
    with pytest.raises(RecordError, match="malformed record: addresses"):
        verify_record(sign_payload(data, key), now=NOW)


def test_eight_addresses_are_allowed(key):
    record = make_record(key, addresses=tuple(f"10.0.0.{i}:5000" for i in range(8)))
    assert verify_record(sign_record(record, key), now=NOW).addresses == record.addresses


# --- renewal -------------------------------------------------------------------------------------


def test_renewed_bumps_seq_and_times(key):
    record = make_record(key)
    later = renewed(record, ttl=30, now=NOW + 100, load=3.0)
    assert later.seq > record.seq
    assert later.issued_at == NOW + 100 and later.expires_at == NOW + 130
    assert later.load == 3.0 and later.start == record.start and later.node_id == record.node_id
    assert renewed(later, ttl=30, now=NOW + 120).seq > later.seq
    # even renewed at the same instant, or with a clock behind the last seq, seq still grows
    assert renewed(later, ttl=30, now=NOW + 100).seq > later.seq
    ahead = replace(record, seq=10**18)
    assert renewed(ahead, ttl=30, now=NOW).seq == 10**18 + 1
    assert verify_record(sign_record(later, key), now=NOW + 110) == later
    registry = Registry()
    registry.offer(sign_record(record, key), now=NOW + 50)
    assert registry.offer(sign_record(later, key), now=NOW + 110) is True


# --- registry ------------------------------------------------------------------------------------


def test_registry_keeps_the_newest_seq(key):
    registry = Registry()
    first = make_record(key)
    assert registry.offer(sign_record(first, key), now=NOW) is True
    second = renewed(first, ttl=60, now=NOW + 1, end=20)
    assert registry.offer(sign_record(second, key), now=NOW + 2) is True
    assert registry.live(now=NOW + 2) == [second]
    # an older or equal seq is ignored, even when it says something different
    assert registry.offer(sign_record(first, key), now=NOW + 2) is False
    assert registry.offer(sign_record(replace(second, end=15), key), now=NOW + 2) is False
    assert registry.live(now=NOW + 2) == [second]
    assert registry.rejected == 0


def test_registry_keeps_the_signed_form_to_pass_on(key):
    registry = Registry()
    signed = sign_record(make_record(key), key)
    registry.offer(signed, now=NOW)
    assert registry.signed(now=NOW) == [signed]
    assert registry.signed(now=NOW + 60) == []


def test_registry_counts_rejections(key, other_key):
    registry = Registry()
    signed = sign_record(make_record(key), key)
    with pytest.raises(RecordError, match="unsigned"):
        registry.offer(replace(signed, signature=b""), now=NOW)
    with pytest.raises(RecordError, match="expired"):
        registry.offer(signed, now=NOW + 1000)
    assert registry.rejected == 2
    assert registry.records == {}


def test_registry_offer_many_reports_counts_and_reasons(key, other_key):
    registry = Registry()
    mine, theirs = make_record(key), make_record(other_key, start=10, end=20)
    batch = [
        sign_record(mine, key),
        sign_record(theirs, other_key),
        sign_record(mine, key),  # duplicate: not new
        sign_record(make_record(key, protocol_version=999, seq=5), key),
        replace(sign_record(mine, key), signature=b""),
        sign_record(make_record(key, expires_at=NOW - 1, issued_at=NOW - 10, seq=9), key),
    ]
    accepted, problems = registry.offer_many(batch, now=NOW)
    assert accepted == 2
    assert len(problems) == 3
    assert "protocol version 999" in problems[0]
    assert "unsigned" in problems[1]
    assert "expired" in problems[2]
    assert registry.rejected == 3
    assert [r.node_id for r in registry.live(now=NOW)] == sorted([mine.node_id, theirs.node_id])


def test_registry_expire_removes_expired(key, other_key):
    registry = Registry()
    short, long = make_record(key, expires_at=NOW + 10), make_record(other_key, expires_at=NOW + 100)
    registry.offer(sign_record(short, key), now=NOW)
    registry.offer(sign_record(long, other_key), now=NOW)
    assert registry.expire(now=NOW + 5) == []
    assert registry.expire(now=NOW + 10) == [short.node_id]
    assert list(registry.records) == [long.node_id]
    assert registry.expire(now=NOW + 200) == [long.node_id]
    assert registry.records == {}


def test_registry_live_filters(key, other_key):
    third_key = Ed25519PrivateKey.generate()
    registry = Registry()
    a = make_record(key, expires_at=NOW + 10)
    b = make_record(other_key, config_hash="cfg-b")
    c = make_record(third_key)
    for record, k in ((a, key), (b, other_key), (c, third_key)):
        registry.offer(sign_record(record, k), now=NOW)
    by_id = lambda records: sorted(records, key=lambda r: r.node_id)  # noqa: E731
    assert registry.live(now=NOW) == by_id([a, b, c])
    assert registry.live(now=NOW, model="cfg-a") == by_id([a, c])
    assert registry.live(now=NOW, model="cfg-b") == [b]
    assert registry.live(now=NOW, model="cfg-z") == []
    assert registry.live(now=NOW + 10) == by_id([b, c])  # a expired (still held until expire())
    # an OFFLINE announcement with a higher seq is a tombstone: held, but not live
    gone = renewed(c, ttl=60, now=NOW + 1, state=NodeState.OFFLINE)
    assert registry.offer(sign_record(gone, third_key), now=NOW + 1) is True
    assert registry.live(now=NOW + 1) == by_id([a, b])
    assert registry.records[c.node_id][0].state == NodeState.OFFLINE
    # and a stale ONLINE record cannot resurrect the node
    assert registry.offer(sign_record(c, third_key), now=NOW + 1) is False
    assert registry.live(now=NOW + 1, model="cfg-a") == [a]


# --- caps: strangers cannot grow a registry without bound -----------------------------------------
def _strangers(count: int, **changes) -> list:
    keys = [Ed25519PrivateKey.generate() for _ in range(count)]
    return [sign_record(make_record(k, **changes), k) for k in keys]


def test_registry_caps_new_identities_per_source_per_minute():
    registry = Registry(limits=Limits(per_source=5))
    accepted, problems = registry.offer_many(_strangers(8), now=NOW, source="203.0.113.7")
    assert accepted == 5 and len(problems) == 3 and "in a minute" in problems[0]
    assert registry.refused == 3 and registry.rejected == 0  # valid records refused, not invalid ones
    assert registry.offer_many(_strangers(2), now=NOW, source="198.51.100.1")[0] == 2  # another source
    later = _strangers(2, issued_at=NOW + 60, expires_at=NOW + 120)
    assert registry.offer_many(later, now=NOW + 61, source="203.0.113.7")[0] == 2  # a minute later
    assert registry.offer_many(_strangers(3), now=NOW)[0] == 3  # pulled by us: no source, no such limit


def test_registry_caps_per_model_in_total_and_unproven():
    per_model = Registry(limits=Limits(per_model=3))
    assert per_model.offer_many(_strangers(5), now=NOW)[0] == 3
    assert per_model.offer_many(_strangers(2, config_hash="cfg-b"), now=NOW)[0] == 2
    total = Registry(limits=Limits(total=4))
    assert total.offer_many(_strangers(3) + _strangers(3, config_hash="cfg-b"), now=NOW)[0] == 4
    pending = Registry(limits=Limits(pending=2))
    first = _strangers(2)
    assert pending.offer_many(first, now=NOW)[0] == 2
    assert pending.offer_many(_strangers(1), now=NOW)[0] == 0  # two unproven already
    assert pending.prove(node_id_of(first[0].public_key))
    assert pending.offer_many(_strangers(1), now=NOW)[0] == 1  # proving one made room
    # expired records make room again
    assert per_model.offer_many(_strangers(1, issued_at=NOW + 190, expires_at=NOW + 250), now=NOW + 200)[0] == 1


def test_registry_cuts_ttls_to_its_cap(key):
    registry = Registry(limits=Limits(max_ttl=90.0))
    long = make_record(key, expires_at=NOW + 3599)
    assert registry.offer(sign_record(long, key), now=NOW)
    assert registry.records[long.node_id][0].expires_at == NOW + 90
    assert registry.live(now=NOW + 91) == []


def test_registry_proofs_and_a_moved_address(key):
    registry = Registry()
    record = make_record(key)
    registry.offer(sign_record(record, key), now=NOW)
    assert registry.live(now=NOW, proven=True) == [] and registry.live(now=NOW) == [record]
    assert registry.prove(record.node_id) and registry.live(now=NOW, proven=True) == [record]
    renewal = renewed(record, ttl=60, now=NOW + 1)
    registry.offer(sign_record(renewal, key), now=NOW + 1)
    assert registry.is_proven(record.node_id)  # same address: still proven
    moved = renewed(renewal, ttl=60, now=NOW + 2, addresses=("10.0.0.9:5000",))
    registry.offer(sign_record(moved, key), now=NOW + 2)
    assert not registry.is_proven(record.node_id)  # the new address must answer for the node again
