"""The weights fingerprint in records (old records without one still validate) and the client's choice of nodes."""

from __future__ import annotations

from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.weights import majority_fingerprint, same_weights
from common.swarm.records import RecordError, sign_record, verify_record
from tests.unit.test_records import NOW, make_record, sign_payload


@pytest.fixture(scope="module")
def key():
    return Ed25519PrivateKey.generate()


def test_a_record_carries_its_weights_fingerprint(key):
    record = make_record(key, weights="ab" * 16)
    assert verify_record(sign_record(record, key), now=NOW).weights == "ab" * 16


def test_a_record_without_a_fingerprint_is_accepted_as_unknown(key):
    data = make_record(key).to_payload()
    del data["weights"]
    assert verify_record(sign_payload(data, key), now=NOW).weights == ""


@pytest.mark.parametrize("value", [7, "x" * 65])
def test_a_malformed_fingerprint_drops_the_record(key, value):
    data = make_record(key).to_payload()
    data["weights"] = value
    with pytest.raises(RecordError, match="weights"):
        verify_record(sign_payload(data, key), now=NOW)


def nodes(*fingerprints):
    keys = [Ed25519PrivateKey.generate() for _ in fingerprints]
    return [make_record(k, weights=f) for k, f in zip(keys, fingerprints)]


def test_the_majority_is_by_node_and_a_tie_is_none():
    records = nodes("a", "a", "b", "")
    assert majority_fingerprint(records) == "a"
    assert majority_fingerprint(records + [replace(records[0], seq=2)]) == "a"  # one vote a node
    assert majority_fingerprint(nodes("a", "b")) == ""
    assert majority_fingerprint(nodes("", "")) == ""


def test_same_weights_keeps_the_expected_and_says_why_others_are_refused():
    records = nodes("a", "b", "")
    kept, note = same_weights(records, "b", unfingerprinted=False)
    assert kept == [records[1]] and "1 node(s) serve other weights" in note and "announce no weights" in note
    kept, _ = same_weights(records, "b", unfingerprinted=True)
    assert kept == records[1:]
    kept, note = same_weights(nodes("a", "a", "b"), "", unfingerprinted=False)  # no files: the majority's
    assert [r.weights for r in kept] == ["a", "a"] and "1 node(s)" in note
    assert same_weights(nodes("a", "b"), "", unfingerprinted=False)[0] == []  # a tie: nobody is trusted
