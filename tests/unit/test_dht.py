"""The DHT backend's own logic over an in-memory stand-in for hivemind's DHTNode (no sockets, no processes):
what it stores under which keys, that every read is verified, that a reader asks for its model's keys in one
batch, and the one-line errors. The real DHT is exercised in tests/swarm/test_dht.py."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.config import ClientConfig
from common.swarm.dht import MODELS_KEY, DhtConfig, DhtDiscovery, DhtUnavailable, block_key
from common.swarm.identity import Identity
from common.swarm.records import NodeState, PeerRecord, node_id_of, sign_record
from common.wire import codec
from node.config import ConfigError, NodeConfig


@dataclass
class Entry:
    value: object
    expiration_time: float


@dataclass
class FakeNode:
    """hivemind.DHTNode's store_many/get_many on dictionary values: per subkey, the latest expiration wins."""

    table: dict = field(default_factory=dict)
    gets: list = field(default_factory=list)

    async def store_many(self, keys, values, expiration_time, subkeys):
        out = {}
        for key, value, subkey in zip(keys, values, subkeys):
            held = self.table.setdefault(key, {})
            ok = subkey not in held or held[subkey].expiration_time < expiration_time
            if ok:
                held[subkey] = Entry(value, expiration_time)
            out[(key, subkey)] = ok
        return out

    async def get_many(self, keys, sufficient_expiration_time=None):
        self.gets.append(list(keys))
        now = time.time()
        out = {}
        for key in keys:
            live = {s: e for s, e in self.table.get(key, {}).items() if e.expiration_time > now}
            out[key] = Entry(live, max(e.expiration_time for e in live.values())) if live else None
        return out


class FakeDht:
    def __init__(self, node: FakeNode):
        self.node = node

    def run_coroutine(self, coro, return_future=False):
        return asyncio.ensure_future(coro(self, self.node))

    def shutdown(self):
        pass


def a_record(key: Ed25519PrivateKey, start=0, end=2, **changes) -> PeerRecord:
    now = time.time()
    fields = dict(node_id=node_id_of(key.public_key().public_bytes_raw()), addresses=("127.0.0.1:9",),
                  model_id="m", config_hash="c" * 16, num_layers=4, start=start, end=end, issued_at=now,
                  expires_at=now + 30, seq=1, state=NodeState.ONLINE)
    return PeerRecord(**{**fields, **changes})


def discovery(node: FakeNode, key: Ed25519PrivateKey | None = None, watch=None) -> DhtDiscovery:
    identity = Identity(key, None) if key is not None else None
    found = DhtDiscovery(DhtConfig(refresh=1.0, ttl=3.0), identity, watch=watch)
    found.dht = FakeDht(node)
    return found


def test_a_node_stores_its_record_under_each_block_and_the_models_key_and_leaves_offline():
    async def run():
        node, key = FakeNode(), Ed25519PrivateKey.generate()
        mine = discovery(node, key)
        await mine.publish(a_record(key, 1, 3))
        node_id = mine.own.node_id
        assert set(node.table) == {block_key("c" * 16, 1), block_key("c" * 16, 2), MODELS_KEY}
        assert set(node.table[MODELS_KEY]) == {"c" * 16}
        entry = node.table[block_key("c" * 16, 1)][node_id]
        assert entry.expiration_time == mine.own.expires_at  # the DHT forgets it when the record expires
        await mine.leave()
        reader = discovery(node, watch={"c" * 16: 4})
        await reader.pull_all()
        assert reader.live() == []
        assert reader.registry.records[node_id][0].state == NodeState.OFFLINE
        await mine.close()

    asyncio.run(run())


def test_reads_are_verified_and_a_reader_asks_for_its_model_in_one_batch():
    async def run():
        node, key, liar = FakeNode(), Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        await discovery(node, key).publish(a_record(key))
        good = node.table[block_key("c" * 16, 0)]
        # anyone may write any key: a forgery in the victim's name, garbage, a record of another model
        forged = sign_record(a_record(liar, addresses=("203.0.113.9:1",)), liar)
        forged = type(forged)(forged.payload, key.public_key().public_bytes_raw(), forged.signature)
        good["forged"] = Entry(codec.encode_records([forged])[0].SerializeToString(), time.time() + 30)
        good["garbage"] = Entry(b"\xff\x00not a record", time.time() + 30)
        other = Ed25519PrivateKey.generate()
        await discovery(node, other).publish(a_record(other, config_hash="d" * 16))
        reader = discovery(node, watch={"c" * 16: 4})
        node.gets.clear()
        await reader.pull_all()
        assert node.gets == [[block_key("c" * 16, b) for b in range(4)]]  # one batch, this model's keys only
        assert [r.node_id for r in reader.live()] == [node_id_of(key.public_key().public_bytes_raw())]
        assert reader.live()[0].addresses == ("127.0.0.1:9",)
        assert reader.registry.rejected == 1  # the forgery (garbage does not even parse)

        status = discovery(node)  # no model watched: the models index first, then every model's keys
        node.gets.clear()
        await status.pull_all()
        assert node.gets[0] == [MODELS_KEY] and len(node.gets) == 2
        assert {r.config_hash for r in status.live()} == {"c" * 16, "d" * 16}

    asyncio.run(run())


def test_the_dht_backend_without_hivemind_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "hivemind", None)  # import hivemind -> ImportError
    with pytest.raises(DhtUnavailable, match=r"needs hivemind: pip install 'potluck\[dht\]'") as caught:
        asyncio.run(DhtDiscovery(DhtConfig()).start())
    assert "\n" not in str(caught.value)


def test_discovery_choices():
    assert ClientConfig(initial_peers=("/ip4/127.0.0.1/tcp/1/p2p/x",), mdns=False).uses_dht  # auto: peers given
    assert not ClientConfig().uses_dht
    with pytest.raises(ValueError, match="needs initial peers"):
        ClientConfig(discovery="dht")
    with pytest.raises(ValueError, match="are DHT peers"):
        ClientConfig(discovery="gossip", initial_peers=("/ip4/127.0.0.1/tcp/1",))
    assert NodeConfig(model="m", discovery="dht").uses_dht  # a node may start a new DHT: the first peer
    with pytest.raises(ConfigError, match="--discovery"):
        NodeConfig(model="m", discovery="kademlia")


def test_storing_peers_take_only_a_nodes_own_record_under_its_own_subkey():
    """common/swarm/dht_validation.py: what every potluck DHT peer agrees to store (hivemind serializes subkeys
    and values with msgpack)."""
    pytest.importorskip("hivemind")
    import msgpack

    from common.swarm.dht_validation import entry_is_valid
    from common.wire.security import SwarmKey

    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    record = a_record(key)
    value = msgpack.packb(codec.encode_records([sign_record(record, key)])[0].SerializeToString())
    mine, config = msgpack.packb(record.node_id), msgpack.packb(record.config_hash)
    assert entry_is_valid(mine, value, record.expires_at)
    assert entry_is_valid(config, value, record.expires_at)  # the models index
    assert not entry_is_valid(msgpack.packb(node_id_of(other.public_key().public_bytes_raw())), value,
                              record.expires_at)  # someone else's subkey
    assert not entry_is_valid(mine, value, record.expires_at + 3600)  # a replay with a longer life
    assert not entry_is_valid(None, value, record.expires_at)
    assert not entry_is_valid(mine, msgpack.packb(b"junk"), record.expires_at)
    assert not entry_is_valid(mine, b"\xc1", record.expires_at)  # not even msgpack
    assert not entry_is_valid(mine, value, record.expires_at, now=record.expires_at + 1)  # expired
    forged = sign_record(a_record(other), other)
    forged = type(forged)(forged.payload, key.public_key().public_bytes_raw(), forged.signature)
    assert not entry_is_valid(mine, msgpack.packb(codec.encode_records([forged])[0].SerializeToString()),
                              record.expires_at)
    swarm_key = SwarmKey.generate()  # a private swarm's peers store only records sealed with its key
    sealed = msgpack.packb(codec.encode_records([sign_record(record, key)], swarm_key)[0].SerializeToString())
    assert entry_is_valid(mine, sealed, record.expires_at, swarm_key)
    assert not entry_is_valid(mine, value, record.expires_at, swarm_key)
