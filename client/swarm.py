"""The client's view of the swarm: peers, the route, sessions and stateless passes.

Peers come either from an explicit list (each asked for its Info) or from discovery
(signed records pulled from bootstrap nodes and mDNS). Synchronous methods (for
`generate`) run the async work on a private loop thread."""

from __future__ import annotations

import asyncio
import logging
import random
import time

import grpc
import torch

from client.config import ClientConfig
from client.routing import Hop, MissingLayersError, PeerInfo, missing_spans, plan_route
from client.session import InferenceSession
from client.transport import LoopThread, Peer, PeerError
from node.rpc import codec
from node.rpc.generated import potluck_pb2 as pb
from node.swarm.membership import Membership, SwarmConfig
from node.swarm.records import NodeState, PeerRecord

log = logging.getLogger(__name__)


def info_from_record(record: PeerRecord) -> PeerInfo:
    return PeerInfo(
        address=record.address, start=record.start, end=record.end, model_id=record.model_id,
        config_hash=record.config_hash, num_layers=record.num_layers, dtype=record.dtype, device=record.device,
        max_length=record.max_length, free_cache_tokens=record.free_cache_tokens, node_id=record.node_id,
        throughput=record.throughput, load=record.load,
    )


class SwarmClient:
    def __init__(self, config: ClientConfig, num_layers: int, hidden_size: int, config_hash: str):
        self.config = config
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.config_hash = config_hash
        self._loop = LoopThread()
        self._peers: dict[str, Peer] = {}
        self._problems: list[str] = []
        self.infos: list[PeerInfo] = []
        self.rtts: dict[str, float] = {}
        self._rng = random.Random()
        self.membership: Membership | None = None
        if not config.peers:
            swarm = SwarmConfig(bootstrap=config.bootstrap, mdns=config.mdns, mdns_interface=config.mdns_interface)
            self.membership = Membership(swarm)
            self._loop.run(self.membership.start())

    def _peer(self, address: str) -> Peer:
        if address not in self._peers:
            self._peers[address] = Peer(address)  # called on the loop thread
        return self._peers[address]

    # -- peers and route --------------------------------------------------------------------------
    def refresh(self) -> list[PeerInfo]:
        """Find the peers serving this model now (Info calls, or discovery), with their RTTs."""
        self.infos = self._loop.run(self._refresh())
        return self.infos

    async def _refresh(self) -> list[PeerInfo]:
        if self.membership is None:
            return await self._from_info(list(self.config.peers))
        covered = lambda: not missing_spans(self._candidates(), self.num_layers)  # noqa: E731
        await self.membership.wait_for(covered, self.config.discovery_timeout)
        candidates = self._candidates()
        if not candidates:
            known = self.membership.live()
            other = f" ({len(known)} nodes serve other models)" if known else ""
            how = ", ".join(filter(None, ["mDNS" if self.config.mdns else "", *self.config.bootstrap]))
            self._problems = [f"no node serving this model was found through {how}{other}"]
        await self._measure_rtts(candidates)
        return candidates

    def _candidates(self) -> list[PeerInfo]:
        return [info_from_record(r) for r in self.membership.live(self.config_hash) if r.state == NodeState.ONLINE]

    async def _measure_rtts(self, infos: list[PeerInfo]) -> None:
        async def ping(info: PeerInfo) -> None:
            started = time.perf_counter()
            try:
                await self._peer(info.address).info(self.config.connect_timeout)
            except PeerError:
                return
            self.rtts[info.address] = time.perf_counter() - started

        await asyncio.gather(*(ping(info) for info in infos if info.address not in self.rtts))

    async def _from_info(self, addresses: list[str]) -> list[PeerInfo]:
        async def timed(address: str):
            started = time.perf_counter()
            reply = await self._peer(address).info(self.config.connect_timeout)
            self.rtts[address] = time.perf_counter() - started
            return reply

        replies = await asyncio.gather(*(timed(a) for a in addresses), return_exceptions=True)
        infos, problems = [], []
        for address, reply in zip(addresses, replies):
            if isinstance(reply, BaseException):
                problems.append(str(reply))
            elif reply.config_hash != self.config_hash or reply.num_layers != self.num_layers:
                problems.append(
                    f"peer {address} serves another model ({reply.model_id}, config {reply.config_hash}; "
                    f"expected config {self.config_hash})"
                )
            else:
                infos.append(reply)
        for problem in problems:
            log.warning("%s", problem)
        if not infos and problems:
            raise PeerError(",".join(addresses), "no usable peer: " + "; ".join(problems))
        self._problems = problems
        return infos

    def route(self, refresh: bool = False) -> list[Hop]:
        """The cheapest chain now (RTT + compute from published throughput + load)."""
        if refresh or not self.infos:
            self.refresh()
        try:
            return plan_route(self.infos, self.num_layers, rtts=self.rtts, rng=self._rng)
        except MissingLayersError as error:
            if self._problems:
                error.args = (f"{error.args[0]} ({'; '.join(self._problems)})",)
            raise

    # -- sessions ---------------------------------------------------------------------------------
    def open_session(self, max_length: int) -> "SyncSession":
        route = self.route(refresh=self.membership is not None)
        limit = min(hop.peer.max_length for hop in route)
        if max_length > limit:
            raise ValueError(f"max_length {max_length} exceeds what the route's nodes accept ({limit})")
        peers = self._loop.run(self._peers_for(route))
        session = InferenceSession(
            peers, route, max_length, self.config.wire_dtype, self.config.step_timeout, self.config.session_timeout
        )
        return SyncSession(session, self._loop)

    async def _peers_for(self, route: list[Hop]) -> dict[str, Peer]:
        return {hop.peer.address: self._peer(hop.peer.address) for hop in route}

    def forward(self, hidden: torch.Tensor, position_ids=None, attention_mask=None) -> torch.Tensor:
        """A stateless pass of a whole sequence through every layer (no cache kept on nodes)."""
        return self._loop.run(self._forward(self.route(), hidden, position_ids, attention_mask))

    async def _forward(self, route: list[Hop], hidden, position_ids, attention_mask) -> torch.Tensor:
        wire = codec.WIRE_DTYPES[self.config.wire_dtype]
        message = codec.encode_tensor(hidden, wire)
        for hop in route:
            request = pb.ForwardRequest(start=hop.start, end=hop.end, hidden=message, wire_dtype=self.config.wire_dtype)
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
        return self._session.route

    def step(self, hidden: torch.Tensor, position_ids=None, attention_mask=None) -> torch.Tensor:
        return self._loop.run(self._session.step(hidden, position_ids, attention_mask))

    def close(self) -> None:
        self._loop.run(self._session.close())

    def __enter__(self) -> "SyncSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
