"""Swarm membership: one registry fed by gossip (push-pull over gRPC) and mDNS.

Nodes re-announce their own record on every heartbeat and exchange records with the
bootstrap nodes and a few random peers; records expire after their TTL; a node that
leaves pushes an OFFLINE record to everyone at once. Clients use the same class
without an own record: they only pull."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import grpc

from common.swarm.identity import Identity
from common.swarm.mdns import MdnsDiscovery
from common.swarm.records import NodeState, PeerRecord, Registry, SignedRecord, renewed, sign_record
from common.swarm.strikes import StrikeBook
from common.wire import record_codec as codec
from common.wire.generated import potluck_pb2 as pb
from common.wire.generated import potluck_pb2_grpc as pb_grpc
from common.wire.security import PLAINTEXT, Security

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwarmConfig:
    bootstrap: tuple[str, ...] = ()   # HOST:PORT of known nodes
    mdns: bool = True                 # LAN discovery with zeroconf
    mdns_interface: str | None = None  # the interface address for mDNS (None = all)
    heartbeat: float = 5.0            # seconds between re-announcements
    ttl: float = 15.0                 # a record's lifetime; a silent node disappears after it
    fanout: int = 3                   # random peers gossiped with per heartbeat, besides bootstrap nodes
    gossip_timeout: float = 3.0       # deadline of one exchange

    def __post_init__(self) -> None:
        if self.heartbeat <= 0 or self.ttl <= self.heartbeat:
            raise ValueError("need 0 < heartbeat < ttl")


def gossip_targets(peers: list[str], bootstrap, fanout: int, own: set[str], rng: random.Random) -> set[str]:
    """Whom to gossip with on a heartbeat: `fanout` random live peers, and the bootstrap nodes too while
    we know no more peers than that (so bootstrap nodes do not carry every node's traffic in a large swarm)."""
    others = [address for address in peers if address not in own]
    chosen = set(rng.sample(others, min(fanout, len(others))))
    if len(others) <= fanout:
        chosen |= set(bootstrap)
    return chosen - own


class Membership:
    def __init__(self, config: SwarmConfig, identity: Identity | None = None,
                 stats: Callable[[], dict] | None = None, rng: random.Random | None = None,
                 security: Security = PLAINTEXT):
        self.config = config
        self.security = security  # channels, call tokens and sealed records of a private swarm
        self.identity = identity
        self.stats = stats or dict  # live fields merged into each re-announcement (load, free cache)
        self.registry = Registry()
        self.strikes = StrikeBook()  # clients' signed reports of nodes that returned wrong activations
        self.contacts: set[str] = set(config.bootstrap)  # addresses to pull from besides records
        self.own: PeerRecord | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.refused: set[str] = set()  # addresses that refused our calls as UNAUTHENTICATED (private swarms)
        self._rng = rng or random.Random()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._mdns: MdnsDiscovery | None = None
        self._tasks: set[asyncio.Task] = set()
        self._heartbeat: asyncio.Task | None = None
        self.changed = asyncio.Event()  # set whenever the registry gains something

    # -- life cycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.config.mdns:
            swarm_tag = self.security.swarm_key.tag if self.security.private else None
            self._mdns = MdnsDiscovery(self.config.mdns_interface, self._on_mdns, swarm_tag)
            await self._mdns.start()
        await self.pull_all()

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._mdns is not None:
            await self._mdns.close()
        await asyncio.gather(*(channel.close() for channel in self._channels.values()), return_exceptions=True)
        self._channels.clear()

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- own record -------------------------------------------------------------------------------
    async def publish(self, record: PeerRecord, mdns_address: str | None = None) -> None:
        """Set (or change) our record and announce it now; starts the heartbeat on first use."""
        floor = max(record.seq, self.own.seq if self.own else 0)
        self.own = renewed(replace(record, seq=floor), self.config.ttl)
        self._accept_own()
        if self._mdns is not None and mdns_address is not None:
            # registering takes zeroconf ~1.2 s (its probing); do not make the node wait for it
            self._spawn(self._mdns.announce(record.node_id, mdns_address, record.config_hash))
        await self.push_all(self._targets())
        if self._heartbeat is None:
            self._heartbeat = asyncio.ensure_future(self._beat())

    def _accept_own(self) -> None:
        signed = sign_record(self.own, self.identity.key)
        self.registry.offer(signed)
        self.changed.set()

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat * self._rng.uniform(0.9, 1.1))
            try:
                self.own = renewed(self.own, self.config.ttl, **self.stats())
                self._accept_own()
                self.registry.expire()
                await self.push_all(self._targets())
            except Exception:  # one bad round must not end membership
                log.exception("heartbeat failed")

    async def leave(self) -> None:
        """Announce OFFLINE to every known peer at once (used on shutdown)."""
        if self.own is None:
            return
        self.own = renewed(self.own, self.config.ttl, state=NodeState.OFFLINE)
        self._accept_own()
        targets = {r.address for r in self.registry.live() if r.node_id != self.own.node_id} | self.contacts
        await self.push_all(targets - set(self.own.addresses))

    # -- gossip -----------------------------------------------------------------------------------
    def _targets(self) -> set[str]:
        own_addresses = set(self.own.addresses) if self.own else set()
        peers = [r.address for r in self.registry.live()]
        return gossip_targets(peers, self.config.bootstrap, self.config.fanout, own_addresses, self._rng)

    def handle(self, request: pb.GossipRequest) -> pb.GossipReply:
        """The servicer's side of an exchange: merge theirs, answer with ours."""
        key = self.security.swarm_key
        accepted, problems = self.registry.offer_many(codec.decode_records(request.records, key))
        self.take_strikes(request.strikes)
        for problem in problems:
            log.debug("dropped a gossiped record: %s", problem)
        if accepted:
            self.changed.set()
        return pb.GossipReply(records=codec.encode_records(self.registry.signed(), key),
                              strikes=codec.encode_records(self.strikes.signed(), key))

    async def exchange(self, address: str, push: bool = True) -> bool:
        channel = self._channels.get(address)
        if channel is None:
            await self.security.prefetch(address)
            channel = self._channels[address] = self.security.channel(address)
        key = self.security.swarm_key
        records = codec.encode_records(self.registry.signed(), key) if push else []
        strikes = codec.encode_records(self.strikes.signed(), key) if push else []
        request = pb.GossipRequest(records=records, strikes=strikes)
        try:
            reply = await pb_grpc.PotluckStub(channel).Gossip(request, timeout=self.config.gossip_timeout)
        except grpc.aio.AioRpcError as error:
            log.debug("gossip with %s failed: %s", address, error.code())
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                self.refused.add(address)  # a private swarm's node, and we lack (or have another) key
            return False
        self.bytes_sent += request.ByteSize()
        self.bytes_received += reply.ByteSize()
        accepted, problems = self.registry.offer_many(codec.decode_records(reply.records, key))
        self.take_strikes(reply.strikes)
        for problem in problems:
            log.debug("dropped a record from %s: %s", address, problem)
        if accepted:
            self.changed.set()
        return True

    async def push_all(self, addresses) -> None:
        await asyncio.gather(*(self.exchange(a, push=True) for a in addresses))

    async def pull_all(self) -> None:
        """Pull from the bootstrap nodes, every contact found by mDNS, and a few known live peers
        (so a swarm stays reachable when the bootstrap nodes are gone)."""
        own = set(self.own.addresses) if self.own else set()
        peers = [r.address for r in self.registry.live() if r.address not in own]
        targets = set(self.contacts) | set(self._rng.sample(peers, min(self.config.fanout, len(peers))))
        await asyncio.gather(*(self.exchange(a, push=self.own is not None) for a in targets - own))

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

    def live(self, config_hash: str | None = None) -> list[PeerRecord]:
        return self.registry.live(model=config_hash)

    def signed_records(self) -> list[SignedRecord]:
        return self.registry.signed()
