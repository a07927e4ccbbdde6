"""Server-to-server push: hand a step's output to the next hop's node, over a small cache of channels.

A step that carries a push list (`Step.push`, the hops after this one) is forwarded, once this node
has computed it, to `push[0]` with a `Push` call holding this node's output and `push[1:]`. The call
returns as soon as the next node has accepted the step (not once it has computed it); the servicer
answers its own client once the call is on its way (`started`: the handover is on the token's path, the
reply is not) and sends a failure notice only if the handover fails.

The outputs of one pass that go to the same node leave as a convoy (common/wire/convoy.py): they are
handed over together, in one `PushMany` call, once the convoy's steps are all ready (or CONVOY_FLUSH
after the first, if some never come). A node that does not know PushMany answers UNIMPLEMENTED; its
steps then go one `Push` each, from then on.

A push list names addresses the client chose, so the node dials only what node/rpc/dialing.py allows: in a
swarm (bootstrap nodes or mDNS), the address of a live member's record; always, an address the node's dial
policy allows (resolved once, then dialed as resolved). A refused target gets the fixed `push_error`
REFUSED_TARGET; a failed handover names only the status, and the next node's own message when it is a Potluck
refusal (stale step, no such session), never the transport's text."""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Callable

import grpc

from common.wire.codec import MAX_MESSAGE_BYTES
from common.wire.generated import potluck_pb2 as pb
from common.wire.generated import potluck_pb2_grpc as pb_grpc
from common.wire.security import PLAINTEXT, Security
from node.rpc.dialing import DialPolicy, DialRefused, name_options
from node.runtime.errors import InvalidRequest

PUSH_TIMEOUT = 5.0     # seconds to wait for the next node to accept a step, when the client names none
MAX_TIMEOUT = 60.0     # a client may not make a node wait longer than this for a handover
MAX_CHANNELS = 64      # channels to push targets kept open (least recently used closed first)
MAX_PUSH_HOPS = 256    # longest push list a step may carry
MAX_PUSH_MANY = 256    # most steps one PushMany call may carry
CONVOY_FLUSH = 0.005   # seconds a convoy's first ready step waits for the others before they go without them
MAX_RESOLVED = 4 * MAX_CHANNELS  # vetted push targets remembered with the address they are dialed at
REFUSED_TARGET = "push target refused: not a live member of this node's swarm at an address it may dial"
MAX_REMOTE_DETAILS = 200  # characters of the next node's own refusal passed on to the client
# statuses whose message is the next node's (Potluck's) own refusal; any other status is told by its name only
NODE_REFUSALS = {"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "OUT_OF_RANGE",
                 "ALREADY_EXISTS"}
TRANSPORT = {  # what a failed handover is told instead of the transport's text
    "UNAVAILABLE": "the next node could not be reached",
    "DEADLINE_EXCEEDED": "the next node did not accept the step in time",
    "UNAUTHENTICATED": "the next node refused this node's calls",
    "PERMISSION_DENIED": "the next node refused this node's calls",
}

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
    and the convoy the output leaves in (common/wire/convoy.py)."""
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

    def __init__(self, max_channels: int = MAX_CHANNELS, security: Security = PLAINTEXT,
                 policy: DialPolicy = DialPolicy(), members: Callable[[str], bool] | None = None):
        self.max_channels = max_channels
        self.security = security  # how to dial the next node (swarm token, TLS)
        self.policy = policy  # which addresses may be dialed (start_node: the node's own; tests: a lab swarm)
        self.members = members  # is an address a live swarm member's? None: the node is in no swarm
        self._dialed: OrderedDict[str, str] = OrderedDict()  # vetted target -> the address it is dialed at
        self._channels: OrderedDict[str, tuple[grpc.aio.Channel, pb_grpc.PotluckStub]] = OrderedDict()
        self._closing: set[asyncio.Task] = set()
        self._convoys: dict[tuple[str, int], _Handover] = {}  # (address, convoy id) -> its steps ready so far
        self._handing: set[asyncio.Task] = set()  # PushMany calls in flight
        self._single: set[str] = set()  # addresses that answered PushMany with UNIMPLEMENTED
        self.calls = 0  # Push and PushMany calls made (each PushMany counts once)

    async def forward(self, hidden: pb.Tensor, step: pb.Step, convoy: tuple[int, int] | None = None,
                      started: asyncio.Future | None = None) -> str:
        """Hand `hidden` (this node's output of `step`, leaving in `convoy`) to step.push[0]; returns "" or what
        went wrong. A step in a convoy of several waits for the rest of it (CONVOY_FLUSH at most), and they go
        in one PushMany call. `started` (if given) is resolved once the call is under way, or has failed."""
        try:
            target = step.push[0]
            if not await self._vet(target.address):
                return REFUSED_TARGET
            request = forwarded_step(hidden, step, convoy)
            if convoy is None or convoy[1] < 2 or target.address in self._single:
                return await self._push(target.address, request, _timeout(target), started)
            key = (target.address, convoy[0])
            handover = self._convoys.get(key)
            if handover is None:
                handover = self._convoys[key] = _Handover(convoy[1])
                handover.timer = asyncio.get_running_loop().call_later(CONVOY_FLUSH, self._flush, key)
            done = asyncio.get_running_loop().create_future()
            handover.add(request, _timeout(target), done, started)
            if handover.complete():
                self._flush(key)
            return await done
        finally:
            _under_way(started)

    async def _vet(self, address: str) -> bool:
        """Whether `address` may be pushed to: a member's (in a swarm), and allowed by the policy (resolved once)."""
        if self.members is not None and not self.members(address):
            return False
        if address in self._dialed:
            self._dialed.move_to_end(address)
            return True
        try:
            self._dialed[address] = await self.policy.resolve(address)
        except DialRefused:
            return False
        while len(self._dialed) > MAX_RESOLVED:
            self._dialed.popitem(last=False)
        return True

    def _flush(self, key: tuple[str, int]) -> None:
        handover = self._convoys.pop(key, None)
        if handover is not None:
            handover.timer.cancel()
            task = asyncio.ensure_future(self._push_many(key[0], handover))
            self._handing.add(task)  # held until done
            task.add_done_callback(self._handing.discard)

    async def _push(self, address: str, request: pb.PushRequest, timeout: float,
                    started: asyncio.Future | None = None) -> str:
        try:
            if address not in self._channels:
                await self.security.prefetch(self._dialed.get(address, address))
            self.calls += 1
            call = self._stub(address).Push(request, timeout=timeout)  # sets off on the loop's next turn
            _under_way(started)
            await call
        except grpc.aio.AioRpcError as error:
            return _failure(address, error.code().name, error.details())
        return ""

    async def _push_many(self, address: str, handover: "_Handover") -> None:
        """One PushMany for the steps of a convoy; each step's waiter gets its own outcome."""
        live = [(request, done) for request, done in zip(handover.requests, handover.waiters) if not done.cancelled()]
        if not live:
            return
        try:
            if address not in self._channels:
                await self.security.prefetch(self._dialed.get(address, address))
            self.calls += 1
            request = pb.PushManyRequest(steps=[r for r, _ in live])
            call = self._stub(address).PushMany(request, timeout=handover.timeout)
            for started in handover.started:
                _under_way(started)
            reply = await call
            if len(reply.outcomes) != len(live):
                raise ValueError(f"{address} answered {len(reply.outcomes)} outcomes for {len(live)} steps")
            errors = [_failure(address, o.code, o.message) if o.code else "" for o in reply.outcomes]
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED and address not in self._single:
                self._single.add(address)  # an older node: one Push per step, from now on
                errors = await asyncio.gather(*(self._push(address, r, handover.timeout) for r, _ in live))
            else:
                errors = [_failure(address, error.code().name, error.details())] * len(live)
        except Exception:  # a malformed reply: the steps are not known to be accepted
            errors = [_failure(address, "INTERNAL", "the next node answered something that is not PushMany's reply")
                      ] * len(live)
        for (_, done), error in zip(live, errors):
            if not done.done():
                done.set_result(error)

    def _stub(self, address: str) -> pb_grpc.PotluckStub:
        entry = self._channels.pop(address, None)
        if entry is None:
            dialed = self._dialed.get(address, address)  # the address as resolved when it was vetted
            channel = self.security.channel(dialed, options=CHANNEL_OPTIONS + name_options(address, dialed,
                                                                                          self.security))
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
        for address, ident in list(self._convoys):  # steps still waiting for the rest of their convoy go now
            self._flush((address, ident))
        await asyncio.gather(*self._handing, return_exceptions=True)
        channels = [channel for channel, _ in self._channels.values()]
        self._channels.clear()
        await asyncio.gather(*(channel.close() for channel in channels), *self._closing, return_exceptions=True)


class _Handover:
    """The steps of one convoy ready to be handed to one node, and who waits for each outcome."""

    def __init__(self, size: int):
        self.size = size
        self.requests: list[pb.PushRequest] = []
        self.waiters: list[asyncio.Future] = []
        self.started: list[asyncio.Future | None] = []  # resolved once the PushMany call is under way
        self.timeout = 0.0  # the longest any of its steps may wait (every client's bound holds for its own step)
        self.timer: asyncio.TimerHandle | None = None

    def add(self, request: pb.PushRequest, timeout: float, done: asyncio.Future,
            started: asyncio.Future | None = None) -> None:
        self.requests.append(request)
        self.waiters.append(done)
        self.started.append(started)
        self.timeout = max(self.timeout, timeout)

    def complete(self) -> bool:
        return len(self.requests) >= min(self.size, MAX_PUSH_MANY)


def _timeout(target: pb.PushTarget) -> float:
    """Seconds to wait for `target` to accept a step: what the client named, within bounds."""
    timeout = target.timeout
    if not (timeout > 0 and math.isfinite(timeout)):
        timeout = PUSH_TIMEOUT
    return min(timeout, MAX_TIMEOUT)


def _under_way(started: asyncio.Future | None) -> None:
    if started is not None and not started.done():
        started.set_result(None)


def _failure(address: str, code: str, message: str | None) -> str:
    """What the client is told of a failed handover to `address` (the address it gave): the status, and the next
    node's message only when it is a node's refusal of the step; never the transport's own text."""
    if code in NODE_REFUSALS and message:
        told = message if len(message) <= MAX_REMOTE_DETAILS else message[: MAX_REMOTE_DETAILS - 3] + "..."
    else:
        told = TRANSPORT.get(code, "the handover failed")
    return f"push to {address} failed [{code}]: {told}"
