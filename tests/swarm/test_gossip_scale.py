"""Gossip at scale, in simulated time: the real Membership code of every node, an in-memory transport."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from common.swarm import digest
from common.swarm.identity import ephemeral_identity
from common.swarm.membership import Membership, SwarmConfig
from common.swarm.records import Limits, renewed, sign_record
from common.wire import record_codec as codec
from common.wire.generated import potluck_pb2 as pb
from node.bench.gossip_sim import CONFIG_HASH, MODELS, SimSettings, _record, simulate_swarm
from node.bench.sim_loop import CachedRegistry, MemoryTransport, VirtualLoop


async def _converge(count: int) -> tuple[float | None, int]:
    """`count` nodes that each know only the bootstrap node: seconds until every registry lists every
    node as proven, and the failed calls meanwhile."""
    loop = asyncio.get_running_loop()
    epoch = time.time()
    transport = MemoryTransport(latency=0.01, count_bytes=False)
    addresses = [f"10.0.{i // 250}.{i % 250 + 1}:31337" for i in range(count)]
    # news to one peer, not three: the paged anti-entropy exchanges (what this is about) carry more of the records,
    # at half the CPU of the join storm (each record pushed to every node about `fanout` times)
    config = SwarmConfig(bootstrap=(addresses[0],), mdns=False, heartbeat=10.0, ttl=30.0, exchange_every=1.0, fanout=1,
                         model=CONFIG_HASH, limits=Limits(max_ttl=60.0))
    swarm, cache = [], {}
    for index, address in enumerate(addresses):
        member = Membership(config, ephemeral_identity(), rng=random.Random(index),
                            transport=transport.for_node(address), clock=lambda: epoch + loop.time())
        member.registry = CachedRegistry(limits=config.limits, cache=cache)  # each signed record verified once
        transport.members[address] = member
        swarm.append(member)
    for member, address in zip(swarm, addresses):
        await member.publish(_record(member.identity, address))
    started = loop.time()
    while not all(len(m.live(CONFIG_HASH)) == count for m in swarm):
        if loop.time() - started > 120:
            break
        await asyncio.sleep(1.0)
    done = loop.time() - started if all(len(m.live(CONFIG_HASH)) == count for m in swarm) else None
    failures = sum(m.failures for m in swarm)
    for member in swarm:
        await member.close()
    return done, failures


@pytest.mark.slow  # about 20 s: 270 nodes forming a swarm in one process
@pytest.mark.timeout(120)
def test_a_swarm_past_the_old_256_record_limit_converges():
    loop = VirtualLoop()
    try:
        converged, failures = loop.run_until_complete(_converge(270))
    finally:
        loop.close()
    assert converged is not None and converged < 60  # every node lists all 270 records, proven
    assert failures == 0  # no call refused: pages stay under the receiver's limit


@pytest.mark.timeout(300)
def test_churn_and_a_partition_longer_than_the_ttl_heal():
    result = simulate_swarm(SimSettings(nodes=60, seed=3, heartbeat=2.0, ttl=6.0, exchange_every=1.0, churn_every=0.5,
                                        window=6.0, settle=3.0))
    assert result["steady_state_refusals"] == 0
    assert result["join_known_by_all_s"] is not None and result["join_known_by_all_s"] < 10
    assert result["dead_forgotten_s"] is not None and result["dead_forgotten_s"] <= 6.0 + 2.0
    assert result["partition_forgotten"]  # the two halves forgot each other (cut longer than the TTL)
    assert result["partition_heal_s"] is not None and result["partition_heal_s"] <= 60


async def test_the_answer_to_a_wanted_list_is_taken_though_an_update_asked_for_expired_meanwhile():
    """A node's `wanted` list counts the new identities it asks a caller for against that caller's minute (the
    per-source cap) when it asks. A record it asked for as an update and that expired before the answer came is
    a new identity by then: counted again, it was refused (1 refusal at 80 simulated nodes, per-source cap 20)."""
    now = [1.7e9]
    config = SwarmConfig(bootstrap=(), mdns=False, model=CONFIG_HASH, limits=Limits(per_source=2))
    member = Membership(config, ephemeral_identity(), transport=MemoryTransport().for_node("10.0.0.1:31337"),
                        clock=lambda: now[0])
    member.own = renewed(_record(member.identity, "10.0.0.1:31337"), 30.0, now=now[0])
    others = [ephemeral_identity() for _ in range(3)]
    old = renewed(_record(others[0], "10.0.0.2:31337"), 5.0, now=now[0] - 4.0)  # held, one second left
    member.registry.offer(sign_record(old, others[0].key), now=now[0])
    member.registry.prove(others[0].node_id)
    fresh = [renewed(_record(o, f"10.0.0.{i + 2}:31337"), 30.0, now=now[0]) for i, o in enumerate(others)]
    signed = [sign_record(r, o.key) for r, o in zip(fresh, others)]
    theirs = digest.pack((r.node_id, r.seq) for r in fresh)  # an update of the held one, and two new ones
    reply = member.handle(codec_request(theirs), source="10.0.0.9")
    assert len(reply.wanted) == 3 * 8  # all three asked for; the two new ones counted against 10.0.0.9 now
    now[0] += 2.0  # the held record expires before the answer arrives
    member.registry.expire(now[0])
    member.handle(codec_request(b"", signed), source="10.0.0.9")
    assert member.registry.refused == 0  # 1 when the expired update was counted as a third new identity
    assert {r.node_id for r in fresh} <= member.registry.records.keys()
    stranger = ephemeral_identity()  # a push of its own beyond the cap is still refused
    pushed = renewed(_record(stranger, "10.0.0.7:31337"), 30.0, now=now[0])
    member.handle(codec_request(b"", [sign_record(pushed, stranger.key)]), source="10.0.0.9")
    assert member.registry.refused == 1 and stranger.node_id not in member.registry.records
    await member.close()


async def test_a_bootstrap_node_passes_on_news_of_joins_only_to_peers_of_the_joiners_model():
    """A bootstrap node hears of every model's joins. Passing another model's to its own model's peers was
    traffic they do not use, and at a per-source cap of 20 it got its records refused (0 to 7 refusals in a
    simulation of 80 nodes, depending on the hash seed)."""
    transport = MemoryTransport(latency=0.001, count_bytes=False)
    members = {}
    for index, model in enumerate([0, 0, 0, 1]):  # the bootstrap node, its peer, a joiner, another model's
        address = f"10.0.0.{index + 1}:31337"
        member = Membership(SwarmConfig(bootstrap=(), mdns=False, model=MODELS[model][1]), ephemeral_identity(),
                            transport=transport.for_node(address))
        member.own = renewed(_record(member.identity, address, model), 30.0)
        transport.members[address] = member
        members[address] = member
    bootstrap, peers, (joiner, stranger) = members["10.0.0.1:31337"], [members["10.0.0.2:31337"]], \
        (members["10.0.0.3:31337"], members["10.0.0.4:31337"])
    for peer in peers:  # the bootstrap node knows its model's peer, proven
        bootstrap.registry.offer(sign_record(peer.own, peer.identity.key))
        bootstrap.registry.prove(peer.own.node_id)
    for newcomer, address in ((stranger, "10.0.0.4"), (joiner, "10.0.0.3")):  # each pushes its record
        bootstrap.handle(codec_request(b"", [sign_record(newcomer.own, newcomer.identity.key)]), source=address)
        await bootstrap.settle()  # proven: the node at its address answered with its id
        assert bootstrap.registry.is_proven(newcomer.own.node_id)
    for _ in range(20):
        await asyncio.sleep(0.01)  # the pushes of news land
    assert joiner.own.node_id in peers[0].registry.records  # news of its own model's join: passed on
    assert stranger.own.node_id not in peers[0].registry.records  # another model's: not passed on
    for member in members.values():
        await member.close()


async def test_two_callers_answered_at_once_are_not_asked_for_more_new_identities_than_there_is_room_for():
    """A node asks a caller for the new identities its digest lists, as many as its registry has room for unproven
    ones. Two callers answered before either pushed were each asked for all that room, and the second push found
    it taken: refused (the 10,000-node simulation's bootstrap nodes, which hold every model's records, saw
    refusals). The room a pending ask will take is spoken for until its answer comes or its time is up."""
    now = [1.7e9]
    config = SwarmConfig(bootstrap=(), mdns=False, model=CONFIG_HASH, limits=Limits(pending=4))
    member = Membership(config, ephemeral_identity(), transport=MemoryTransport().for_node("10.0.0.1:31337"),
                        clock=lambda: now[0])
    member.own = renewed(_record(member.identity, "10.0.0.1:31337"), 30.0, now=now[0])
    callers = {}
    for host in ("10.0.1.1", "10.0.2.1"):  # each lists 4 identities the member has never heard of
        identities = [ephemeral_identity() for _ in range(4)]
        records = [renewed(_record(o, f"{host[:-1]}{i + 2}:31337"), 30.0, now=now[0]) for i, o in enumerate(identities)]
        callers[host] = (records, [sign_record(r, o.key) for r, o in zip(records, identities)])
    asked = {}
    for host, (records, _) in callers.items():  # both exchanges answered before either push arrives
        theirs = digest.pack((r.node_id, r.seq) for r in records)
        asked[host] = len(member.handle(codec_request(theirs), source=host).wanted) // 8
    assert asked == {"10.0.1.1": 4, "10.0.2.1": 0}  # the room went to the first caller (4 and 4 before)
    for host, (_, signed) in callers.items():  # each pushes what it was asked for
        if asked[host]:
            member.handle(codec_request(b"", signed[: asked[host]]), source=host)
    assert member.registry.refused == 0  # 4 before: the second push found the room taken
    assert sum(1 for r in callers["10.0.1.1"][0] if r.node_id in member.registry.records) == 4
    await member.close()


async def test_asking_a_caller_for_new_identities_leaves_room_in_its_minute_for_what_it_pushes_unasked():
    """A node asks a caller for the new identities its digest lists, at most as many as the caller may still push
    this minute (they come back pushed from its host), and counts them against that minute at once. Asked for the
    whole minute, the caller's next push of its own (its record, news of a join) was refused at the per-source cap:
    the 10,000-node simulation's 19 refusals, each a newly joined node's push to other models' bootstrap nodes
    that had just asked it for 120. Some of the minute is kept for such pushes."""
    now = [1.7e9]
    config = SwarmConfig(bootstrap=(), mdns=False, model=CONFIG_HASH, limits=Limits(per_source=8))
    member = Membership(config, ephemeral_identity(), transport=MemoryTransport().for_node("10.0.0.1:31337"),
                        clock=lambda: now[0])
    member.own = renewed(_record(member.identity, "10.0.0.1:31337"), 30.0, now=now[0])
    host = "10.0.1.1"
    identities = [ephemeral_identity() for _ in range(12)]  # the caller's digest lists 12 the member never heard of
    records = [renewed(_record(o, f"10.0.1.{i + 2}:31337"), 30.0, now=now[0]) for i, o in enumerate(identities)]
    signed = [sign_record(r, o.key) for r, o in zip(records, identities)]
    wanted = member.handle(codec_request(digest.pack((r.node_id, r.seq) for r in records)), source=host).wanted
    keys = {wanted[i : i + 8] for i in range(0, len(wanted), 8)}
    assert 0 < len(keys) < 8  # not the whole minute (8 before)
    answer = [s for r, s in zip(records, signed) if digest.prefix(r.node_id) in keys]
    member.handle(codec_request(b"", answer), source=host)  # the answer: taken
    unasked = next(s for r, s in zip(records, signed) if digest.prefix(r.node_id) not in keys)
    member.handle(codec_request(b"", [unasked]), source=host)  # then a push of its own
    assert member.registry.refused == 0  # 1 before: the minute was all asked for
    assert sum(1 for r in records if r.node_id in member.registry.records) == len(keys) + 1
    await member.close()


def codec_request(digest_bytes: bytes, signed=()) -> pb.GossipRequest:
    """A pull with `digest_bytes`, or a push of `signed` records."""
    if signed:
        return pb.GossipRequest(anti_entropy=True, push_only=True, records=codec.encode_records(list(signed), None))
    return pb.GossipRequest(anti_entropy=True, digest=digest_bytes, model=CONFIG_HASH)
