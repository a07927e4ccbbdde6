"""A gossip swarm of thousands of nodes in one process, in simulated time.

Every node is a real `Membership` (the same code a node runs: its gossip loop, anti-entropy, proofs,
caps) with its own ephemeral identity; a `MemoryTransport` delivers each Gossip call by calling the
peer's `handle()` after a simulated one-way latency, and counts the bytes as gRPC would send them (the
serialized message, gzip-compressed). A `VirtualLoop` is an asyncio loop whose clock jumps to the next
timer instead of waiting, so minutes of swarm time take seconds; records' times follow the same clock.
Each distinct signed record is verified once for the whole simulation (a cache shared by all registries)."""

from __future__ import annotations

import asyncio
import logging
import random
import selectors
import statistics
import time
import zlib
from dataclasses import dataclass

from common.swarm.records import Limits, NodeState, PeerRecord, RecordError, Registry, verify_record
from common.swarm.transport import TransportError

CONFIG_HASH = "0123456789abcdef" * 4  # one model, a real config hash's length
LATENCY = 0.05                          # one-way seconds, a call takes twice that


class _VirtualSelector(selectors.BaseSelector):
    """Nothing is ever ready; `select(timeout)` moves the clock on by `timeout` instead of waiting."""

    def __init__(self):
        self._map: dict[int, selectors.SelectorKey] = {}
        self.now = 0.0

    def register(self, fileobj, events, data=None):
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = self._map[fd] = selectors.SelectorKey(fileobj, fd, events, data)
        return key

    def unregister(self, fileobj):
        return self._map.pop(fileobj if isinstance(fileobj, int) else fileobj.fileno())

    def select(self, timeout=None):
        if timeout is None:
            raise RuntimeError("the simulation waits on nothing that a timer will end")
        self.now += max(timeout, 0.0)
        return []

    def get_map(self):
        return self._map

    def close(self) -> None:
        self._map.clear()


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self):
        self._virtual = _VirtualSelector()
        super().__init__(self._virtual)

    def time(self) -> float:
        return self._virtual.now


class _CachedRegistry(Registry):
    cache: dict = {}

    def _verify(self, signed, now):
        record = self.cache.get(signed)
        if record is None:
            record = self.cache[signed] = verify_record(signed, now)
        elif record.expires_at <= now:
            raise RecordError("expired record")
        return record


class MemoryTransport:
    """Gossip calls delivered in memory, with latency, partitions and dead nodes; bytes counted gzipped."""

    def __init__(self, latency: float = LATENCY, count_bytes: bool = True):
        self.latency = latency
        self.count_bytes = count_bytes  # compressing every message costs time; tests may skip it
        self.members: dict = {}          # address -> Membership
        self.group: dict[str, int] = {}  # address -> partition group (calls across groups fail)
        self.cut = False
        self.sent: dict[str, int] = {}
        self.received: dict[str, int] = {}
        self.calls = self.failures = 0

    def for_node(self, address: str) -> _Endpoint:
        return _Endpoint(self, address)

    def _count(self, sender: str, receiver: str, message) -> None:
        if not self.count_bytes:
            return
        size = len(zlib.compress(message.SerializeToString(), 6))
        self.sent[sender] = self.sent.get(sender, 0) + size
        self.received[receiver] = self.received.get(receiver, 0) + size

    async def call(self, caller: str, address: str, request):
        self.calls += 1
        callee = self.members.get(address)
        await asyncio.sleep(self.latency)
        if callee is None or (self.cut and self.group.get(caller) != self.group.get(address)):
            self.failures += 1
            await asyncio.sleep(self.latency)
            raise TransportError("UNAVAILABLE", "unreachable")
        self._count(caller, address, request)
        reply = callee.handle(request, source=caller)
        self._count(address, caller, reply)
        await asyncio.sleep(self.latency)
        return reply


@dataclass
class _Endpoint:
    transport: MemoryTransport
    address: str

    async def gossip(self, address, request, timeout):
        return await asyncio.wait_for(self.transport.call(self.address, address, request), timeout)


def _record(identity, address: str) -> PeerRecord:
    """The field sizes a SmolLM2 node announces."""
    return PeerRecord(node_id=identity.node_id, addresses=(address,), model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
                      config_hash=CONFIG_HASH, num_layers=30, start=0, end=10, throughput=51.3,
                      prefill_throughput=410.7, free_cache_tokens=65536, max_length=8192, name=address)


@dataclass(frozen=True)
class SimSettings:
    nodes: int = 100
    heartbeat: float = 30.0      # re-announcement period (the node default)
    ttl: float = 90.0            # record lifetime (the node default)
    exchange_every: float = 5.0  # anti-entropy period (the default)
    fanout: int = 3
    bootstrap: int = 3           # the first nodes are everyone's bootstrap nodes
    seed: int = 0


async def _until(predicate, timeout: float, every: float = 0.5) -> float | None:
    """Simulated seconds until `predicate()` holds, or None after `timeout`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not predicate():
        if loop.time() - started > timeout:
            return None
        await asyncio.sleep(every)
    return loop.time() - started


async def _simulate(s: SimSettings) -> dict:
    from common.swarm.identity import ephemeral_identity
    from common.swarm.membership import Membership, SwarmConfig
    from common.swarm.records import TTL_CAP, renewed, sign_record

    loop = asyncio.get_running_loop()
    epoch = time.time()
    clock = lambda: epoch + loop.time()  # noqa: E731
    rng = random.Random(s.seed)
    transport = MemoryTransport()
    addresses = [f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}:31337" for i in range(s.nodes + 1)]
    bootstrap = tuple(addresses[: s.bootstrap])
    limits = Limits(max_ttl=TTL_CAP, per_model=4 * s.nodes + 64, total=4 * s.nodes + 64, pending=s.nodes + 64)
    config = SwarmConfig(bootstrap=bootstrap, mdns=False, heartbeat=s.heartbeat, ttl=s.ttl,
                         exchange_every=s.exchange_every, fanout=s.fanout, model=CONFIG_HASH, limits=limits)

    def member(address: str) -> Membership:
        registry = _CachedRegistry(limits=limits)
        m = Membership(config, ephemeral_identity(), rng=random.Random(rng.random()),
                       transport=transport.for_node(address), clock=clock)
        m.registry = registry
        transport.members[address] = m
        return m

    # a swarm already converged: every registry holds every record, proven (joining 1,000 nodes one by one
    # is not what is measured); then the gossip loops run
    swarm = [member(a) for a in addresses[: s.nodes]]
    signed = []
    for m, address in zip(swarm, addresses):
        m.own = renewed(_record(m.identity, address), s.ttl, now=clock() - rng.uniform(0, s.heartbeat))
        signed.append(sign_record(m.own, m.identity.key))
    for m in swarm:
        for record in signed:
            m.registry.offer(record, now=clock())
            m.registry.prove(m.registry.records[_id(record)][0].node_id)
    for m in swarm:
        m._loop = asyncio.ensure_future(m._run())

    def alive() -> list[Membership]:
        return [m for a, m in transport.members.items() if m._loop is not None and not m._loop.done()]

    def knows(m: Membership, node_id: str) -> bool:
        held = m.registry.records.get(node_id)
        return held is not None and node_id in m.registry.proven and held[0].expires_at > clock() \
            and held[0].state != NodeState.OFFLINE

    await asyncio.sleep(60.0)  # settle: renewals under way
    transport.sent.clear()
    transport.received.clear()
    failures_before = transport.failures
    sum_failures = sum(m.failures for m in swarm)
    await asyncio.sleep(60.0)
    per_node = [transport.sent.get(a, 0) + transport.received.get(a, 0) for a in addresses[: s.nodes]]
    steady_failures = sum(m.failures for m in swarm) - sum_failures + transport.failures - failures_before
    complete = min(sum(knows(m, o.own.node_id) for o in swarm) for m in rng.sample(swarm, min(20, len(swarm))))

    # a new node joins through the bootstrap nodes
    newcomer = member(addresses[s.nodes])
    new_record = _record(newcomer.identity, addresses[s.nodes])
    started = loop.time()
    await newcomer.start()
    await newcomer.publish(new_record)
    known = await _until(lambda: all(knows(m, new_record.node_id) for m in swarm), 120.0)
    join_s = None if known is None else loop.time() - started

    # a node dies without a word
    dead = swarm[-1]
    dead._loop.cancel()
    del transport.members[dead.own.address]
    others = swarm[:-1] + [newcomer]
    dead_s = await _until(lambda: not any(knows(m, dead.own.node_id) for m in others), 3 * s.ttl, every=1.0)

    # a partition longer than the TTL, then healed
    members = others
    half = {m.own.address for m in members[len(members) // 2:]}
    for m in members:
        transport.group[m.own.address] = int(m.own.address in half)
    transport.cut = True
    side = {m.own.node_id: transport.group[m.own.address] for m in members}
    apart = await _until(lambda: all(sum(knows(m, n) for n in side if side[n] != side[m.own.node_id]) == 0
                                     for m in rng.sample(members, min(20, len(members)))), 3 * s.ttl, every=2.0)
    transport.cut = False
    heal_s = await _until(lambda: all(knows(m, n) for m in members for n in side), 600.0, every=2.0)
    for m in list(transport.members.values()) + [dead]:
        await m.close()
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "nodes": s.nodes, "backend": "gossip", "heartbeat_s": s.heartbeat, "ttl_s": s.ttl,
        "exchange_every_s": s.exchange_every, "fanout": s.fanout,
        "bytes_per_min_per_node": statistics.mean(per_node),
        "bytes_per_min_per_node_max": max(per_node),
        "steady_state_failed_calls": steady_failures,
        "records_known_sampled_min": complete,
        "join_known_by_all_s": join_s, "dead_forgotten_s": dead_s,
        "partition_forgotten": apart is not None, "partition_heal_s": heal_s,
        "route_plan_ms": None, "herd_max_over_ideal": None,
    }


def _id(signed) -> str:
    from common.swarm.records import node_id_of

    return node_id_of(signed.public_key)


def simulate_swarm(settings: SimSettings) -> dict:
    """Run one simulation on a fresh virtual loop; returns the JSON-ready measurements."""
    loop = VirtualLoop()
    began = time.monotonic()
    quiet = logging.getLogger("common.swarm.membership")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # a partition makes thousands of failed calls: counted, not logged
    try:
        result = loop.run_until_complete(_simulate(settings))
    finally:
        loop.close()
        _CachedRegistry.cache.clear()
        quiet.setLevel(level)
    result["wall_s"] = round(time.monotonic() - began, 1)
    return result
