"""Swarm behaviour that needs real gRPC nodes but not separate processes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from dataclasses import replace

import grpc
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client import DistributedModelForCausalLM
from common.swarm.identity import IdentityError, load_identity
from common.swarm.records import NodeState, PeerRecord, SignedRecord, node_id_of, sign_record
from common.wire import codec
from common.wire.generated import potluck_pb2 as pb
from common.wire.generated import potluck_pb2_grpc as pb_grpc


def gossip(address: str, records) -> list:
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.PotluckStub(channel).Gossip(pb.GossipRequest(records=codec.encode_records(records)), timeout=5)
    return codec.decode_records(reply.records)


def a_record(key: Ed25519PrivateKey, **changes) -> PeerRecord:
    now = time.time()
    record = PeerRecord(node_id=node_id_of(key.public_key().public_bytes_raw()), addresses=("127.0.0.1:9",),
                        model_id="m", config_hash="h" * 16, num_layers=6, start=0, end=2, issued_at=now,
                        expires_at=now + 30, seq=1, state=NodeState.ONLINE)
    return replace(record, **changes)


def test_a_node_drops_bad_records_and_keeps_good_ones(bg_loop, tiny_model_dir):
    node = bg_loop.start_node(tiny_model_dir("llama"), 0, 6)
    try:
        key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        good = sign_record(a_record(key), key)
        signed_by_other = sign_record(a_record(other), other)
        forged = SignedRecord(signed_by_other.payload, key.public_key().public_bytes_raw(), signed_by_other.signature)
        tampered = SignedRecord(good.payload.replace(b"127.0.0.1:9", b"127.0.0.1:8"), good.public_key, good.signature)
        expired = sign_record(a_record(key, issued_at=time.time() - 60, expires_at=time.time() - 1, seq=2), key)
        wrong_version = sign_record(a_record(key, protocol_version=99, seq=3), key)
        unsigned = SignedRecord(good.payload, good.public_key, b"")
        before = node.membership.registry.rejected
        held = gossip(node.address, [forged, tampered, expired, wrong_version, unsigned, good])
        assert node.membership.registry.rejected - before == 5
        payloads = {r.payload for r in held}
        # kept, but not passed on: nothing at 127.0.0.1:9 answers for it (a new identity earns its place)
        assert good.payload in {s.payload for s in node.membership.registry.signed()}
        assert good.payload not in payloads
        assert not payloads & {forged.payload, tampered.payload, expired.payload, wrong_version.payload}
        # still serving
        with grpc.insecure_channel(node.address) as channel:
            assert pb_grpc.PotluckStub(channel).Info(pb.InfoRequest(), timeout=5).end == 6
    finally:
        bg_loop.stop_node(node)


def test_one_swarm_carries_several_models(bg_loop, tiny_model_dir):
    llama, qwen = tiny_model_dir("llama"), tiny_model_dir("qwen2")
    first = bg_loop.start_node(llama, 0, 3)
    nodes = [first] + [
        bg_loop.start_node(model, a, b, bootstrap=(first.address,))
        for model, a, b in [(llama, 3, 6), (qwen, 0, 6)]
    ]
    try:
        for name, folder in [("llama", llama), ("qwen2", qwen)]:
            model = DistributedModelForCausalLM.from_pretrained(str(folder), bootstrap=[first.address], mdns=False)
            try:
                route = model.swarm.route()
                expected = {n.address for n in nodes if n.files.root == folder.resolve()}
                assert {hop.peer.address for hop in route} == expected, name
                ids = torch.randint(3, 512, (1, 6))
                assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 10)
            finally:
                model.close()
        done = subprocess.run([sys.executable, "-m", "node", "status", "--no-mdns", "--bootstrap", first.address],
                              capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.count("coverage [") == 2
        assert "WARNING" not in done.stdout
    finally:
        for node in nodes:
            bg_loop.stop_node(node)


def test_status_warns_loudly_about_uncovered_layers(bg_loop, tiny_model_dir):
    node = bg_loop.start_node(tiny_model_dir("mistral"), 0, 4)
    try:
        done = subprocess.run([sys.executable, "-m", "node", "status", "--no-mdns", "--bootstrap", node.address],
                              capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    finally:
        bg_loop.stop_node(node)
    assert done.returncode == 1
    assert "WARNING: no node serves layers 4:6" in done.stdout
    assert node.address in done.stdout and "ONLINE" in done.stdout


def test_status_stops_listening_once_the_swarm_is_complete(bg_loop, tiny_model_dir):
    import asyncio

    from client.status import collect
    from common.swarm.membership import SwarmConfig

    llama = tiny_model_dir("llama")
    first = bg_loop.start_node(llama, 0, 3)
    second = bg_loop.start_node(llama, 3, 6, bootstrap=(first.address,))
    try:
        config = SwarmConfig(bootstrap=(first.address,), mdns=False)
        started = time.monotonic()
        records = asyncio.run(collect(config, 20.0))  # --wait 20: the most it may listen
        took = time.monotonic() - started
        assert {r.node_id for r in records} == {first.identity.node_id, second.identity.node_id}
        assert took < 5, took  # both halves heard: no need to wait the 20 s
    finally:
        bg_loop.stop_node(second)
        bg_loop.stop_node(first)


def test_identity_is_persistent_private_and_exclusive(tmp_path):
    path = tmp_path / "id" / "node.pem"
    first = load_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(IdentityError, match="in use by another running node"):
        load_identity(path)
    node_id = first.node_id
    first.release()
    again = load_identity(path)
    assert again.node_id == node_id
    again.release()
    path.write_text("not a key")
    with pytest.raises(IdentityError, match="not a PEM private key"):
        load_identity(path)


def test_record_of_a_running_node_is_signed_and_describes_it(bg_loop, tiny_model_dir):
    node = bg_loop.start_node(tiny_model_dir("llama"), 1, 4, throughput=42.0, name="kitchen")
    try:
        held = gossip(node.address, [])
        from common.swarm.records import verify_record

        [record] = [verify_record(s) for s in held]
        assert record.node_id == node.identity.node_id
        assert (record.start, record.end, record.num_layers, record.state) == (1, 4, 6, NodeState.ONLINE)
        assert record.throughput == 42.0 and record.name == "kitchen" and record.addresses == (node.address,)
        assert record.expires_at - record.issued_at == pytest.approx(node.config.ttl)
    finally:
        bg_loop.stop_node(node)


def test_a_node_that_moves_says_so_in_a_serving_line_like_its_first(bg_loop, tiny_model_dir, capsys):
    """An auto-placed node alone on half of 6 layers (either half: placement picks among near-best windows); a
    fixed node joins on that half: the first moves to the hole and prints a `now serving` line at the default log
    level, not only a WARNING in the log."""
    from node.launcher import READY
    from node.server import serving_line

    llama = tiny_model_dir("llama")
    mover = bg_loop.start_node(llama, None, None, num_blocks=3, throughput=10.0, rebalance_period=0.2)
    first = (mover.record.start, mover.record.end)
    assert first in ((0, 3), (3, 6))
    hole = (3, 6) if first == (0, 3) else (0, 3)
    ready = serving_line(mover)
    assert READY.search(ready).groups() == (str(first[0]), str(first[1]), mover.address)
    fixed = bg_loop.start_node(llama, *first, throughput=10.0, bootstrap=(mover.address,))
    try:
        printed, deadline = "", time.monotonic() + 30
        while "now serving" not in printed and time.monotonic() < deadline:
            printed += capsys.readouterr().out
            time.sleep(0.05)
    finally:
        bg_loop.stop_node(fixed)
        bg_loop.stop_node(mover)
    expected = (f"potluck node {mover.identity.node_id[:8]} now serving layers {hole[0]}:{hole[1]} of {llama} on "
                f"{mover.address} (moved from {first[0]}:{first[1]})")
    assert expected in printed.splitlines(), printed
    assert READY.search(expected) is None  # a launcher waiting for the ready line does not take a move for it
