"""Discovery for the public internet: signed records in the hivemind DHT (Kademlia over libp2p).

The same small interface as gossip `Membership` (start, publish, live, wait_for, pull_all, leave, close,
handle), so that nodes and clients use either. What goes into the DHT is ours: each record is the node's
signed record (common/swarm/records.py), stored under one key per (model config hash, block) that the node
serves, with the node id as subkey and the record's expiry as the entry's. Readers verify every record as
gossip does: DHT entries are untrusted data, anyone may write any key, and the storing peers refuse an entry
that is not its subkey owner's signed record (common/swarm/dht_validation.py). One more key, `potluck/models`, holds
one record per config hash, so that a reader that watches no model (`potluck status`) can find the models.

hivemind is an optional dependency (the `dht` extra): imported only when a DHT backend starts."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

from common.swarm.identity import Identity
from common.swarm.records import MAX_TTL, NodeState, PeerRecord, Registry, SignedRecord, renewed, sign_record
from common.swarm.strikes import StrikeBook
from common.wire import record_codec as codec
from common.wire.generated import potluck_pb2 as pb
from common.wire.security import PLAINTEXT, Security

log = logging.getLogger(__name__)

MODELS_KEY = "potluck/models"  # subkey: config hash; value: one signed record of a node serving that model
MAX_BLOCKS = 1024  # keys one model may ask readers to fetch (a record's num_layers is untrusted data)
MISSING = "the DHT backend needs hivemind: pip install 'potluck[dht]' (hivemind==1.1.12), or use --discovery gossip"


class DhtUnavailable(RuntimeError):
    """hivemind is not installed, or its DHT did not start; the message says which, in one line."""


@dataclass(frozen=True)
class DhtConfig:
    initial_peers: tuple[str, ...] = ()  # multiaddrs of running DHT peers; empty = start a new DHT (the first peer)
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)  # where this peer listens (libp2p multiaddrs)
    announce_maddrs: tuple[str, ...] = ()  # the multiaddrs others should dial, if not what it listens on
    client_mode: bool = False  # a peer nobody can dial (clients, nodes behind NAT): asks, never stores for others
    refresh: float = 30.0  # seconds between re-stores of this node's keys (and re-reads of its model's)
    ttl: float = 90.0  # lifetime of a stored record; a node that stops re-storing is gone after it
    timeout: float = 15.0  # seconds one DHT store or get may take
    start_timeout: float = 60.0  # seconds the DHT process may take to join

    def __post_init__(self) -> None:
        if not 0 < self.refresh < self.ttl <= MAX_TTL:
            raise ValueError(f"need 0 < DHT refresh < DHT ttl <= {MAX_TTL:g}")


def block_key(config_hash: str, block: int) -> str:
    return f"potluck/{config_hash}/{block}"


def _load_hivemind():
    try:
        import hivemind
    except ImportError:
        raise DhtUnavailable(MISSING) from None
    return hivemind


# -- run inside the DHT process (hivemind pickles these by reference; they must stay module-level) ------------
async def _store_many(_dht, node, keys: list[str], subkeys: list[str], value: bytes, expiration: float) -> int:
    stored = await node.store_many(keys, [value] * len(keys), expiration, subkeys=subkeys)
    return sum(bool(ok) for ok in stored.values())


async def _get_many(_dht, node, keys: list[str]) -> dict[str, list[bytes]]:
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))  # latest: newest of every subkey
    out: dict[str, list[bytes]] = {}
    for key, entry in found.items():
        value = getattr(entry, "value", None)
        if isinstance(value, dict) or hasattr(value, "items"):
            out[key] = [v.value for v in value.values() if isinstance(getattr(v, "value", None), bytes)]
    return out


class DhtDiscovery:
    """Swarm membership through the hivemind DHT. `watch` maps the config hashes to read (the node's or the
    client's model) to their layer counts; with none, models are found through MODELS_KEY."""

    def __init__(self, config: DhtConfig, identity: Identity | None = None,
                 stats: Callable[[], dict] | None = None, security: Security = PLAINTEXT,
                 watch: dict[str, int] | None = None, rng: random.Random | None = None):
        self.config = config
        self.identity = identity
        self.stats = stats or dict
        self.security = security
        self.watch = dict(watch or {})
        self.registry = Registry()
        self.strikes = StrikeBook()  # strikes reach nodes by Gossip calls from clients (client/swarm.py)
        self.contacts: set[str] = set()  # no gRPC contacts: kept for the users of Membership
        self.refused: set[str] = set()
        self.own: PeerRecord | None = None
        self.bytes_sent = 0  # record bytes handed to the DHT to store / received from it (libp2p framing excluded)
        self.bytes_received = 0
        self.changed = asyncio.Event()
        self.dht = None  # hivemind.DHT, once started
        self._rng = rng or random.Random()
        self._heartbeat: asyncio.Task | None = None
        self._stored_blocks: set[int] = set()

    # -- life cycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        hivemind = _load_hivemind()
        config = self.config
        from common.swarm.dht_validation import RecordOwnerValidator

        options = dict(initial_peers=list(config.initial_peers), host_maddrs=list(config.host_maddrs),
                       client_mode=config.client_mode, start=True, await_ready=False,
                       record_validators=[RecordOwnerValidator(self.security.swarm_key)])
        if config.announce_maddrs:
            options["announce_maddrs"] = list(config.announce_maddrs)
        try:
            self.dht = await asyncio.to_thread(hivemind.DHT, **options)
            await asyncio.to_thread(self.dht.wait_until_ready, config.start_timeout)
        except Exception as error:
            await self.close()
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DhtUnavailable(f"the DHT did not start (initial peers {', '.join(config.initial_peers) or 'none'})"
                                 f": {first}") from None
        await self.pull_all()

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        dht, self.dht = self.dht, None
        if dht is not None:
            await asyncio.to_thread(dht.shutdown)

    def visible_maddrs(self) -> list[str]:
        """The multiaddrs other peers can join this DHT through (--initial-peers)."""
        return [str(m) for m in self.dht.get_visible_maddrs()] if self.dht is not None else []

    async def _call(self, coro):
        """Run `coro(dht, node)` in the DHT process without blocking the loop; at most config.timeout."""
        if self.dht is None:
            raise DhtUnavailable("the DHT is not running")
        future = self.dht.run_coroutine(coro, return_future=True)
        try:
            await asyncio.wait_for(future, self.config.timeout)
        except asyncio.TimeoutError:
            future.cancel()
            raise
        return future.result()

    # -- own record -------------------------------------------------------------------------------
    async def publish(self, record: PeerRecord, mdns_address: str | None = None) -> None:
        """Set (or change) our record and store it now; starts the re-stores on first use."""
        floor = max(record.seq, self.own.seq if self.own else 0)
        self.own = renewed(replace(record, seq=floor), self.config.ttl)
        self.watch.setdefault(record.config_hash, record.num_layers)
        await self._store_own()
        if self._heartbeat is None:
            self._heartbeat = asyncio.ensure_future(self._beat())

    async def _store_own(self) -> None:
        own = self.own
        signed = sign_record(own, self.identity.key)
        self.registry.offer(signed)
        self.changed.set()
        value = codec.encode_records([signed], self.security.swarm_key)[0].SerializeToString()
        blocks = set(range(own.start, own.end))
        # blocks left by a move get the new record too, so readers see the move before the old entry expires
        keys = [block_key(own.config_hash, b) for b in sorted(blocks | self._stored_blocks)]
        subkeys = [own.node_id] * len(keys)
        stored = await self._call(partial(_store_many, keys=[*keys, MODELS_KEY], subkeys=[*subkeys, own.config_hash],
                                          value=value, expiration=own.expires_at))
        self._stored_blocks = blocks
        self.bytes_sent += len(value) * (len(keys) + 1)
        if not stored:
            log.warning("the DHT took none of this node's %d keys", len(keys) + 1)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh * self._rng.uniform(0.9, 1.1))
            try:
                self.own = renewed(self.own, self.config.ttl, **self.stats())
                await self._store_own()
                self.registry.expire()
                await self.pull_all()
            except Exception:  # one bad round must not end membership
                log.exception("DHT re-store failed")

    async def leave(self) -> None:
        """Store an OFFLINE record under every key of our span (used on shutdown)."""
        if self.own is None or self.dht is None:
            return
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        self.own = renewed(self.own, self.config.ttl, state=NodeState.OFFLINE)
        await self._store_own()

    # -- reading ----------------------------------------------------------------------------------
    async def pull_all(self) -> None:
        """Read the watched models' block keys in one batch (first the models index, if nothing is watched)."""
        if self.dht is None:
            return
        watch = dict(self.watch)
        if not watch:
            for record in self._offer(await self._fetch([MODELS_KEY])):
                if 0 < record.num_layers <= MAX_BLOCKS:
                    watch[record.config_hash] = record.num_layers
        keys = [block_key(chash, block) for chash, layers in watch.items() for block in range(min(layers, MAX_BLOCKS))]
        if keys:
            self._offer(await self._fetch(keys))

    async def _fetch(self, keys: list[str]) -> list[SignedRecord]:
        try:
            found = await self._call(partial(_get_many, keys=keys))
        except (asyncio.TimeoutError, DhtUnavailable) as error:
            log.debug("DHT read of %d keys failed: %r", len(keys), error)
            return []
        batch, messages = [], []
        for values in found.values():
            for value in values:
                self.bytes_received += len(value)
                message = pb.SignedRecord()
                try:
                    message.ParseFromString(value)
                except Exception:  # protobuf raises DecodeError (and others on garbage); anyone may write a key
                    continue
                messages.append(message)
        batch = codec.decode_records(messages, self.security.swarm_key)
        return list({(s.public_key, s.payload): s for s in batch}.values())  # a record sits under each of its blocks

    def _offer(self, batch: list[SignedRecord]) -> list[PeerRecord]:
        accepted, problems = self.registry.offer_many(batch)
        for problem in problems:
            log.debug("dropped a record read from the DHT: %s", problem)
        if accepted:
            self.changed.set()
        keys = {s.public_key for s in batch}
        return [record for record, signed in self.registry.records.values() if signed.public_key in keys]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until `predicate()` holds, re-reading the DHT about once a second, or time out."""
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

    def live(self, config_hash: str | None = None) -> list[PeerRecord]:
        return self.registry.live(model=config_hash)

    def signed_records(self) -> list[SignedRecord]:
        return self.registry.signed()

    # -- the Gossip call (node/rpc/servicer.py): clients hand strikes to nodes, and may pull records ----------
    def handle(self, request: pb.GossipRequest) -> pb.GossipReply:
        self.take_strikes(request.strikes)
        key = self.security.swarm_key
        return pb.GossipReply(records=codec.encode_records(self.registry.signed(), key),
                              strikes=codec.encode_records(self.strikes.signed(), key))

    def take_strikes(self, messages) -> int:
        batch = messages[: 2 * self.strikes.limit]
        accepted, problems = self.strikes.offer_many(codec.decode_records(batch, self.security.swarm_key))
        for problem in problems:
            log.debug("dropped a strike: %s", problem)
        return accepted


def tcp_maddr(host: str, port: int) -> str:
    """The libp2p multiaddr of HOST and a TCP port (IPv6 hosts contain ':')."""
    host = host.strip("[]") or "0.0.0.0"
    if host == "localhost":
        host = "127.0.0.1"
    return f"/ip6/{host}/tcp/{port}" if ":" in host else f"/ip4/{host}/tcp/{port}"


def make_discovery(swarm, dht: DhtConfig | None, identity: Identity | None = None,
                   stats: Callable[[], dict] | None = None, security: Security = PLAINTEXT,
                   watch: dict[str, int] | None = None):
    """Gossip `Membership` for `swarm` (common.swarm.membership.SwarmConfig), or the DHT when `dht` is given."""
    if dht is not None:
        return DhtDiscovery(dht, identity, stats=stats, security=security, watch=watch)
    from common.swarm.membership import Membership

    return Membership(swarm, identity, stats=stats, security=security)
