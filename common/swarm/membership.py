"""Swarm membership: one registry fed by gossip (anti-entropy over gRPC) and mDNS.

Every few seconds a node reconciles with one random peer: it sends a digest of what it holds (16 bytes a
record), gets back only the records it lacks and the ids the peer lacks, and pushes those, all in pages.
News (a new node, a changed or OFFLINE record) is also pushed at once to a few peers, who pass it on once.
A node re-announces its own record every `heartbeat` seconds; records expire after their TTL. A record
from a new identity is kept but neither passed on nor routed through until its advertised address answers
a Gossip call with its node id ("proven"). Bootstrap nodes are re-contacted now and then, so partitions
heal. Clients use the same class without an own record: they pull, and prove the records of their model."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from common.swarm import digest
from common.swarm.identity import Identity
from common.swarm.mdns import MdnsDiscovery
from common.swarm.records import (
    TTL_CAP,
    Limits,
    NodeState,
    PeerRecord,
    Registry,
    SignedRecord,
    node_id_of,
    renewed,
    sign_record,
)
from common.swarm.strikes import StrikeBook
from common.swarm.transport import GrpcTransport, TransportError
from common.wire import record_codec as codec
from common.wire.generated import potluck_pb2 as pb
from common.wire.security import PLAINTEXT, Security

log = logging.getLogger(__name__)

MAX_PAGES = 64  # pages one exchange pulls at most (a page is `page_records` records)
ASKED_CALLERS = 64  # callers whose answers to our `wanted` lists are remembered at once (Membership._ask)
# new identities of a caller's minute (Limits.per_source) not asked for, kept for what it pushes unasked (its own
# record, news of a join); at most a quarter of the minute
UNASKED_ROOM = 8


@dataclass(frozen=True)
class SwarmConfig:
    bootstrap: tuple[str, ...] = ()   # HOST:PORT of known nodes
    mdns: bool = True                 # LAN discovery with zeroconf
    mdns_interface: str | None = None  # the interface address for mDNS (None = all)
    heartbeat: float = 30.0           # seconds between re-announcements of the own record
    ttl: float = 90.0                 # a record's lifetime; a silent node disappears after it
    fanout: int = 3                   # peers news is pushed to at once
    exchange_every: float = 5.0       # seconds between anti-entropy rounds (at most the heartbeat)
    exchange_peers: int = 1           # random peers reconciled with each round
    bootstrap_every: float = 30.0     # seconds between chances to re-contact a bootstrap node
    bootstrap_share: float = 8.0      # bootstrap contacts per chance across the swarm (each node: share / known)
    gossip_timeout: float = 3.0       # deadline of one call
    page_records: int = 200           # records in one message at most (a receiver takes 256)
    idle_channel: float = 60.0        # seconds an unused channel stays open
    model: str = ""                   # the config hash gossiped about ("" = every model: clients, status)
    proofs: int = 32                  # proofs (Gossip calls to a new record's address) in flight at most
    limits: Limits = field(default_factory=lambda: Limits(max_ttl=TTL_CAP))  # registry caps, TTL cap

    def __post_init__(self) -> None:
        if self.heartbeat <= 0 or self.ttl <= self.heartbeat:
            raise ValueError("need 0 < heartbeat < ttl")
        if self.ttl > self.limits.max_ttl:
            raise ValueError(f"a TTL of {self.ttl:g}s exceeds the cap of {self.limits.max_ttl:g}s")
        if self.exchange_every <= 0 or self.fanout < 1 or self.exchange_peers < 1 or not 0 < self.page_records <= 256:
            raise ValueError("need exchange_every > 0, fanout and exchange_peers >= 1, 0 < page_records <= 256")


def _news(old: PeerRecord | None, new: PeerRecord) -> bool:
    """A record worth pushing at once: a new node, or one whose state, span or addresses changed."""
    return old is None or (old.state, old.start, old.end, old.addresses) != (new.state, new.start, new.end,
                                                                            new.addresses)


class Membership:
    def __init__(self, config: SwarmConfig, identity: Identity | None = None,
                 stats: Callable[[], dict] | None = None, rng: random.Random | None = None,
                 security: Security = PLAINTEXT, transport=None, clock: Callable[[], float] = time.time):
        self.config = config
        self.security = security  # channels, call tokens and sealed records of a private swarm
        self.identity = identity
        self.stats = stats or dict  # live fields merged into each re-announcement (load, free cache)
        self.clock = clock          # wall-clock seconds (records' times); the benchmark simulates it
        self.transport = transport or GrpcTransport(security, config.idle_channel)
        self.registry = Registry(limits=config.limits)
        self.strikes = StrikeBook()  # clients' signed reports of nodes that returned wrong activations
        self.contacts: set[str] = set(config.bootstrap)  # addresses to pull from besides records
        self.own: PeerRecord | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.failures = 0            # exchanges that failed (each logged at WARNING)
        # caller host -> (until, id prefixes we asked it for, those of them new here and not come yet)
        self._asked: dict[str, tuple[float, set[bytes], set[bytes]]] = {}
        self.refused: set[str] = set()  # addresses that refused our calls as UNAUTHENTICATED (private swarms)
        self._rng = rng or random.Random()
        self._mdns: MdnsDiscovery | None = None
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.Task | None = None
        self._proving: dict[str, asyncio.Future] = {}  # node id -> its proof in flight
        self._proof_slots = asyncio.Semaphore(config.proofs)
        self._digest: tuple[int, bytes] = (-1, b"")
        # registry.members when built, the soonest expiry among them, proven live peers (node id, first address)
        self._peer_list: tuple[int, float, list[tuple[str, str]]] = (-1, -math.inf, [])
        self.changed = asyncio.Event()  # set whenever the registry gains something

    @property
    def scope(self) -> str:
        return self.own.config_hash if self.own is not None else self.config.model

    # -- life cycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.config.mdns:
            swarm_tag = self.security.swarm_key.tag if self.security.private else None
            self._mdns = MdnsDiscovery(self.config.mdns_interface, self._on_mdns, swarm_tag)
            await self._mdns.start()
        await self.pull_all()

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._mdns is not None:
            await self._mdns.close()
        close = getattr(self.transport, "close", None)
        if close is not None:
            await close()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- own record -------------------------------------------------------------------------------
    async def publish(self, record: PeerRecord, mdns_address: str | None = None) -> None:
        """Set (or change) our record and announce it now; starts the gossip loop on first use."""
        floor = max(record.seq, self.own.seq if self.own else 0)
        self.own = renewed(replace(record, seq=floor), self.config.ttl, now=self.clock())
        signed = self._accept_own()
        if self._mdns is not None and mdns_address is not None:
            # registering takes zeroconf ~1.2 s (its probing); do not make the node wait for it
            self._spawn(self._mdns.announce(record.node_id, mdns_address, record.config_hash))
        await self._push([signed], self._peers(self.config.fanout) | set(self.contacts))
        if self._loop is None:
            self._loop = asyncio.ensure_future(self._run())

    def _accept_own(self) -> SignedRecord:
        signed = sign_record(self.own, self.identity.key)
        self.registry.offer(signed, now=self.clock())
        self.registry.prove(self.own.node_id)
        self.changed.set()
        return signed

    async def _run(self) -> None:
        """The gossip loop: anti-entropy rounds, re-announcements, bootstrap contacts, expiry, idle channels."""
        config = self.config
        tick = min(config.exchange_every, config.heartbeat)
        next_renew = self.clock() + config.heartbeat
        next_bootstrap = self.clock() + config.bootstrap_every * self._rng.random()
        while True:
            await asyncio.sleep(tick * self._rng.uniform(0.9, 1.1))
            try:
                now = self.clock()
                if self.registry.expire(now):
                    self._digest = (-1, b"")
                if now >= next_renew:
                    next_renew = now + config.heartbeat * self._rng.uniform(0.9, 1.0)
                    self.own = renewed(self.own, config.ttl, now=now, **self.stats())
                    self._spawn(self._push([self._accept_own()], self._peers(config.fanout)))
                targets = self._peers(config.exchange_peers) or set(self.contacts)
                if now >= next_bootstrap and config.bootstrap:
                    next_bootstrap = now + config.bootstrap_every
                    known = len(self.registry.live(now=now, model=self.scope or None, proven=True))
                    if self._rng.random() < config.bootstrap_share / max(1, known):
                        targets.add(self._rng.choice(sorted(config.bootstrap)))
                own = set(self.own.addresses)
                await asyncio.gather(*(self.exchange(a) for a in targets - own))
                close_idle = getattr(self.transport, "close_idle", None)
                if close_idle is not None:
                    await close_idle()
            except Exception:  # one bad round must not end membership
                log.exception("gossip round failed")

    async def leave(self) -> None:
        """Announce OFFLINE (used on shutdown): the record alone, to a few peers; it spreads as news."""
        if self.own is None:
            return
        self.own = renewed(self.own, self.config.ttl, now=self.clock(), state=NodeState.OFFLINE)
        signed = self._accept_own()
        await self._push([signed], self._peers(self.config.fanout) | set(self.contacts))

    # -- the callee's side --------------------------------------------------------------------------
    def handle(self, request: pb.GossipRequest, source: str | None = None) -> pb.GossipReply:
        """Merge what `source` (the caller's host; None: unknown) sent, answer with what it lacks."""
        key = self.security.swarm_key
        self.take_strikes(request.strikes)
        self._take(codec.decode_records(request.records, key), source)
        own_id = self.own.node_id if self.own is not None else ""
        if request.push_only:
            return pb.GossipReply(node_id=own_id)
        now = self.clock()
        model = request.model or None
        # an exchange scoped to one model carries that model's records, and every relay's: relays carry the
        # nodes of any model (a node behind NAT must find one in a swarm whose relays serve another model)
        held = {r.node_id: s for r, s in self.registry.records.values()
                if r.expires_at > now and (model is None or r.config_hash == model or r.relay_slots > 0)}
        proven = [(node_id, self.registry.records[node_id][0].seq) for node_id in held
                  if self.registry.is_proven(node_id)]
        if request.anti_entropy:
            theirs = digest.unpack(request.digest)
            lacking = digest.missing(proven, theirs)
            mine = {digest.prefix(node_id): self.registry.records[node_id][0].seq for node_id in held}
            # new identities only as many as there is room for unproven ones, and as the caller may still push
            # (they come back pushed, from its host) less what is kept for its unasked pushes: the rest in a
            # later exchange
            kept = min(UNASKED_ROOM, self.registry.limits.per_source // 4)
            room = min(self._room(now), max(0, self.registry.source_room(source, now) - kept))
            wanted = digest.wanted(mine, theirs, new_at_most=room) if self.own is not None else b""
            if wanted and source is not None:
                self._ask(source, {wanted[i: i + 8] for i in range(0, len(wanted), 8)}, mine, now)
        else:
            lacking, wanted = [node_id for node_id, _ in proven], b""
        self._rng.shuffle(lacking)
        page = [held[node_id] for node_id in lacking[: self.config.page_records]]
        return pb.GossipReply(records=codec.encode_records(page, key), wanted=wanted,
                              more=len(lacking) > len(page), node_id=own_id,
                              strikes=codec.encode_records(self.strikes.signed(), key))

    def _ask(self, source: str, keys: set[bytes], mine: dict[bytes, int], now: float) -> None:
        """We asked `source` for the records of `keys` (id prefixes; those not in `mine` are new identities):
        the new ones are counted against its minute now, and the push that answers is taken whatever else it
        pushed meanwhile (news of joins from the same host), even a record that expired here since."""
        self._asked = {s: entry for s, entry in self._asked.items() if entry[0] > now}
        if len(self._asked) >= ASKED_CALLERS and source not in self._asked:
            return  # their pushes are counted as pushes (never more than the per-source cap)
        new = keys - mine.keys()
        self.registry.reserve(source, len(new), now)
        # the answer follows the reply at once: remembered for two call deadlines
        _, before, awaited = self._asked.get(source, (0.0, set(), set()))
        self._asked[source] = (now + 2 * self.config.gossip_timeout, keys | before, new | awaited)

    def _room(self, now: float) -> int:
        """Room for new unproven identities, less what the answers to our asks will take: two callers answered
        before either pushed were each asked for all of it, and the second push found it taken (refused)."""
        awaited = sum(len(entry[2]) for entry in self._asked.values() if entry[0] > now)
        return max(0, self.registry.pending_room(now) - awaited)

    def _is_asked(self, source: str | None, node_id: str) -> bool:
        """Whether we asked `source` for `node_id`'s record (once: the answer is taken, not a second copy)."""
        entry = self._asked.get(source) if source is not None else None
        key = digest.prefix(node_id)
        if entry is None or key not in entry[1]:
            return False
        entry[1].discard(key)
        entry[2].discard(key)
        return True

    def _take(self, batch, source: str | None) -> None:
        """Offer records; prove new identities, pass news on once proven. Records we pulled (`source` None) of
        new identities are taken while the registry has room for unproven ones; the rest are left for a later
        exchange (the digest still lacks them), not refused: a node joining a swarm larger than that room
        learns it page by page as its proofs come back. Pushed records past the room are refused (a cap)."""
        now = self.clock()
        accepted = 0
        room = self._room(now) if source is None else None
        for signed in batch:
            node_id = codec_node_id(signed)
            held = self.registry.records.get(node_id)
            if held is None and room is not None:
                if room <= 0:
                    continue  # no room for another unproven identity: a later exchange brings it
                room -= 1
            old = held[0] if held is not None else None
            asked = held is None and self._is_asked(source, node_id)
            try:
                if not self.registry.offer(signed, now=now, source=source, asked=asked):
                    continue
            except Exception as problem:  # RecordError: invalid, expired, or over a cap
                log.debug("dropped a gossiped record: %s", problem)
                continue
            accepted += 1
            record = self.registry.records[node_id][0]
            news = _news(old, record)
            news = news and self._passes_on(record)
            if self.registry.is_proven(record.node_id):
                if news:
                    self._spawn(self._push([signed], self._peers(self.config.fanout, avoid=record.node_id)))
            else:  # other models' records too: a node may be another model's bootstrap node
                self._prove_soon(record.node_id, forward=news)
        if accepted:
            self._digest = (-1, b"")
            self.changed.set()

    def _passes_on(self, record: PeerRecord) -> bool:
        """Whether news of `record` goes to our peers: only if they serve its model (or it is a relay, which
        carries any model's nodes). A bootstrap node hears of every model's joins; passing those to its own
        model's peers was traffic they do not use, and at a tight per-source cap, refusals."""
        return not self.scope or record.config_hash == self.scope or record.relay_slots > 0

    # -- proofs ---------------------------------------------------------------------------------------
    def _prove_soon(self, node_id: str, forward: bool) -> asyncio.Future:
        pending = self._proving.get(node_id)
        if pending is None:
            pending = self._proving[node_id] = self._spawn(self._prove(node_id, forward))
            pending.add_done_callback(lambda _: self._proving.pop(node_id, None))
        return pending

    async def _prove(self, node_id: str, forward: bool) -> None:
        """Ask the record's address who answers there; proven if it is the record's node."""
        async with self._proof_slots:
            held = self.registry.records.get(node_id)
            if held is None:
                return
            reply = await self._call(held[0].address, pb.GossipRequest(anti_entropy=True, push_only=True))
        if reply is None or reply.node_id != node_id:
            return
        held = self.registry.records.get(node_id)
        if held is not None and address_answered(held[0], reply) and self.registry.is_proven(node_id) and forward:
            await self._push([held[1]], self._peers(self.config.fanout, avoid=node_id))

    async def settle(self) -> None:
        """Wait for the proofs in flight."""
        while self._proving:
            await asyncio.gather(*list(self._proving.values()), return_exceptions=True)

    # -- the caller's side ----------------------------------------------------------------------------
    def _peers(self, count: int, avoid: str = "") -> set[str]:
        """`count` random proven live peers (their first address)."""
        now = self.clock()
        members, expires, listed = self._peer_list
        # rebuilt when who is listed changed, or when one of those listed may have expired since; not on every
        # renewal (a node of a 5,000-node model hears ~170 a second, each of which rebuilt a 5,000-entry list)
        if members != self.registry.members or now >= expires:
            own = self.own.node_id if self.own is not None else ""
            model, proven, offline = self.scope or None, self.registry.proven, NodeState.OFFLINE
            live = [r for r, _ in self.registry.records.values()  # registry.live's filter, without its sort
                    if r.expires_at > now and r.state != offline and (model is None or r.config_hash == model)
                    and r.node_id in proven and r.node_id != own]
            listed = [(r.node_id, r.addresses[0]) for r in live]
            self._peer_list = (self.registry.members, min((r.expires_at for r in live), default=math.inf), listed)
        peers = [address for node_id, address in listed if node_id != avoid]
        return set(self._rng.sample(peers, min(count, len(peers))))

    def _own_digest(self) -> bytes:
        version = self.registry.version
        if self._digest[0] != version:
            now, model = self.clock(), self.scope or None
            entries = [(r.node_id, r.seq) for r, _ in self.registry.records.values()
                       if r.expires_at > now and (model is None or r.config_hash == model)]
            self._digest = (version, digest.pack(entries))
        return self._digest[1]

    async def _call(self, address: str, request: pb.GossipRequest) -> pb.GossipReply | None:
        try:
            reply = await self.transport.gossip(address, request, self.config.gossip_timeout)
        except TransportError as error:
            self.failures += 1
            log.warning("gossip with %s failed: %s", address, error)
            if error.code == "UNAUTHENTICATED":
                self.refused.add(address)  # a private swarm's node, and we lack (or have another) key
            return None
        self.bytes_sent += request.ByteSize()
        self.bytes_received += reply.ByteSize()
        if reply.node_id and (held := self.registry.records.get(reply.node_id)) is not None \
                and address in held[0].addresses and self.registry.prove(reply.node_id):
            self._digest = (-1, b"")
            self.changed.set()
        return reply

    async def _push(self, records: list[SignedRecord], addresses) -> None:
        key = self.security.swarm_key
        own = set(self.own.addresses) if self.own is not None else set()
        step = self.config.page_records
        pages = [codec.encode_records(records[i: i + step], key) for i in range(0, len(records), step)]
        await asyncio.gather(*(self._call(address, pb.GossipRequest(anti_entropy=True, push_only=True, records=page))
                               for address in set(addresses) - own for page in pages))

    async def exchange(self, address: str, push: bool = True) -> bool:
        """Reconcile with `address`: pull what we lack (page by page), push what it lacks (if we are a node)."""
        key = self.security.swarm_key
        for page in range(MAX_PAGES):
            strikes = codec.encode_records(self.strikes.signed(), key) if page == 0 and push else []
            request = pb.GossipRequest(anti_entropy=True, digest=self._own_digest(), model=self.scope,
                                       strikes=strikes)
            reply = await self._call(address, request)
            if reply is None:
                return False
            self.take_strikes(reply.strikes)
            self._take(codec.decode_records(reply.records, key), None)
            if reply.wanted and push and self.own is not None:
                keys = {reply.wanted[i: i + 8] for i in range(0, len(reply.wanted), 8)}
                now = self.clock()
                records = [s for r, s in self.registry.records.values()
                           if digest.prefix(r.node_id) in keys and r.expires_at > now
                           and self.registry.is_proven(r.node_id)]
                await self._push(records, [address])
            if not reply.more or self.registry.pending_room(self.clock()) == 0:
                return True  # all pulled, or no room for more until proofs come back: the next exchange goes on
        return True

    async def push_all(self, addresses) -> None:
        await asyncio.gather(*(self.exchange(a) for a in addresses))

    async def pull_all(self) -> None:
        """Reconcile with the bootstrap nodes, every contact found by mDNS, and a few known live peers
        (so a swarm stays reachable when the bootstrap nodes are gone); then wait for the proofs."""
        own = set(self.own.addresses) if self.own else set()
        targets = set(self.contacts) | self._peers(self.config.fanout)
        await asyncio.gather(*(self.exchange(a, push=self.own is not None) for a in targets - own))
        await self.settle()

    def _on_mdns(self, node_id: str, address: str) -> None:
        if self.own is not None and address in self.own.addresses:
            return
        self.contacts.add(address)
        self._spawn(self.exchange(address, push=self.own is not None))

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until `predicate()` holds (re-checked whenever the registry changes), or time out."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(left, 1.0))
            except asyncio.TimeoutError:
                await self.pull_all()
        return True

    def take_strikes(self, messages) -> int:
        """Keep the valid strikes among gossiped ones (common/swarm/strikes.py); returns how many were new."""
        batch = messages[: 2 * self.strikes.limit]  # a book holds `limit`: more in one message is a flood
        accepted, problems = self.strikes.offer_many(codec.decode_records(batch, self.security.swarm_key))
        for problem in problems:
            log.debug("dropped a strike: %s", problem)
        return accepted

    def live(self, config_hash: str | None = None, proven: bool = True) -> list[PeerRecord]:
        """Live records (of one config hash, if given); only proven ones unless asked otherwise."""
        return self.registry.live(now=self.clock(), model=config_hash, proven=proven)

    def signed_records(self) -> list[SignedRecord]:
        return self.registry.signed(now=self.clock(), proven=True)


def address_answered(record: PeerRecord, reply: pb.GossipReply) -> bool:
    return reply.node_id == record.node_id


def codec_node_id(signed: SignedRecord) -> str:
    return node_id_of(signed.public_key) if signed.public_key else ""
