"""Strangers: 300 valid records, each signed by a fresh key with a near-maximal TTL, thrown at one node of a
real in-process swarm. The swarm must neither spread them nor stop working."""

from __future__ import annotations

import time

import grpc
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from transformers import AutoModelForCausalLM

from client import DistributedModelForCausalLM
from common.swarm.records import TTL_CAP, NodeState, PeerRecord, node_id_of, sign_record
from common.wire import codec
from common.wire.generated import potluck_pb2 as pb
from common.wire.generated import potluck_pb2_grpc as pb_grpc


def _junk(config_hash: str, count: int) -> list:
    now = time.time()
    out = []
    for index in range(count):
        key = Ed25519PrivateKey.generate()
        record = PeerRecord(node_id=node_id_of(key.public_key().public_bytes_raw()),
                            addresses=(f"127.0.0.1:{20000 + index}",), model_id="m", config_hash=config_hash,
                            num_layers=6, start=0, end=6, throughput=1e6, issued_at=now, expires_at=now + 3599,
                            seq=int(now * 1000), state=NodeState.ONLINE)
        out.append(sign_record(record, key))
    return out


@pytest.mark.timeout(120)
def test_three_hundred_fresh_keys_neither_spread_nor_hide_the_honest_nodes(bg_loop, tiny_model_dir):
    folder = tiny_model_dir("llama")
    fast = dict(heartbeat=0.5, ttl=3.0)
    first = bg_loop.start_node(folder, 0, 3, **fast)
    second = bg_loop.start_node(folder, 3, 6, bootstrap=(first.address,), **fast)
    third = bg_loop.start_node(folder, 0, 6, bootstrap=(first.address,), **fast)
    nodes = [first, second, third]
    try:
        chash = first.record.config_hash
        junk = _junk(chash, 300)
        with grpc.insecure_channel(first.address) as channel:  # the 256-record request limit: two calls
            for batch in (junk[:250], junk[250:]):
                pb_grpc.PotluckStub(channel).Gossip(pb.GossipRequest(records=codec.encode_records(batch)), timeout=10)
        junk_ids = {node_id_of(s.public_key) for s in junk}
        held = set(first.membership.registry.records) & junk_ids
        assert 0 < len(held) <= first.membership.config.limits.per_source  # per-source cap
        for node_id in held:  # TTLs cut to the cap
            record = first.membership.registry.records[node_id][0]
            assert record.expires_at - record.issued_at <= TTL_CAP
        time.sleep(3 * 0.5)  # a few gossip rounds (heartbeat 0.5 s): the junk must stay where it landed
        honest = {n.identity.node_id for n in nodes}
        for node in nodes:
            assert {r.node_id for r in node.membership.live(chash)} == honest
        for node in (second, third):
            assert not set(node.membership.registry.records) & junk_ids
        model = DistributedModelForCausalLM.from_pretrained(str(folder), bootstrap=[first.address], mdns=False)
        try:
            assert {hop.peer.node_id for hop in model.swarm.route()} <= honest
            ids = torch.randint(3, 512, (1, 6), generator=torch.Generator().manual_seed(0))
            got = model.generate(ids, max_new_tokens=6, do_sample=False)
        finally:
            model.close()
        expected = AutoModelForCausalLM.from_pretrained(str(folder)).eval().generate(ids, max_new_tokens=6,
                                                                                      do_sample=False)
        assert torch.equal(got, expected)
    finally:
        for node in nodes:
            bg_loop.stop_node(node)
