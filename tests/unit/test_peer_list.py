"""The list a node picks gossip peers from: rebuilt when who is listed changes, not on every renewal.

At 5,000 nodes of a model a node hears ~170 renewals a second; each one rebuilt the whole list before the
pick that passed it on (issue 24)."""

from __future__ import annotations

import random

from common.swarm.identity import ephemeral_identity
from common.swarm.membership import Membership, SwarmConfig
from common.swarm.records import NodeState, renewed, sign_record
from node.bench.gossip_sim import CONFIG_HASH, MODELS, _record
from node.bench.sim_loop import MemoryTransport

OTHER_MODEL = MODELS[1][1]


class _Swarm:
    """One node's membership and the identities of the peers it hears of, on a clock the test moves."""

    def __init__(self, peers: int):
        self.now = 1.7e9
        config = SwarmConfig(bootstrap=(), mdns=False, model=CONFIG_HASH)
        self.member = Membership(config, ephemeral_identity(), rng=random.Random(0),
                                 transport=MemoryTransport().for_node("10.0.0.1:31337"), clock=lambda: self.now)
        self.peers = [ephemeral_identity() for _ in range(peers)]
        self.held = {}
        for index, identity in enumerate(self.peers):
            self.hear(identity, renewed(_record(identity, f"10.0.1.{index + 1}:31337"), 90.0, now=self.now))
            self.member.registry.prove(identity.node_id)

    def hear(self, identity, record) -> None:
        self.held[identity.node_id] = record
        assert self.member.registry.offer(sign_record(record, identity.key), now=self.now)

    def renew(self, identity, **changes) -> None:
        self.hear(identity, renewed(self.held[identity.node_id], 90.0, now=self.now, **changes))

    def listed(self) -> set[str]:
        return self.member._peers(10_000)


def test_a_renewal_leaves_the_list_as_it_was_and_a_change_of_who_is_listed_rebuilds_it():
    swarm = _Swarm(peers=6)
    first, second, third, fourth = swarm.peers[:4]
    assert len(swarm.listed()) == 6
    built = swarm.member._peer_list
    swarm.now += 10.0
    for identity in swarm.peers:  # every peer renews: no one joined, left or moved
        swarm.renew(identity)
    assert len(swarm.listed()) == 6 and swarm.member._peer_list is built  # not rebuilt

    swarm.renew(first, state=NodeState.OFFLINE)  # a peer leaves
    swarm.renew(second, addresses=("10.0.9.9:31337",))  # a peer moves: unproven until its new address answers
    swarm.renew(third, config_hash=OTHER_MODEL)  # a peer now serves another model
    listed = swarm.listed()
    assert len(listed) == 3 and "10.0.9.9:31337" not in listed
    assert swarm.member.registry.prove(second.node_id) and "10.0.9.9:31337" in swarm.listed()

    joiner = ephemeral_identity()  # a peer joins, is proven
    swarm.hear(joiner, renewed(_record(joiner, "10.0.2.1:31337"), 90.0, now=swarm.now))
    assert "10.0.2.1:31337" not in swarm.listed()
    swarm.member.registry.prove(joiner.node_id)
    assert "10.0.2.1:31337" in swarm.listed() and len(swarm.listed()) == 5


def test_a_peer_whose_record_expired_is_not_picked_though_nothing_removed_it_yet():
    swarm = _Swarm(peers=3)
    assert len(swarm.listed()) == 3
    swarm.now += 60.0
    swarm.renew(swarm.peers[0])
    swarm.renew(swarm.peers[1])
    swarm.now += 31.0  # the third's record (90 s) has expired; the registry's expire() has not run
    assert len(swarm.member.registry.records) == 3
    assert swarm.listed() == {swarm.held[p.node_id].addresses[0] for p in swarm.peers[:2]}
