"""Server-to-server push: hand a step's output to the next hop's node, over a small cache of channels.

A step that carries a push list (`Step.push`, the hops after this one) is forwarded, once this node
has computed it, to `push[0]` with a `Push` call holding this node's output and `push[1:]`. The call
returns as soon as the next node has accepted the step (not once it has computed it); the servicer
answers its own client meanwhile and sends a failure notice only if the handover fails."""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict

import grpc

from node.rpc.codec import MAX_MESSAGE_BYTES
from node.rpc.generated import potluck_pb2 as pb
from node.rpc.generated import potluck_pb2_grpc as pb_grpc
from node.rpc.security import PLAINTEXT, Security
from node.runtime.errors import InvalidRequest

PUSH_TIMEOUT = 5.0     # seconds to wait for the next node to accept a step, when the client names none
MAX_TIMEOUT = 60.0     # a client may not make a node wait longer than this for a handover
MAX_CHANNELS = 64      # channels to push targets kept open (least recently used closed first)
MAX_PUSH_HOPS = 256    # longest push list a step may carry

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def check_targets(targets) -> None:
    """Refuse a push list this node could not forward."""
    if len(targets) > MAX_PUSH_HOPS:
        raise InvalidRequest(f"push list of {len(targets)} hops exceeds the limit of {MAX_PUSH_HOPS}")
    for index, target in enumerate(targets):
        if not target.address or not target.session_id:
            raise InvalidRequest(f"push[{index}] needs both an address and a session_id")


def forwarded_step(hidden: pb.Tensor, step: pb.Step, convoy: tuple[int, int] | None = None) -> pb.PushRequest:
    """The Push to step.push[0]: this node's output in place of the input, the rest of the list, the same ids,
    and the convoy the output leaves in (node/runtime/convoy.py)."""
    target = step.push[0]
    out = pb.Step(hidden=hidden, position=step.position, step_id=step.step_id, push=step.push[1:])
    if convoy is not None:
        out.convoy, out.convoy_size = convoy
    if step.HasField("position_ids"):
        out.position_ids.CopyFrom(step.position_ids)
    if step.HasField("attention_mask"):
        out.attention_mask.CopyFrom(step.attention_mask)
    return pb.PushRequest(session_id=target.session_id, step=out)


class Pusher:
    """Forwards pushed steps; owns the channels to push targets. Use it on the server's event loop."""

    def __init__(self, max_channels: int = MAX_CHANNELS, security: Security = PLAINTEXT):
        self.max_channels = max_channels
        self.security = security  # how to dial the next node (swarm token, TLS)
        self._channels: OrderedDict[str, tuple[grpc.aio.Channel, pb_grpc.PotluckStub]] = OrderedDict()
        self._closing: set[asyncio.Task] = set()

    async def forward(self, hidden: pb.Tensor, step: pb.Step, convoy: tuple[int, int] | None = None) -> str:
        """Hand `hidden` (this node's output of `step`, leaving in `convoy`) to step.push[0]; returns "" or what
        went wrong."""
        target = step.push[0]
        timeout = target.timeout
        if not (timeout > 0 and math.isfinite(timeout)):
            timeout = PUSH_TIMEOUT
        timeout = min(timeout, MAX_TIMEOUT)
        try:
            if target.address not in self._channels:
                await self.security.prefetch(target.address)
            await self._stub(target.address).Push(forwarded_step(hidden, step, convoy), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            return f"push to {target.address} failed [{error.code().name}]: {error.details() or error.code().name}"
        return ""

    def _stub(self, address: str) -> pb_grpc.PotluckStub:
        entry = self._channels.pop(address, None)
        if entry is None:
            channel = self.security.channel(address, options=CHANNEL_OPTIONS)
            entry = (channel, pb_grpc.PotluckStub(channel))
        self._channels[address] = entry  # most recently used last
        while len(self._channels) > self.max_channels:
            _, (channel, _) = self._channels.popitem(last=False)
            task = asyncio.ensure_future(channel.close(grace=PUSH_TIMEOUT))  # lets a push in flight finish
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return entry[1]

    @property
    def open_channels(self) -> int:
        return len(self._channels)

    async def close(self) -> None:
        channels = [channel for channel, _ in self._channels.values()]
        self._channels.clear()
        await asyncio.gather(*(channel.close() for channel in channels), *self._closing, return_exceptions=True)
