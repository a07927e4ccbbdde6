"""An inference session over a chain of hops: one open bidirectional stream per hop.

Each hop keeps the inputs it was sent (its history), so a later failover can rebuild a
replacement node's cache by replaying them."""

from __future__ import annotations

import asyncio
import logging
import uuid

import grpc
import torch

from client.routing import Hop
from client.transport import Peer, PeerError
from node.rpc import codec
from node.rpc.generated import potluck_pb2 as pb

log = logging.getLogger(__name__)


class HopStream:
    """The stream to one hop's node for one session."""

    def __init__(self, peer: Peer, hop: Hop, session_id: str, max_length: int, batch_size: int, wire_dtype: str):
        self.peer = peer
        self.hop = hop
        self.session_id = session_id
        self.max_length = max_length
        self.batch_size = batch_size
        self.wire_dtype = wire_dtype
        self.position = 0
        self.history: list[pb.Step] = []  # every step sent, for replay
        self._call = None

    async def open(self, session_timeout: float, step_timeout: float) -> None:
        self._call = self.peer.stub.Inference(timeout=session_timeout)
        request = pb.SessionRequest(
            open=pb.OpenSession(
                session_id=self.session_id,
                start=self.hop.start,
                end=self.hop.end,
                max_length=self.max_length,
                batch_size=self.batch_size,
                wire_dtype=self.wire_dtype,
            )
        )
        await self._exchange(request, "opened", step_timeout)

    async def step(
        self, hidden: pb.Tensor, position_ids: pb.Tensor | None, mask: pb.Tensor | None, step_timeout: float
    ) -> pb.StepResult:
        step = pb.Step(hidden=hidden, position=self.position, step_id=len(self.history))
        if position_ids is not None:
            step.position_ids.CopyFrom(position_ids)
        if mask is not None:
            step.attention_mask.CopyFrom(mask)
        result = await self._exchange(pb.SessionRequest(step=step), "result", step_timeout)
        self.history.append(step)
        self.position = result.position
        return result

    async def _exchange(self, request: pb.SessionRequest, expect: str, timeout: float):
        try:
            async with asyncio.timeout(timeout):  # one timer per exchange, no extra tasks
                await self._call.write(request)
                reply = await self._call.read()
        except grpc.aio.AioRpcError as error:
            raise PeerError.from_rpc(self.peer.address, error) from None
        except TimeoutError:
            self._call.cancel()
            raise PeerError(self.peer.address, f"no reply within {timeout:.0f}s", grpc.StatusCode.DEADLINE_EXCEEDED) from None
        if reply is grpc.aio.EOF:
            code = await self._call.code()
            details = await self._call.details()
            raise PeerError(self.peer.address, details or "stream closed", code)
        if reply.WhichOneof("kind") != expect:
            raise PeerError(self.peer.address, f"expected {expect!r}, got {reply.WhichOneof('kind')!r}")
        return getattr(reply, expect)

    async def close(self) -> None:
        if self._call is None or self._call.done():
            return
        try:
            await self._call.write(pb.SessionRequest(close=pb.CloseSession()))
            await self._call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the node already ended the stream; it frees the session either way
        self._call.cancel()


class InferenceSession:
    """Steps hidden states through every hop in order. Opened lazily on the first step."""

    def __init__(self, peers: dict[str, Peer], route: list[Hop], max_length: int, wire_dtype: str,
                 step_timeout: float, session_timeout: float):
        self.peers = peers
        self.route = route
        self.max_length = max_length
        self.wire_dtype = wire_dtype
        self.step_timeout = step_timeout
        self.session_timeout = session_timeout
        self.session_id = uuid.uuid4().hex
        self.position = 0
        self.hops: list[HopStream] = []

    async def _open(self, batch_size: int) -> None:
        self.hops = [
            HopStream(self.peers[hop.peer.address], hop, self.session_id, self.max_length, batch_size, self.wire_dtype)
            for hop in self.route
        ]
        await asyncio.gather(*(stream.open(self.session_timeout, self.step_timeout) for stream in self.hops))
        log.debug("session %s open over %s", self.session_id, " -> ".join(f"{h.peer.address}[{h.start}:{h.end})" for h in self.route))

    async def step(
        self, hidden: torch.Tensor, position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """hidden [batch, tokens, hidden_size] after the embeddings -> hidden after the last layer."""
        if self.position + hidden.shape[1] > self.max_length:
            raise ValueError(
                f"session holds {self.position} tokens; {hidden.shape[1]} more exceed its max_length {self.max_length}"
            )
        if not self.hops:
            await self._open(hidden.shape[0])
        wire = codec.WIRE_DTYPES[self.wire_dtype]
        message = codec.encode_tensor(hidden, wire)
        pos = codec.encode_tensor(position_ids.to(torch.int64)) if position_ids is not None else None
        mask = codec.encode_tensor(attention_mask.to(torch.int64)) if attention_mask is not None else None
        for stream in self.hops:
            result = await stream.step(message, pos, mask, self.step_timeout)
            message = result.hidden
        self.position += hidden.shape[1]
        return codec.decode_tensor(message, "hidden").clone()

    async def close(self) -> None:
        await asyncio.gather(*(stream.close() for stream in self.hops), return_exceptions=True)
