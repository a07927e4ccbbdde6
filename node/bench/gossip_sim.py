"""A gossip swarm of thousands of nodes of several models in one process, in simulated time.

Every node is a real `Membership` (the same code a node runs: its gossip loop, anti-entropy with digests
and pages, proofs, caps, the registry's default limits) with its own identity, talking through a
`MemoryTransport` on a `VirtualLoop` (node/bench/sim_loop.py: time advances only by scheduled events; CPU
is measured per node). Each distinct signed record's signature is checked once for the whole simulation
(a cache shared by all registries): that is the one shortcut, the exchange logic is untouched.

The run: a converged swarm whose nodes started over one heartbeat; a window of churn (a join, a silent
death, a join, a graceful leave, one every `churn_every` seconds) in which traffic, CPU and refusals are
measured and every join and departure is timed until the whole swarm of its model agrees; then a
partition longer than the TTL, healed."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import statistics
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.swarm.identity import Identity
from common.swarm.records import TTL_CAP, Limits, NodeState, PeerRecord, renewed, sign_record
from node.bench.sim_loop import NODE, CachedRegistry, MemoryTransport, VirtualLoop

CONFIG_HASH = "0123456789abcdef" * 4  # the first model's config hash (a real one's length)
LATENCY = 0.05                          # one-way seconds, a call takes twice that
EPOCH = 1.7e9                           # records' wall-clock times start here (fixed: runs repeat)
# (model id, config hash, layers, share of the nodes)
MODELS = (("HuggingFaceTB/SmolLM2-135M-Instruct", CONFIG_HASH, 30, 0.5),
          ("meta-llama/Llama-3.1-8B-Instruct", "89abcdef01234567" * 4, 32, 0.3),
          ("Qwen/Qwen2.5-72B-Instruct", "fedcba9876543210" * 4, 80, 0.2))


def models_of(count: int) -> tuple:
    """`count` models of the (model id, config hash, layers, share) form: the first of MODELS (their shares), or
    past those, as many as asked with an equal share each (the listed three, then made-up ones of 32 layers)."""
    if count <= len(MODELS):
        return MODELS[:count]
    made_up = tuple((f"example/model-{i}", f"{i:016x}" * 4, 32) for i in range(len(MODELS), count))
    return tuple((model_id, config_hash, layers, 1.0 / count)
                 for model_id, config_hash, layers, *_ in MODELS + made_up)


def _record(identity, address: str, model: int = 0, models: tuple = MODELS) -> PeerRecord:
    """The field sizes a real node announces."""
    model_id, config_hash, layers, _ = models[model]
    return PeerRecord(node_id=identity.node_id, addresses=(address,), model_id=model_id, config_hash=config_hash,
                      num_layers=layers, start=0, end=min(10, layers), throughput=51.3, prefill_throughput=410.7,
                      free_cache_tokens=65536, max_length=8192, name=address)


@dataclass(frozen=True)
class SimSettings:
    nodes: int = 1000
    models: int = 3              # how many models the nodes serve (`models_of`: MODELS' shares, or past three equal)
    heartbeat: float = 30.0      # re-announcement period (the node default)
    ttl: float = 90.0            # record lifetime (the node default)
    exchange_every: float = 5.0  # anti-entropy period (the default)
    fanout: int = 3
    churn_every: float = 4.0     # seconds between churn events (join, death, join, leave, ...)
    window: float = 120.0        # seconds of steady state with churn, measured
    settle: float = 40.0         # seconds before the window (every node's loop started, first renewals out)
    partition: bool = True       # cut the swarm in two for longer than the TTL, then heal it
    gzip_every: int = 8          # compress one message in this many of each kind to count gzipped bytes
    seed: int = 0
    pending: int = Limits().pending  # the registry's cap on unproven records (a node's default)
    per_source: int = Limits().per_source  # new identities one source may push a minute (a node's default)


def _address(index: int) -> str:
    return f"10.{index // 62500}.{index // 250 % 250}.{index % 250 + 1}:31337"


async def _until(predicate, timeout: float, every: float = 0.5) -> float | None:
    """Simulated seconds until `predicate()` holds, or None after `timeout`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not predicate():
        if loop.time() - started > timeout:
            return None
        await asyncio.sleep(every)
    return loop.time() - started


class _Swarm:
    """The simulated nodes, their models, and who is alive."""

    def __init__(self, s: SimSettings, loop: VirtualLoop):
        from common.swarm.membership import SwarmConfig

        self.s, self.loop = s, loop
        self.rng = random.Random(s.seed)
        self.transport = MemoryTransport(LATENCY, gzip_every=s.gzip_every)
        self.cache: dict = {}
        self.limits = Limits(max_ttl=TTL_CAP, pending=s.pending, per_source=s.per_source)
        self.model_of: dict[str, int] = {}  # address -> model index
        self.alive: dict[str, object] = {}  # address -> Membership of a running node
        self.tasks: set[asyncio.Task] = set()
        self.joining: set[str] = set()  # addresses whose join is still being timed: never picked to depart
        self.count = 0
        self.models = models_of(s.models)
        self.shares = [share for *_, share in self.models]
        models = list(range(s.models))
        self.plan = [self.rng.choices(models, self.shares)[0] for _ in range(s.nodes)]
        for m in models:  # the first node of each model is everyone's bootstrap node
            self.plan[m] = m
        bootstrap = tuple(_address(m) for m in models)
        self.configs = [SwarmConfig(bootstrap=bootstrap, mdns=False, heartbeat=s.heartbeat, ttl=s.ttl,
                                    exchange_every=s.exchange_every, fanout=s.fanout, model=self.models[m][1],
                                    limits=self.limits) for m in models]
        if 2 * LATENCY >= self.configs[0].gossip_timeout:
            raise ValueError("a simulated call must end before its deadline")

    def clock(self) -> float:
        return EPOCH + self.loop.time()

    def member(self, model: int):
        from common.swarm.membership import Membership

        address = _address(self.count)
        self.count += 1
        identity = Identity(Ed25519PrivateKey.from_private_bytes(self.rng.randbytes(32)), None)
        m = Membership(self.configs[model], identity, rng=random.Random(self.rng.random()),
                       transport=self.transport.for_node(address), clock=self.clock)
        m.registry = CachedRegistry(limits=self.limits, cache=self.cache)
        self.model_of[address] = model
        self.transport.members[address] = m
        return m, address

    def run_as(self, address: str, coro) -> asyncio.Task:
        """A task of node `address` (its CPU is charged to it, and so is that of every task it spawns)."""
        context = contextvars.copy_context()
        context.run(NODE.set, address)
        task = self.loop.create_task(coro, context=context)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def knows(self, m, node_id: str) -> bool:
        held = m.registry.records.get(node_id)
        return held is not None and node_id in m.registry.proven and held[0].expires_at > self.clock() \
            and held[0].state != NodeState.OFFLINE

    def peers_of(self, model: int) -> list:
        return [m for a, m in self.alive.items() if self.model_of[a] == model]

    def stop(self, address: str) -> None:
        m = self.alive.pop(address)
        self.transport.members.pop(address, None)
        if m._loop is not None:
            m._loop.cancel()
        for task in list(m._tasks):
            task.cancel()


async def _build(sw: _Swarm) -> None:
    """A converged swarm: every node holds its model's records (bootstrap nodes every model's), proven;
    each node's gossip loop starts at a random instant of one heartbeat, as if they had joined over time."""
    s = sw.s
    nodes = [sw.member(model) for model in sw.plan]
    signed = []
    for (m, address), model in zip(nodes, sw.plan):
        issued = sw.clock() - sw.rng.uniform(0, s.heartbeat)
        m.own = renewed(_record(m.identity, address, model, sw.models), s.ttl, now=issued)
        signed.append((model, sign_record(m.own, m.identity.key)))
    bootstrap = set(sw.configs[0].bootstrap)
    for (m, address), model in zip(nodes, sw.plan):
        for (other, _), (their_model, record) in zip(nodes, signed):
            if their_model == model or address in bootstrap:
                m.registry.offer(record, now=sw.clock())
                m.registry.prove(other.identity.node_id)
        sw.alive[address] = m

    async def start(m, delay: float) -> None:
        await asyncio.sleep(delay)
        m._loop = asyncio.ensure_future(m._run())

    for m, address in nodes:
        sw.run_as(address, start(m, sw.rng.uniform(0, s.heartbeat)))


async def _join(sw: _Swarm, joins: list) -> None:
    model = sw.rng.choices(range(sw.s.models), sw.shares)[0]
    m, address = sw.member(model)
    record = _record(m.identity, address, model, sw.models)
    began = sw.loop.time()

    async def join() -> None:
        await m.start()
        await m.publish(record)

    sw.run_as(address, join())
    sw.alive[address] = m
    sw.joining.add(address)
    took = await _until(lambda: all(sw.knows(p, record.node_id) for p in sw.peers_of(model)), 120.0)
    sw.joining.discard(address)
    joins.append(None if took is None else sw.loop.time() - began)


async def _depart(sw: _Swarm, gone: list, graceful: bool) -> None:
    candidates = sorted(a for a, m in sw.alive.items()
                        if a not in sw.configs[0].bootstrap and a not in sw.joining and m._loop is not None)
    address = sw.rng.choice(candidates)
    m = sw.alive[address]
    node_id, began = m.own.node_id, sw.loop.time()
    if graceful:
        await sw.run_as(address, m.leave())
    sw.stop(address)
    took = await _until(lambda: not any(sw.knows(p, node_id) for p in sw.alive.values()), 3 * sw.s.ttl, every=1.0)
    gone.append(None if took is None else sw.loop.time() - began)


def _worst(values: list) -> float | None:
    return None if not values or None in values else round(max(values), 2)


async def _simulate(s: SimSettings) -> dict:
    loop = asyncio.get_running_loop()
    sw = _Swarm(s, loop)
    await _build(sw)
    await asyncio.sleep(s.settle)

    # the window: churn, and what steady state costs
    steady = list(sw.alive)
    raw, cpu = dict(sw.transport.raw), dict(loop.cpu)
    refused = sum(m.registry.refused for m in sw.alive.values()) + sw.transport.refusals
    failures = sw.transport.failures
    joins, deaths, leaves = [], [], []
    trackers = []
    began = loop.time()
    step = 0
    while loop.time() - began < s.window:
        kind = step % 4
        step += 1
        if kind in (0, 2):
            trackers.append(asyncio.ensure_future(_join(sw, joins)))
        else:
            trackers.append(asyncio.ensure_future(_depart(sw, deaths if kind == 1 else leaves, graceful=kind == 3)))
        await asyncio.sleep(s.churn_every)
    minutes = (loop.time() - began) / 60.0
    survivors = [a for a in steady if a in sw.alive]
    per_node = [(sw.transport.bytes_of(a) - sw.transport.bytes_of(a, raw)) / minutes for a in survivors]
    per_node_raw = [(sw.transport.bytes_of(a, compressed=False) - sw.transport.bytes_of(a, raw, compressed=False))
                    / minutes for a in survivors]
    cpu_ms = [(loop.cpu.get(a, 0.0) - cpu.get(a, 0.0)) * 1000 / minutes for a in survivors]
    refusals = sum(m.registry.refused for m in sw.alive.values()) + sw.transport.refusals - refused
    failed = sw.transport.failures - failures
    await asyncio.gather(*trackers)

    # a partition longer than the TTL, then healed
    apart = heal = None
    if s.partition:
        members = sorted(sw.alive)
        half = set(members[len(members) // 2:])
        for address in members:
            sw.transport.group[address] = int(address in half)
        sw.transport.cut = True
        side = {m.own.node_id: sw.transport.group[a] for a, m in sw.alive.items()}
        sample = [sw.alive[a] for a in sw.rng.sample(members, min(50, len(members)))]
        apart = await _until(lambda: all(not any(sw.knows(m, n) for n in side if side[n] != side[m.own.node_id])
                                         for m in sample), 3 * s.ttl, every=2.0)
        sw.transport.cut = False
        ids = {model: [p.own.node_id for p in sw.peers_of(model)] for model in range(s.models)}
        heal = await _until(lambda: all(all(sw.knows(m, n) for n in ids[sw.model_of[a]]) for a, m in sw.alive.items()),
                            600.0, every=2.0)
    for address in list(sw.alive):
        sw.stop(address)
    while tasks := [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    counts = [sum(1 for m in sw.plan if m == model) for model in range(s.models)]
    return {
        "nodes": s.nodes, "backend": "gossip", "models": counts, "heartbeat_s": s.heartbeat, "ttl_s": s.ttl,
        "exchange_every_s": s.exchange_every, "fanout": s.fanout, "churn_every_s": s.churn_every,
        "window_s": round(minutes * 60, 1),
        "bytes_per_min_per_node": round(statistics.mean(per_node)),
        "bytes_per_min_per_node_max": round(max(per_node)),
        "bytes_per_min_per_node_uncompressed": round(statistics.mean(per_node_raw)),
        "cpu_ms_per_min_per_node": round(statistics.mean(cpu_ms), 1),
        "cpu_ms_per_min_per_node_max": round(max(cpu_ms), 1),
        "steady_state_refusals": refusals, "steady_state_failed_calls": failed,
        "joins": len(joins), "join_known_by_all_s": _worst(joins),
        "join_known_by_all_median_s": round(statistics.median([j for j in joins if j is not None] or [0]), 2),
        "deaths": len(deaths), "dead_forgotten_s": _worst(deaths),
        "leaves": len(leaves), "left_forgotten_s": _worst(leaves),
        "partition_forgotten": apart is not None if s.partition else None,
        "partition_heal_s": heal,
        "sim_s": round(loop.time(), 1),
    }


def simulate_swarm(settings: SimSettings) -> dict:
    """Run one simulation on a fresh virtual loop; returns the JSON-ready measurements."""
    loop = VirtualLoop()
    began, cpu_began = time.monotonic(), time.process_time()
    quiet = logging.getLogger("common.swarm.membership")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # calls to departed nodes and across the cut fail by design: counted, not logged
    try:
        result = loop.run_until_complete(_simulate(settings))
    finally:
        loop.close()
        quiet.setLevel(level)
    result["wall_s"] = round(time.monotonic() - began, 1)
    result["cpu_s"] = round(time.process_time() - cpu_began, 1)
    return result
