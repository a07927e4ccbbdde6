"""Gossip at scale, in simulated time: the real Membership code of every node, an in-memory transport."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from common.swarm.identity import ephemeral_identity
from common.swarm.membership import Membership, SwarmConfig
from common.swarm.records import Limits
from node.bench.gossip_sim import CONFIG_HASH, SimSettings, _record, simulate_swarm
from node.bench.sim_loop import CachedRegistry, MemoryTransport, VirtualLoop


async def _converge(count: int) -> tuple[float | None, int]:
    """`count` nodes that each know only the bootstrap node: seconds until every registry lists every
    node as proven, and the failed calls meanwhile."""
    loop = asyncio.get_running_loop()
    epoch = time.time()
    transport = MemoryTransport(latency=0.01, count_bytes=False)
    addresses = [f"10.0.{i // 250}.{i % 250 + 1}:31337" for i in range(count)]
    config = SwarmConfig(bootstrap=(addresses[0],), mdns=False, heartbeat=10.0, ttl=30.0, exchange_every=1.0,
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


@pytest.mark.slow  # about a minute: 270 nodes forming a swarm in one process
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
