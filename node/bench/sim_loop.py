"""What the gossip simulation runs on: a virtual clock, an in-memory transport, per-node CPU accounting.

`VirtualLoop` is an asyncio loop that never waits: when nothing is ready, its clock jumps to the next
timer. Time advances only by scheduled events (sleeps, latencies), never by how long the machine took to
run a callback, so a loaded machine gives the same figures, only later. The CPU each callback takes is
measured (`time.process_time`) and charged to the node whose task ran it (the `NODE` context variable, set
when a node's tasks are created and inherited by every task they spawn).

`MemoryTransport` delivers a Gossip call by calling the callee's `Membership.handle()` after a one-way
latency, after the same batch check a node's gRPC servicer applies (node/rpc/checks.py: a request over
its record limit is refused), and counts the bytes as gRPC sends them (the serialized message, gzipped;
compressing every message is the simulation's largest cost, so by default one message in `gzip_every`
of each kind is compressed and the ratio applied to the others)."""

from __future__ import annotations

import asyncio
import contextvars
import selectors
import time
import zlib
from dataclasses import dataclass, field

from common.swarm.records import RecordError, Registry, verify_record
from common.swarm.transport import TransportError
from node.rpc.checks import check_gossip
from node.runtime.errors import InvalidRequest

NODE: contextvars.ContextVar[str] = contextvars.ContextVar("sim_node", default="")  # the node running now


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
        self.cpu: dict[str, float] = {}  # node address -> CPU seconds its callbacks took

    def time(self) -> float:
        return self._virtual.now

    def call_soon(self, callback, *args, context=None):
        return super().call_soon(self._timed, callback, *args, context=context)

    def _timed(self, callback, *args) -> None:
        began = time.process_time()
        try:
            callback(*args)
        finally:
            node = NODE.get()
            self.cpu[node] = self.cpu.get(node, 0.0) + time.process_time() - began

    def charge(self, node: str, seconds: float, instead_of: str) -> None:
        """Move CPU time from one node to another (a callee's work done inside the caller's callback)."""
        self.cpu[node] = self.cpu.get(node, 0.0) + seconds
        self.cpu[instead_of] = self.cpu.get(instead_of, 0.0) - seconds


@dataclass
class CachedRegistry(Registry):
    """The real registry, with each distinct signed record's signature checked once per simulation (`cache`,
    shared by every node's registry): 1,000 nodes re-verifying each other's renewals would be a million
    ed25519 checks a heartbeat, the same work repeated. Expiry is still checked on every offer."""

    cache: dict = field(default_factory=dict)

    def _verify(self, signed, now):
        record = self.cache.get(signed)
        if record is None:
            record = self.cache[signed] = verify_record(signed, now)
        elif record.expires_at <= now:
            raise RecordError("expired record")
        return record


class MemoryTransport:
    """Gossip calls delivered in memory, with latency, partitions and dead nodes; bytes counted gzipped."""

    def __init__(self, latency: float = 0.05, count_bytes: bool = True, gzip_every: int = 8):
        self.latency = latency
        self.count_bytes = count_bytes  # tests may skip counting
        self.gzip_every = gzip_every    # compress one message in this many of each kind (1: every one)
        self.members: dict = {}          # address -> Membership
        self.group: dict[str, int] = {}  # address -> partition group (calls across groups fail)
        self.cut = False
        self.raw: dict[tuple[str, str], int] = {}   # (address, kind) -> serialized bytes sent and received
        self._sampled: dict[str, list[int]] = {}    # kind -> [messages, raw bytes compressed, gzipped bytes]
        self.calls = self.failures = self.refusals = 0

    def for_node(self, address: str) -> _Endpoint:
        return _Endpoint(self, address)

    def _count(self, sender: str, receiver: str, message) -> None:
        if not self.count_bytes:
            return
        part = "records" if message.records else \
            "digest" if getattr(message, "digest", b"") or getattr(message, "wanted", b"") else "small"
        kind = f"{type(message).__name__}:{part}"
        size = message.ByteSize()
        sample = self._sampled.setdefault(kind, [0, 0, 0])
        if sample[0] % self.gzip_every == 0:
            sample[1] += size
            sample[2] += len(zlib.compress(message.SerializeToString(), 6))
        sample[0] += 1
        for node in (sender, receiver):
            self.raw[(node, kind)] = self.raw.get((node, kind), 0) + size

    def ratios(self) -> dict[str, float]:
        return {kind: (gz / raw if raw else 1.0) for kind, (_, raw, gz) in self._sampled.items()}

    def bytes_of(self, address: str, raw: dict | None = None, compressed: bool = True) -> float:
        """Bytes `address` sent and received (gzipped as gRPC sends them, or raw), from a `raw` snapshot."""
        raw = self.raw if raw is None else raw
        ratios = self.ratios()
        return sum(size * (ratios.get(kind, 1.0) if compressed else 1.0)
                   for (node, kind), size in raw.items() if node == address)

    async def call(self, caller: str, address: str, request):
        self.calls += 1
        await asyncio.sleep(self.latency)
        callee = self.members.get(address)
        if callee is None or (self.cut and self.group.get(caller) != self.group.get(address)):
            self.failures += 1
            await asyncio.sleep(self.latency)
            raise TransportError("UNAVAILABLE", "unreachable")
        try:
            check_gossip(request)  # what the servicer checks before handing the request to membership
        except InvalidRequest as problem:
            self.refusals += 1
            await asyncio.sleep(self.latency)
            raise TransportError("INVALID_ARGUMENT", str(problem)) from None
        self._count(caller, address, request)
        began = time.process_time()
        reply = callee.handle(request, source=caller.rsplit(":", 1)[0])
        loop = asyncio.get_running_loop()
        if isinstance(loop, VirtualLoop):
            loop.charge(address, time.process_time() - began, instead_of=caller)
        self._count(address, caller, reply)
        await asyncio.sleep(self.latency)
        return reply


@dataclass
class _Endpoint:
    transport: MemoryTransport
    address: str

    async def gossip(self, address, request, timeout):
        # no asyncio.wait_for: a memory call takes 2 x latency, always under the deadline (checked by the caller)
        return await self.transport.call(self.address, address, request)
