"""Discovery through the hivemind DHT only (no bootstrap, no mDNS): real DHT peers on loopback, real gRPC nodes.

Slow: every DHT peer is a child process plus a p2pd process (~250 MB). Four peers at most: three nodes and
one client or reader at a time, each shut down."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import DistributedModelForCausalLM
from client.config import ClientConfig
from common.swarm.dht import DhtConfig, DhtDiscovery, block_key
from common.swarm.records import NodeState, node_id_of

pytest.importorskip("hivemind")
pytestmark = pytest.mark.slow

REFRESH = 1.0  # nodes re-store every second; records live 3 s


@pytest.fixture(scope="module")
def dht_swarm(bg_loop, tiny_model_dir):
    """Three nodes of the tiny llama, found through the first one's DHT peer only."""
    folder = tiny_model_dir("llama")
    options = dict(host="127.0.0.1", discovery="dht", dht_refresh=REFRESH, rebalance=False)
    first = bg_loop.start_node(folder, 0, 2, **options)
    peers = tuple(first.membership.visible_maddrs())
    assert peers and all(p.startswith("/ip4/127.0.0.1/tcp/") for p in peers)
    nodes = [first] + [bg_loop.start_node(folder, a, b, initial_peers=peers, **options) for a, b in [(2, 4), (4, 6)]]
    yield folder, peers, nodes
    for node in nodes:
        if node in bg_loop.running:
            bg_loop.stop_node(node)


def reader(bg_loop, peers, nodes) -> DhtDiscovery:
    """A client-mode DHT peer watching the tiny model's keys."""
    record = nodes[0].record
    discovery = DhtDiscovery(DhtConfig(initial_peers=peers, host_maddrs=("/ip4/127.0.0.1/tcp/0",), client_mode=True),
                             watch={record.config_hash: record.num_layers})
    bg_loop.run(discovery.start())
    return discovery


def wait_until(bg_loop, discovery: DhtDiscovery, predicate, timeout: float = 15.0) -> bool:
    async def poll() -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await discovery.pull_all()
            if predicate():
                return True
            await asyncio.sleep(0.2)
        return False

    return bg_loop.run(poll())


def test_a_client_finds_the_chain_through_the_dht_and_generates_exactly(dht_swarm):
    folder, peers, nodes = dht_swarm
    config = ClientConfig(initial_peers=peers, mdns=False)  # discovery "auto": the DHT, since peers are given
    model = DistributedModelForCausalLM.from_pretrained(str(folder), config=config)
    try:
        assert {hop.peer.address for hop in model.swarm.route()} == {n.address for n in nodes}
        ids = torch.randint(3, 512, (1, 7), generator=torch.Generator().manual_seed(1))
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    finally:
        model.close()
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    expected = reference.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, expected)


def test_a_stranger_cannot_overwrite_a_nodes_entries(bg_loop, dht_swarm):
    """The attack: a DHT peer without potluck's validator writes junk, and its own valid record, under an honest
    node's subkeys with an expiry an hour away (hivemind keeps the entry that expires last). The storing peers
    refuse both (common/swarm/dht_validation.py), so the node stays visible past several TTLs and a client
    still generates exactly."""
    import hivemind
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from common.swarm.dht import MODELS_KEY
    from common.swarm.records import renewed, sign_record
    from common.wire import codec

    folder, peers, nodes = dht_swarm
    victim = nodes[0].record
    attacker = hivemind.DHT(initial_peers=list(peers), host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    discovery = reader(bg_loop, peers, nodes)
    try:
        key = Ed25519PrivateKey.generate()
        own = renewed(replace(victim, node_id=node_id_of(key.public_key().public_bytes_raw()),
                              addresses=("127.0.0.1:9",)), 60.0)
        own_value = codec.encode_records([sign_record(own, key)])[0].SerializeToString()
        later = time.time() + 3600  # hivemind.utils.get_dht_time() is time.time()
        targets = [(block_key(victim.config_hash, b), victim.node_id) for b in range(victim.start, victim.end)]
        targets.append((MODELS_KEY, victim.config_hash))
        for dht_key, subkey in targets:
            for value in (b"junk", own_value):
                attacker.store(dht_key, value, later, subkey=subkey)
        attacked = time.time()
        while time.time() - attacked < 3 * 3.0 + 1:  # three record lifetimes
            bg_loop.run(discovery.pull_all())
            assert victim.node_id in {r.node_id for r in discovery.live()}
            time.sleep(0.5)
        assert own.node_id not in {r.node_id for r in discovery.live()}  # not under a subkey that is not its own
    finally:
        bg_loop.run(discovery.close())
        attacker.shutdown()
    config = ClientConfig(initial_peers=peers, mdns=False)
    model = DistributedModelForCausalLM.from_pretrained(str(folder), config=config)
    try:
        ids = torch.randint(3, 512, (1, 7), generator=torch.Generator().manual_seed(2))
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    finally:
        model.close()
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert torch.equal(out, reference.generate(ids, max_new_tokens=4, do_sample=False))


def test_a_drained_node_is_marked_offline_under_its_keys(bg_loop, dht_swarm):
    _, peers, nodes = dht_swarm
    leaving = nodes[2]
    node_id = leaving.identity.node_id
    discovery = reader(bg_loop, peers, nodes)
    try:
        assert node_id in {r.node_id for r in discovery.live()}
        bg_loop.run(leaving.drain(1.0))
        bg_loop.stop_node(leaving)  # leave(): an OFFLINE record under each of its blocks' keys
        assert wait_until(bg_loop, discovery, lambda: node_id not in {r.node_id for r in discovery.live()}, 5.0)
        record, _ = discovery.registry.records[node_id]
        assert record.state == NodeState.OFFLINE  # not merely expired: its record lives 3 s, we looked sooner
        assert record.expires_at > time.time()
    finally:
        bg_loop.run(discovery.close())


def test_a_killed_node_is_forgotten_once_its_keys_expire(bg_loop, dht_swarm):
    _, peers, nodes = dht_swarm
    victim = nodes[1]
    node_id, record = victim.identity.node_id, victim.record
    discovery = reader(bg_loop, peers, nodes)
    try:
        assert node_id in {r.node_id for r in discovery.live()}

        async def crash() -> None:  # no leave(): its DHT peer and server just stop
            for task in victim.tasks:
                task.cancel()
            await victim.membership.close()
            await victim.server.stop(0)

        bg_loop.run(crash())
        killed = time.time()
        keys = [block_key(record.config_hash, b) for b in range(record.start, record.end)]
        # still there for a while: nothing removed it
        assert node_id in bg_loop.run(_ids_under(discovery, keys))
        assert wait_until(bg_loop, discovery, lambda: node_id not in {r.node_id for r in discovery.live()})
        assert time.time() - killed < 3 * REFRESH + 3
        assert node_id not in bg_loop.run(_ids_under(discovery, keys))  # expired in the DHT itself
        others = {n.identity.node_id for n in nodes[:1]}
        assert others <= {r.node_id for r in discovery.live()}  # the live node keeps re-storing
    finally:
        bg_loop.run(discovery.close())
        bg_loop.running.remove(victim)
        bg_loop.run(victim.stop(0))


async def _ids_under(discovery: DhtDiscovery, keys: list[str]) -> set[str]:
    """Node ids of the entries the DHT itself holds under `keys` now, expired records included (unverified)."""
    from functools import partial

    from common.swarm.dht import _get_many
    from common.swarm.records import node_id_of
    from common.wire.generated import potluck_pb2 as pb

    found = await discovery._call(partial(_get_many, keys=keys))
    return {node_id_of(pb.SignedRecord.FromString(v).public_key) for values in found.values() for v in values}
