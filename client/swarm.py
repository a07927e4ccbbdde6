"""The client's view of the swarm: peers, their Info, the route, sessions and stateless passes.

Synchronous methods (for `generate`) run the async work on a private loop thread."""

from __future__ import annotations

import asyncio
import logging

import torch

from client.config import ClientConfig
from client.routing import Hop, MissingLayersError, PeerInfo, missing_spans, plan_route
from client.session import InferenceSession
from client.transport import LoopThread, Peer, PeerError
from node.rpc import codec
from node.rpc.generated import potluck_pb2 as pb

log = logging.getLogger(__name__)


class SwarmClient:
    def __init__(self, config: ClientConfig, num_layers: int, hidden_size: int, config_hash: str):
        if not config.peers:
            raise ValueError("no peers given: pass peers=['HOST:PORT', ...] (or --peers)")
        self.config = config
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.config_hash = config_hash
        self._loop = LoopThread()
        self._peers: dict[str, Peer] = self._loop.run(self._connect(config.peers))
        self.infos: list[PeerInfo] = []

    @staticmethod
    async def _connect(addresses) -> dict[str, Peer]:
        return {address: Peer(address) for address in addresses}

    # -- peers and route --------------------------------------------------------------------------
    def refresh(self) -> list[PeerInfo]:
        """Ask every peer for its Info; keep those serving this model."""
        self.infos = self._loop.run(self._gather_infos())
        return self.infos

    async def _gather_infos(self) -> list[PeerInfo]:
        replies = await asyncio.gather(
            *(peer.info(self.config.connect_timeout) for peer in self._peers.values()), return_exceptions=True
        )
        infos, problems = [], []
        for peer, reply in zip(self._peers.values(), replies):
            if isinstance(reply, BaseException):
                problems.append(str(reply))
            elif reply.config_hash != self.config_hash or reply.num_layers != self.num_layers:
                problems.append(
                    f"peer {peer.address} serves another model ({reply.model_id}, config {reply.config_hash}; "
                    f"expected config {self.config_hash})"
                )
            else:
                infos.append(reply)
        for problem in problems:
            log.warning("%s", problem)
        if not infos and problems:
            raise PeerError(",".join(self._peers), "no usable peer: " + "; ".join(problems))
        self._problems = problems
        return infos

    def route(self) -> list[Hop]:
        if not self.infos:
            self.refresh()
        try:
            return plan_route(self.infos, self.num_layers)
        except MissingLayersError as error:
            problems = getattr(self, "_problems", [])
            if problems:
                error.args = (f"{error.args[0]} (unusable peers: {'; '.join(problems)})",)
            raise

    def missing_layers(self) -> list[tuple[int, int]]:
        return missing_spans(self.infos, self.num_layers)

    # -- sessions ---------------------------------------------------------------------------------
    def open_session(self, max_length: int) -> "SyncSession":
        route = self.route()
        limit = min(hop.peer.max_length for hop in route)
        if max_length > limit:
            raise ValueError(f"max_length {max_length} exceeds what the route's nodes accept ({limit})")
        session = InferenceSession(
            self._peers, route, max_length, self.config.wire_dtype, self.config.step_timeout, self.config.session_timeout
        )
        return SyncSession(session, self._loop)

    def forward(self, hidden: torch.Tensor, position_ids=None, attention_mask=None) -> torch.Tensor:
        """A stateless pass of a whole sequence through every layer (no cache kept on nodes)."""
        return self._loop.run(self._forward(self.route(), hidden, position_ids, attention_mask))

    async def _forward(self, route: list[Hop], hidden, position_ids, attention_mask) -> torch.Tensor:
        import grpc

        wire = codec.WIRE_DTYPES[self.config.wire_dtype]
        message = codec.encode_tensor(hidden, wire)
        for hop in route:
            request = pb.ForwardRequest(start=hop.start, end=hop.end, hidden=message, wire_dtype=self.config.wire_dtype)
            if position_ids is not None:
                request.position_ids.CopyFrom(codec.encode_tensor(position_ids.to(torch.int64)))
            if attention_mask is not None:
                request.attention_mask.CopyFrom(codec.encode_tensor(attention_mask.to(torch.int64)))
            try:
                reply = await self._peers[hop.peer.address].stub.Forward(request, timeout=self.config.step_timeout)
            except grpc.aio.AioRpcError as error:
                raise PeerError.from_rpc(hop.peer.address, error) from None
            message = reply.hidden
        return codec.decode_tensor(message, "hidden").clone()

    def close(self) -> None:
        if self._loop.loop.is_closed():
            return
        try:
            self._loop.run(self._close_peers(), timeout=5)
        finally:
            self._loop.close()

    async def _close_peers(self) -> None:
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
