"""Unproven nodes are not believed: a liar's many identities cannot stop an honest client (issue 25)."""

from __future__ import annotations

import socket
import time
from dataclasses import replace

import grpc
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from transformers import AutoModelForCausalLM

from client import DistributedModelForCausalLM
from client.config import ClientConfig
from client.swarm import address_host
from common.swarm.records import NodeState, node_id_of, sign_record
from common.wire import codec
from common.wire.generated import potluck_pb2 as pb
from common.wire.generated import potluck_pb2_grpc as pb_grpc
from tests.support.faulty_node import make_slow


def dead_address(host: str) -> str:
    """An address on `host` where nothing listens (a port just bound and released)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return f"{host}:{sock.getsockname()[1]}"


def sybils(honest_record, count: int, host: str) -> list:
    """`count` records with the model's real config hash, every layer, 1e6 tokens/s advertised, dead addresses on
    one host, each signed by a fresh key (so each is a distinct, valid node id)."""
    now = time.time()
    signed = []
    for i in range(count):
        key = Ed25519PrivateKey.generate()
        record = replace(honest_record, node_id=node_id_of(key.public_key().public_bytes_raw()),
                         addresses=(dead_address(host),), start=0, end=honest_record.num_layers, throughput=1e6,
                         prefill_throughput=1e7, load=0.0, name=f"sybil-{i}", issued_at=now, expires_at=now + 120,
                         seq=1, state=NodeState.ONLINE, relay_slots=0, relay_via="")
        signed.append(sign_record(record, key))
    return signed


def test_address_host():
    assert address_host("127.0.0.2:4000") == "127.0.0.2"
    assert address_host("[::1]:4000") == "::1"
    assert address_host("node.example:1") == "node.example"


def test_twenty_sybils_do_not_stop_an_honest_client(bg_loop, tiny_model_dir):
    folder = tiny_model_dir("llama")
    # honest nodes advertise modest speeds (a CPU node: a few tokens/s), the sybils a million
    first = bg_loop.start_node(folder, 0, 3, throughput=5.0)
    second = bg_loop.start_node(folder, 3, 6, throughput=5.0, bootstrap=(first.address,))
    try:
        with grpc.insecure_channel(first.address) as channel:
            pb_grpc.PotluckStub(channel).Gossip(pb.GossipRequest(records=codec.encode_records(
                sybils(first.record, 20, "127.0.0.2"))), timeout=5)
        registry = first.membership.registry
        held = [node_id for node_id in registry.records if node_id not in registry.proven]
        assert len(held) == 20  # the node holds them, unproven: their addresses never answered with their ids
        assert len(first.membership.live(first.record.config_hash)) == 2  # and routes only the proven ones
        ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
        reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        expected = reference.generate(ids, max_new_tokens=6, do_sample=False)

        began = time.monotonic()
        model = DistributedModelForCausalLM.from_pretrained(str(folder), bootstrap=[first.address], mdns=False)
        try:
            out = model.generate(ids, max_new_tokens=6, do_sample=False)
            took = time.monotonic() - began
            tried = {key for key in model.swarm.bans._strikes if key.startswith("127.0.0.2:")}
        finally:
            model.close()
        assert torch.equal(out, expected)
        assert took <= 10, f"took {took:.1f}s"
        assert set(model.swarm.rtts) == {first.address, second.address}  # only answering nodes were measured
        # at most a few sybils were tried (pinged) before their host was ruled out: never one failover per
        # identity (with proofs of identity the client sees none of them at all)
        assert len(tried) <= 5, sorted(tried)
    finally:
        bg_loop.stop_node(second)
        bg_loop.stop_node(first)


def test_routing_believes_measured_not_advertised_speed(bg_loop, tiny_model_dir):
    """A liar advertises a million tokens/s and is slow; an honest node advertises a modest speed and is fast. The
    first session may try the liar (unmeasured, it is believed down to RouteCosts.unproven_layer_seconds); once
    measured, sessions go to the honest node, and every generation is exact."""
    folder = tiny_model_dir("llama")
    liar = bg_loop.start_node(folder, 0, 6, throughput=1e6)
    honest = bg_loop.start_node(folder, 0, 6, throughput=20.0)
    slow = make_slow(liar, 0.25)
    try:
        ids = torch.tensor([[2, 7, 11, 19, 23]])
        reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        expected = reference.generate(ids, max_new_tokens=4, do_sample=False)
        model = DistributedModelForCausalLM.from_pretrained(
            str(folder), config=ClientConfig(peers=(liar.address, honest.address)))
        try:
            began = time.monotonic()
            routes = []
            for _ in range(4):
                assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), expected)
                routes.append([hop.peer.address for hop in model.last_session.route])
            took = time.monotonic() - began
            measured = dict(model.swarm.measured)
        finally:
            model.close()
        assert routes[0] == [liar.address]  # believed (capped) before it was measured: the test can fail
        assert routes[1:] == [[honest.address]] * 3, routes  # measured slow: no more traffic
        assert measured[liar.address] > 10 * measured[honest.address], measured
        assert slow.steps <= 4 and took < 20, (slow.steps, took)
    finally:
        bg_loop.stop_node(honest)
        bg_loop.stop_node(liar)
