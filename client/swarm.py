"""The client's view of the swarm: peers, the route, sessions and stateless passes.

Peers come either from an explicit list (each asked for its Info) or from discovery
(signed records pulled from bootstrap nodes and mDNS). Synchronous methods (for
`generate`) run the async work on a private loop thread."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import replace

import grpc
import torch

from client.bans import BanList
from client.config import ClientConfig
from client.routing import (
    Hop,
    MissingLayersError,
    PeerInfo,
    RouteCosts,
    accepts_numerics,
    accepts_quant,
    hop_cost,
    missing_spans,
    plan_route,
    smoothed,
    weights_kind,
)
from client.session import InferenceSession
from client.training import TrainStats, remote_forward
from client.transport import LoopThread, Peer, PeerError
from client.verify import Verifier
from client.weights import same_weights
from common.swarm.dht import DhtDiscovery, make_discovery
from common.swarm.identity import Identity, ephemeral_identity
from common.swarm.membership import Membership, SwarmConfig
from common.swarm.records import NodeState, PeerRecord
from common.swarm.strikes import StrikeBook, make_strike, sign_strike
from common.wire import codec
from common.wire.generated import potluck_pb2 as pb

log = logging.getLogger(__name__)

VET_ROUNDS = 8      # rounds of pings before a route is planned over what answered so far
PROBE_PER_SPAN = 2  # runners-up pinged per hop of the planned chain, each round


def address_host(address: str) -> str:
    """The host of "host:port" or "[v6]:port" (the address itself if it has no port)."""
    if address.startswith("["):
        return address[1 : address.find("]")] if "]" in address else address
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def info_from_record(record: PeerRecord) -> PeerInfo:
    return PeerInfo(
        address=record.address, start=record.start, end=record.end, model_id=record.model_id,
        config_hash=record.config_hash, num_layers=record.num_layers, dtype=record.dtype, device=record.device,
        quant=record.quant, numerics=record.numerics,
        max_length=record.max_length, free_cache_tokens=record.free_cache_tokens, node_id=record.node_id,
        throughput=record.throughput, prefill_throughput=record.prefill_throughput, load=record.load,
        state=record.state.value, started_at=record.started_at, adapters=record.adapters,
    )


class SwarmClient:
    def __init__(self, config: ClientConfig, num_layers: int, hidden_size: int, config_hash: str, weights: str = ""):
        self.config = config
        self.weights = weights  # the model's weights fingerprint (client/weights.py); "" = the swarm's majority
        self._weights_note = ""  # why nodes of this config were refused for their weights, as of the last refresh
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.config_hash = config_hash
        self._loop = LoopThread()
        self._peers: dict[str, Peer] = {}
        self._problems: list[str] = []
        self.infos: list[PeerInfo] = []
        self.rtts: dict[str, float] = {}
        self._rng = random.Random()
        self.bans = BanList(base=config.ban_seconds)  # keys: addresses, "id:" node ids, "host:" address hosts
        # Seconds per layer per token this client measured of a peer (address): routing believes a stranger's
        # advertised speed only down to RouteCosts.unproven_layer_seconds until it is in here.
        self.measured: dict[str, float] = {}
        self.membership: Membership | DhtDiscovery | None = None
        # every call proves a throwaway client identity: nodes count their per-peer quotas by it within a ceiling
        # per address, so clients behind one NAT each keep a share (common/wire/caller.py, node/runtime/quota.py)
        self.security = replace(config.security(), caller=ephemeral_identity().key)
        # Nodes this client caught returning wrong activations (client/verify.py) are never used again;
        # strikes (clients' signed reports of such nodes, pulled with gossip) make routing avoid nodes.
        self.liars: set[str] = set()  # addresses and node ids
        self._identity: Identity | None = None  # signs this client's strikes (made on first use)
        self.train_stats = TrainStats()  # calls and bytes of differentiable passes (client/training.py)
        if not config.peers:
            swarm = SwarmConfig(bootstrap=config.bootstrap, mdns=config.mdns, mdns_interface=config.mdns_interface,
                                model=config_hash or "")
            self.membership = make_discovery(swarm, config.dht_config(), security=self.security,
                                             watch={config_hash: num_layers})  # the DHT: only this model's keys
            try:
                self._loop.run(self.membership.start())
            except BaseException:
                self._loop.close()
                raise
        self.strikes = self.membership.strikes if self.membership is not None else StrikeBook()

    def _peer(self, address: str) -> Peer:
        if address not in self._peers:
            self._peers[address] = Peer(address, self.security)  # called on the loop thread
        return self._peers[address]

    peer = _peer  # the Router interface of client.session

    async def _dial(self, address: str) -> Peer:
        """The peer for `address`, its certificate read off the loop first (auto TLS) when it is new."""
        if address not in self._peers:
            await self.security.prefetch(address)
        return self._peer(address)

    def deadline(self, hop: Hop, tokens: int) -> float:
        """How long one step of `tokens` tokens may take on `hop`: factor x (RTT + expected compute), with a floor."""
        peer, config = hop.peer, self.config
        share = (hop.end - hop.start) / max(peer.end - peer.start, 1)
        speed = peer.prefill_throughput if tokens > 1 and peer.prefill_throughput > 0 else peer.throughput
        if speed <= 0:
            return max(config.step_timeout / 10, config.deadline_floor)  # unknown speed: be patient
        expected = self.rtts.get(peer.address, 0.0) + share * tokens / speed
        return max(config.deadline_floor, config.deadline_factor * expected)

    def observe(self, hop: Hop, seconds: float, tokens: int) -> None:
        """`hop` took `seconds` for a step of `tokens` tokens, as this client saw it (session.py: a driven step from
        send to result; a pushed step's hop j from hop j-1's result to its own). Decode steps (one token) update
        `measured`, an EWMA of seconds per layer per token with the hop's RTT taken off: routing then believes that
        instead of the node's advertised throughput. Prefill steps are left out (their per-token cost is another)."""
        if tokens != 1 or hop.end <= hop.start:
            return
        address = hop.peer.address
        sample = max(seconds - self.rtts.get(address, 0.0), 0.0) / (hop.end - hop.start)
        self.measured[address] = smoothed(self.measured.get(address), sample)

    async def reroute(self, start: int, end: int, failed: str) -> list[Hop]:
        """Rule out `failed` (its address, node id and host), then the cheapest vetted chain over `[start, end)`
        without it; wait for one if none exists."""
        self._fail(failed, next((i.node_id for i in self.infos if i.address == failed), ""))
        give_up = time.monotonic() + self.config.missing_wait
        while True:
            try:
                infos = await self._refresh(wait=False)
            except PeerError:
                infos = []
            self.infos = infos
            try:
                return await self._vetted_route(self._trusted(infos), start, end, forgive=False)
            except MissingLayersError as error:
                missing = error
            try:  # nobody else covers those layers: forgive banned nodes, if they still answer
                banned = self.bans.banned(time.monotonic())
                route = self._plan(self._trusted(infos), start, end)
                if await self._all_answer([hop.peer.address for hop in route if hop.peer.address in banned]):
                    for hop in route:
                        self._forgive(hop.peer)
                    return route
            except MissingLayersError:
                pass
            if time.monotonic() >= give_up:
                self._adapter_problem(missing)
                missing.args = (f"{missing.args[0]} (waited {self.config.missing_wait:.0f}s for a replacement)",)
                raise missing
            await asyncio.sleep(0.25)

    # -- ruling out failed peers and vetting strangers ---------------------------------------------
    def _fail(self, address: str, node_id: str = "") -> None:
        """`address` failed this client: ban it, its node id and its host (one liar's many identities share
        hosts; honest neighbours on that host stay usable when nobody else serves their layers: `_usable`)."""
        now = time.monotonic()
        for key in (address, f"id:{node_id}" if node_id else "", f"host:{address_host(address)}"):
            if key:
                self.bans.ban(key, now)

    def _forgive(self, peer: PeerInfo) -> None:
        for key in (peer.address, f"id:{peer.node_id}", f"host:{address_host(peer.address)}"):
            self.bans.forgive(key)

    def _usable(self, infos: list[PeerInfo], start: int, end: int) -> list[PeerInfo]:
        """`infos` less the banned: by address, node id and host if the rest still covers `[start, end)`, else by
        address and node id only (a host's other nodes forgiven), else MissingLayersError."""
        banned = self.bans.banned(time.monotonic())
        strict = [i for i in infos if i.address not in banned and f"id:{i.node_id}" not in banned]
        for usable in ([i for i in strict if f"host:{address_host(i.address)}" not in banned], strict):
            if not [gap for gap in missing_spans(usable, self.num_layers) if gap[0] < end and gap[1] > start]:
                return usable
        plan_route(strict, self.num_layers, start, end)  # raises MissingLayersError naming the gap
        return strict

    def _plan(self, infos: list[PeerInfo], start: int = 0, end: int | None = None) -> list[Hop]:
        return plan_route(infos, self.num_layers, start, end, rtts=self.rtts, rng=self._rng,
                          strikes=self._strike_counts(), measured=self.measured)

    async def _vetted_route(self, infos: list[PeerInfo], start: int = 0, end: int | None = None,
                            forgive: bool = True) -> list[Hop]:
        """The cheapest chain whose every hop answered a ping (Info: alive, this model, ONLINE; its RTT measured).

        Candidates are ranked from their records, not by calling every node: each round pings the planned
        chain's unpinged hops and the next `config.probe_per_span` cheapest unpinged peers of each of their
        spans (so a lie costs one round, not one per identity); a peer that fails is ruled out (`_fail`) and the
        chain is planned again. With `forgive`, banned peers are used when nobody else covers some layers."""
        end = self.num_layers if end is None else end
        for _ in range(VET_ROUNDS):
            try:
                usable = self._usable(infos, start, end)
            except MissingLayersError:
                if not forgive:
                    raise
                usable = infos  # forgive: banned nodes are better than no route (liars are not: _trusted)
            route = self._plan(usable, start, end)
            unpinged = [hop.peer for hop in route if hop.peer.address not in self.rtts]
            if not unpinged:
                return route
            await self._ping(unpinged + self._runners_up(usable, route))
        return self._plan(self._usable(infos, start, end), start, end)

    def _runners_up(self, infos: list[PeerInfo], route: list[Hop]) -> list[PeerInfo]:
        """The next cheapest unpinged peers covering each hop of `route` (by their records, capped speeds)."""
        per_hop = PROBE_PER_SPAN
        chosen, seen = [], {hop.peer.address for hop in route}
        for hop in route:
            covering = [i for i in infos if i.start <= hop.start and hop.end <= i.end and i.address not in seen
                        and i.address not in self.rtts]
            covering.sort(key=lambda i: hop_cost(i, hop.start, hop.end, None, RouteCosts(), 0, self.measured))
            for info in covering[:per_hop]:
                seen.add(info.address)
                chosen.append(info)
        return chosen

    async def _ping(self, infos: list[PeerInfo]) -> None:
        """Info from each, in parallel: RTT measured if alive, serving this model and ONLINE; else ruled out."""
        async def ping(info: PeerInfo) -> None:
            started = time.perf_counter()
            try:
                reply = await (await self._dial(info.address)).info(self.config.connect_timeout)
            except PeerError as error:
                log.info("ruled out %s: %s", info.address, error)
                self._fail(info.address, info.node_id)
                return
            if reply.config_hash != self.config_hash or reply.state != "ONLINE" or (
                    info.node_id and reply.node_id != info.node_id):
                log.info("ruled out %s: not what its record says", info.address)
                self._fail(info.address, info.node_id)
                return
            self.rtts[info.address] = time.perf_counter() - started

        await asyncio.gather(*(ping(info) for info in infos))

    # -- peers and route --------------------------------------------------------------------------
    def refresh(self) -> list[PeerInfo]:
        """Find the peers serving this model now (Info calls, or discovery), with their RTTs."""
        self.infos = self._loop.run(self._refresh())
        return self.infos

    async def _refresh(self, wait: bool = True) -> list[PeerInfo]:
        if self.membership is None:
            pulled = asyncio.ensure_future(self._pull_strikes(self.config.peers))
            try:
                return self._trusted(await self._from_info(list(self.config.peers)))
            finally:
                await pulled
        await self.membership.pull_all()
        if wait:
            covered = lambda: not missing_spans(self._candidates(), self.num_layers)  # noqa: E731
            await self.membership.wait_for(covered, self.config.discovery_timeout)
        candidates = self._candidates()
        self._problems = [self._weights_note] if self._weights_note else []
        if not candidates:
            known = self.membership.live()
            other = f" ({len(known)} nodes serve other models)" if known else ""
            how = ", ".join(filter(None, ["mDNS" if self.config.mdns else "", *self.config.bootstrap]))
            if self.config.uses_dht:
                how = f"the DHT (initial peers {', '.join(self.config.initial_peers)})"
            self._problems = [f"no node serving this model was found through {how}{other}", *self._problems]
        return candidates  # no Info call to every node: route() pings only the chain and its runners-up

    def _candidates(self) -> list[PeerInfo]:
        records = [r for r in self.membership.live(self.config_hash)
                   if r.state == NodeState.ONLINE and accepts_quant(r.quant, self.config.accept_quant)
                   and accepts_numerics(r.numerics, self.config.accept_numerics)]
        if self.config.weights == "match":
            records, self._weights_note = same_weights(records, self.weights, self.config.unfingerprinted)
        return self._trusted([info_from_record(r) for r in records])


    async def _from_info(self, addresses: list[str]) -> list[PeerInfo]:
        async def timed(address: str):
            started = time.perf_counter()
            reply = await (await self._dial(address)).info(self.config.connect_timeout)
            self.rtts[address] = time.perf_counter() - started
            return reply

        replies = await asyncio.gather(*(timed(a) for a in addresses), return_exceptions=True)
        infos, failed = [], []  # failed: PeerErrors, one a peer that cannot be used
        for address, reply in zip(addresses, replies):
            if isinstance(reply, PeerError):
                failed.append(reply)
            elif isinstance(reply, BaseException):
                failed.append(PeerError(address, str(reply)))
            elif reply.config_hash != self.config_hash or reply.num_layers != self.num_layers:
                failed.append(PeerError(address, f"serves another model ({reply.model_id}, config "
                                                 f"{reply.config_hash}; expected config {self.config_hash})"))
            elif reply.state != "ONLINE":
                failed.append(PeerError(address, f"is {reply.state}"))
            elif not accepts_quant(reply.quant, self.config.accept_quant):
                failed.append(PeerError(address, f"serves {reply.quant}-quantised weights; this client accepts "
                                                 f"{self.config.accept_quant} (--accept-quant)"))
            elif not accepts_numerics(reply.numerics, self.config.accept_numerics):
                failed.append(PeerError(address, f"computes in {reply.numerics} numerics; this client accepts "
                                                 f"{self.config.accept_numerics} (--accept-numerics)"))
            else:
                infos.append(reply)
        if not infos and failed:  # said once, by the error; no warnings repeating it first
            if len(failed) == 1:
                raise failed[0]
            raise PeerError(",".join(addresses), "no usable peer: " + "; ".join(map(str, failed)))
        for error in failed:
            log.warning("%s", error)
        self._problems = [str(error) for error in failed]
        return infos

    async def _all_answer(self, addresses: list[str]) -> bool:
        async def answers(address: str) -> bool:
            try:
                info = await (await self._dial(address)).info(
                    min(self.config.deadline_floor, self.config.connect_timeout)
                )
            except PeerError:
                return False
            return info.state == "ONLINE"

        return all(await asyncio.gather(*(answers(a) for a in addresses)))

    def route(self, refresh: bool = False) -> list[Hop]:
        """The cheapest vetted chain now (RTT + compute from measured, else capped published, throughput + load)."""
        if refresh or not self.infos:
            self.refresh()
        try:
            return self._loop.run(self._vetted_route(self._trusted(self.infos)))
        except MissingLayersError as error:
            self._adapter_problem(error)
            if self._problems:
                error.args = (f"{error.args[0]} ({'; '.join(self._problems)})",)
            raise

    # -- sessions ---------------------------------------------------------------------------------
    def open_session(self, max_length: int) -> "SyncSession":
        route = self.route(refresh=True)
        limit = min(hop.peer.max_length for hop in route)
        if max_length > limit:
            raise ValueError(f"max_length {max_length} exceeds what the route's nodes accept ({limit})")
        verifier = None
        if self.config.verify != "off":
            verifier = Verifier(self, self.config.verify, self.config.verify_fraction, self.config.wire_dtype)
        session = InferenceSession(self, route, max_length, self.config.wire_dtype, self.config.session_timeout,
                                   self.config.max_failovers, push=self.config.push, verifier=verifier,
                                   prefill_chunk=self.config.prefill_chunk, adapter=self.config.adapter)
        return SyncSession(session, self._loop)

    # -- verification (client/verify.py) and strikes (common/swarm/strikes.py) ----------------------------
    def _trusted(self, infos: list[PeerInfo]) -> list[PeerInfo]:
        """The peers this client may route through: not caught lying, and serving its adapter (if it names one)."""
        adapter = self.config.adapter
        return [i for i in infos if i.address not in self.liars and i.node_id not in self.liars
                and (adapter is None or adapter in i.adapters)]

    def full_adapters(self) -> list[str]:
        """The LoRA adapters whose nodes (none caught lying) serve every layer, as of the last refresh."""
        honest = [i for i in self.infos if i.address not in self.liars and i.node_id not in self.liars]
        names = sorted({name for info in honest for name in info.adapters})
        return [name for name in names
                if not missing_spans([i for i in honest if name in i.adapters], self.num_layers)]

    def _adapter_problem(self, error: MissingLayersError) -> None:
        """Say in `error` that the missing layers are missing *with this client's adapter*, and where it is served."""
        adapter = self.config.adapter
        if adapter is None:
            return
        serving = sorted({f"{i.address}[{i.start}:{i.end})" for i in self.infos if adapter in i.adapters})
        where = f"nodes serving it: {', '.join(serving)}" if serving else "no node serves it"
        error.args = (f"{error.args[0]} with adapter {adapter!r} ({where})",)

    def _strike_counts(self) -> dict[str, int]:
        return self.strikes.counts(config_hash=self.config_hash)

    async def alternatives(self, start: int, end: int, avoid: set[str], quant: str | None = None) -> list[Hop]:
        """Where a verifier recomputes a hop: the cheapest node serving all of `[start, end)`, else the cheapest
        chain (fewer boundaries: fewer roundings to the wire format, and a culprit to blame), on nodes other
        than `avoid`, none banned or caught lying. Among whole-span nodes, those of `quant`'s `weights_kind` first
        (the same weights and numerics: a tight comparison). MissingLayersError if there is none."""
        banned = self.bans.banned(time.monotonic())
        usable = [i for i in self._trusted(self.infos) if i.address not in avoid and i.address not in banned]
        whole = [i for i in usable if i.start <= start and end <= i.end]
        same = [i for i in whole if quant is not None and weights_kind(i) == quant]
        return self._plan(same or whole or usable, start, end)

    async def convict(self, hop: Hop, reason: str) -> None:
        """`hop`'s node returned wrong activations: never route through it again; report a signed strike to
        the nodes this client knows (they pass it on by gossip)."""
        peer = hop.peer
        if peer.address in self.liars:
            return
        self.liars |= {peer.address, peer.node_id} - {""}
        if self._identity is None:
            self._identity = ephemeral_identity()
        strike = make_strike(peer.node_id, peer.address, self.config_hash, hop.start, hop.end, reason)
        signed = sign_strike(strike, self._identity.key)
        if peer.node_id:
            self.strikes.offer(signed)
        request = pb.GossipRequest(strikes=codec.encode_records([signed], self.security.swarm_key))
        targets = {i.address for i in self.infos} | set(self.config.peers) | set(self.config.bootstrap)
        targets.discard(peer.address)

        async def send(address: str) -> bool:
            try:
                await (await self._dial(address)).stub.Gossip(request, timeout=self.config.deadline_floor)
            except grpc.aio.AioRpcError as error:
                log.debug("could not report the strike to %s: %s", address, error.code())
                return False
            return True

        told = sum(await asyncio.gather(*(send(address) for address in sorted(targets))))
        log.error("node %s (%s) returned wrong activations for layers %d:%d: %s. Banned for this client; "
                  "strike reported to %d of %d nodes", peer.address, peer.node_id[:12] or "id unknown", hop.start,
                  hop.end, reason, told, len(targets))

    async def _pull_strikes(self, addresses) -> None:
        """The strikes the nodes hold (from a gossip exchange with each, sending nothing)."""
        async def pull(address: str) -> None:
            try:
                reply = await (await self._dial(address)).stub.Gossip(pb.GossipRequest(),
                                                                        timeout=self.config.connect_timeout)
            except grpc.aio.AioRpcError:
                return  # an old node, a node of another swarm, or one that is down: Info reports those
            batch = reply.strikes[: 2 * self.strikes.limit]
            self.strikes.offer_many(codec.decode_records(batch, self.security.swarm_key))

        await asyncio.gather(*(pull(address) for address in addresses))

    def forward(self, hidden: torch.Tensor, position_ids=None, attention_mask=None) -> torch.Tensor:
        """A stateless pass of a whole sequence through every layer (no cache kept on nodes)."""
        return self._loop.run(self._forward(self.route(), hidden, position_ids, attention_mask))

    def train_forward(self, hidden: torch.Tensor, position_ids=None, attention_mask=None,
                      prompts: torch.Tensor | None = None) -> torch.Tensor:
        """A stateless pass like `forward`, differentiable w.r.t. `hidden` and the deep `prompts` ([num_layers, batch,
        prompt_tokens, hidden], or None): `backward` calls each hop's node again (client/training.py)."""
        return remote_forward(self, self.route(), hidden, position_ids, attention_mask, prompts)

    async def _forward(self, route: list[Hop], hidden, position_ids, attention_mask) -> torch.Tensor:
        message = codec.encode_hidden(hidden, self.config.wire_dtype)
        for hop in route:
            request = pb.ForwardRequest(start=hop.start, end=hop.end, hidden=message, wire_dtype=self.config.wire_dtype)
            if self.config.adapter is not None:
                request.metadata = codec.pack_metadata({"adapter": self.config.adapter})
            if position_ids is not None:
                request.position_ids.CopyFrom(codec.encode_tensor(position_ids.to(torch.int64)))
            if attention_mask is not None:
                request.attention_mask.CopyFrom(codec.encode_tensor(attention_mask.to(torch.int64)))
            try:
                reply = await self._peer(hop.peer.address).stub.Forward(request, timeout=self.config.step_timeout)
            except grpc.aio.AioRpcError as error:
                raise PeerError.from_rpc(hop.peer.address, error) from None
            message = reply.hidden
        return codec.decode_tensor(message, "hidden").clone()

    def close(self) -> None:
        if self._loop.loop.is_closed():
            return
        try:
            self._loop.run(self._close(), timeout=10)
        finally:
            self._loop.close()

    async def _close(self) -> None:
        if self.membership is not None:
            await self.membership.close()
        await asyncio.gather(*(peer.close() for peer in self._peers.values()), return_exceptions=True)


class SyncSession:
    """A blocking facade over InferenceSession, usable as a context manager."""

    def __init__(self, session: InferenceSession, loop: LoopThread):
        self._session = session
        self._loop = loop

    @property
    def position(self) -> int:
        return self._session.position

    @property
    def max_length(self) -> int:
        return self._session.max_length

    @property
    def route(self) -> list[Hop]:
        """The chain now in use (it changes when a hop fails over)."""
        return [stream.hop for stream in self._session.hops] or self._session.route

    @property
    def events(self):
        """RecoveryEvents: every failover this session went through."""
        return self._session.events

    @property
    def steps(self) -> int:
        """Passes through the chain so far (calls of step; speculative decoding checks several tokens in one)."""
        return self._session.steps

    @property
    def pushed_steps(self) -> int:
        """Steps the nodes forwarded along the whole chain themselves (push), not hop by hop."""
        return self._session.pushed_steps

    @property
    def sent_steps(self) -> list[int]:
        """Steps the client itself wrote to each hop of the current route (replays included)."""
        return [stream.sent_steps for stream in self._session.hops]

    @property
    def verification(self):
        """client.verify.VerifyStats of this session (None with verify="off")."""
        verifier = self._session.verifier
        return verifier.stats if verifier is not None else None

    @property
    def next_convoy(self) -> tuple[int, int] | None:
        """The convoy (id, size) the next pushed step travels in (common/wire/convoy.py); used once."""
        return self._session.next_convoy

    @next_convoy.setter
    def next_convoy(self, convoy: tuple[int, int] | None) -> None:
        self._session.next_convoy = convoy

    @property
    def arrived_convoy(self) -> tuple[int, int] | None:
        """The convoy the last step's output came back in (None: alone, or not pushed)."""
        return self._session.arrived_convoy

    def step(self, hidden: torch.Tensor, position_ids=None, attention_mask=None, prompts=None) -> torch.Tensor:
        return self._loop.run(self._session.step(hidden, position_ids, attention_mask, prompts))

    def rewind(self, position: int) -> None:
        """Forget the tokens from `position` on (InferenceSession.rewind)."""
        self._session.rewind(position)

    def settle(self) -> None:
        """Verify the steps not checked yet (spot mode); VerificationRestart if a node lied in one of them."""
        self._loop.run(self._session.settle())

    def close(self) -> None:
        self._loop.run(self._session.close())

    def __enter__(self) -> "SyncSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
