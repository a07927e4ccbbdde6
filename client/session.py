"""An inference session over a chain of hops: one open bidirectional stream per hop.

Each hop keeps the inputs it was sent (its history). When a hop fails (connection lost,
deadline exceeded, node draining or gone), the session asks its router for a replacement
chain for just that hop's layers, possibly several nodes, replays the history to rebuild
their caches, and carries on from the same step.

With push (when every hop's node offers it), the client sends a step to the first hop only, with
the rest of the route; each node hands its output straight to the next one and also answers on its
own stream, so the client still learns every hop's output (each hop's history) without sending
it. When the chain breaks, the client recovers the first hop that gave no result and finishes that
step itself, hop by hop; the next step pushes again over the new route."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

import grpc
import torch

from client.routing import Hop
from client.transport import Peer, PeerError
from common.wire import codec
from common.wire.generated import potluck_pb2 as pb

log = logging.getLogger(__name__)

MAX_REFUSALS = 50  # a step refused over a node's rate limit this many times in a row counts as that hop failing

# Errors another node may not have: worth a failover. INVALID_ARGUMENT / OUT_OF_RANGE are the client's own.
RECOVERABLE = {
    None, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS,
}


class Router(Protocol):
    """What a session needs from the swarm client to recover."""

    def peer(self, address: str) -> Peer: ...
    def deadline(self, hop: Hop, tokens: int) -> float: ...
    async def reroute(self, start: int, end: int, failed: str) -> list[Hop]: ...
    def observe(self, hop: Hop, seconds: float, tokens: int) -> None: ...


@dataclass
class RecoveryEvent:
    """One failover: what failed, what replaced it, and how long each phase took."""

    address: str
    start: int
    end: int
    reason: str
    replacement: list[tuple[str, int, int]]
    detect_s: float     # from sending the step to noticing the failure
    reroute_s: float    # finding the replacement chain (including waiting for one)
    replay_s: float     # opening the new streams and replaying the history
    replayed_tokens: int
    at_position: int    # tokens the session held when it failed


class HopStream:
    """The stream to one hop's node for one session."""

    def __init__(self, peer: Peer, hop: Hop, session_id: str, max_length: int, batch_size: int, wire_dtype: str,
                 adapter: str | None = None):
        self.peer = peer
        self.adapter = adapter  # the LoRA adapter the node runs this session with (None: the base model)
        self.hop = hop
        self.session_id = session_id
        self.max_length = max_length
        self.batch_size = batch_size
        self.wire_dtype = wire_dtype
        self.position = 0
        self.push = False  # the node accepts pushed steps into this session (said in its Opened reply)
        self.history: list[pb.Step] = []  # every step this hop ran (sent by us or pushed), for replay
        self.outputs: dict[int, pb.Tensor] | None = None  # history index -> result, kept for a verifier (None: not)
        self.sent_steps = 0  # steps this client wrote to the stream itself
        self.push_failures: set[int] = set()  # ids of steps this node said it could not hand on (notices read)
        self.refusals = 0  # steps this node refused over its rate limit (each sent again after a wait)
        self._call = None
        self._pending: asyncio.Future | None = None  # the read in flight (see reading())

    async def open(self, session_timeout: float, timeout: float) -> None:
        self._call = self.peer.stub.Inference(timeout=session_timeout)
        request = pb.SessionRequest(
            open=pb.OpenSession(
                session_id=self.session_id, start=self.hop.start, end=self.hop.end, max_length=self.max_length,
                batch_size=self.batch_size, wire_dtype=self.wire_dtype,
                metadata=codec.pack_metadata({"adapter": self.adapter}) if self.adapter else b"",
            )
        )
        opened = await self._guarded(self._exchange(request, "opened"), timeout)
        self.push = opened.push

    def make_step(self, hidden: pb.Tensor, position_ids: pb.Tensor | None, mask: pb.Tensor | None,
                  step_id: int, prompts: pb.Tensor | None = None) -> pb.Step:
        step = pb.Step(hidden=hidden, position=self.position, step_id=step_id)
        if position_ids is not None:
            step.position_ids.CopyFrom(position_ids)
        if mask is not None:
            step.attention_mask.CopyFrom(mask)
        if prompts is not None:
            step.prompts.CopyFrom(prompts)
        return step

    async def step(self, hidden: pb.Tensor, position_ids: pb.Tensor | None, mask: pb.Tensor | None,
                   timeout: float, step_id: int, prompts: pb.Tensor | None = None) -> pb.StepResult:
        """Send one step and wait for its result (client-driven); `prompts`: this hop's slice of the deep prompts.
        A step the node refuses over its rate limit is sent again after the wait it asks for (the session is kept);
        after MAX_REFUSALS in a row, PeerError RESOURCE_EXHAUSTED (the hop is then replaced)."""
        step = self.make_step(hidden, position_ids, mask, step_id, prompts)
        for _ in range(MAX_REFUSALS):
            result = await self._guarded(self._send_and_read(step), timeout)
            if not result.refused:
                self.record(step, result)
                return result
            await self.back_off(result)
        raise PeerError(self.peer.address, f"step refused {MAX_REFUSALS} times in a row: {result.refused}",
                        grpc.StatusCode.RESOURCE_EXHAUSTED)

    async def back_off(self, refusal: pb.StepResult) -> None:
        """Wait as long as a refused step's node asks (over its rate limit), at least 10 ms, at most 5 s."""
        self.refusals += 1
        log.info("node %s refused step %d: %s; retrying in %d ms", self.peer.address, refusal.step_id, refusal.refused,
                 refusal.retry_after_ms)
        await asyncio.sleep(min(max(refusal.retry_after_ms, 10), 5000) / 1000)

    async def send(self, step: pb.Step, timeout: float) -> None:
        """Write a step without waiting for its result (the first hop of a pushed step)."""
        await self._guarded(self._write(pb.SessionRequest(step=step)), timeout)

    async def result(self, step_id: int, timeout: float) -> pb.StepResult:
        """The result of step `step_id` on this stream (older results left over from a failure are skipped)."""
        return await self._guarded(self._read_result(step_id), timeout)

    def record(self, step: pb.Step, result: pb.StepResult) -> None:
        """This hop ran `step` (without its push list) and now holds `result.position` tokens."""
        if step.push:
            clean = pb.Step()
            clean.CopyFrom(step)
            clean.ClearField("push")
            step = clean
        self.history.append(step)
        if self.outputs is not None:
            self.outputs[len(self.history) - 1] = result.hidden
        self.position = result.position

    def cut(self, position: int) -> None:
        """Forget the tokens from `position` on (a rewind): later steps leave the history, one across `position`
        keeps its first tokens, so a replay rebuilds exactly the cache the node keeps."""
        kept: list[pb.Step] = []
        for step in self.history:
            if step.position >= position:
                break
            if step.position + step.hidden.shape[1] > position:
                step = _first_tokens(step, position - step.position, self.wire_dtype)
            kept.append(step)
        if self.outputs is not None:
            self.outputs = {index: output for index, output in self.outputs.items() if index < len(kept)}
        self.history = kept
        self.position = min(self.position, position)

    async def _send_and_read(self, step: pb.Step) -> pb.StepResult:
        await self._write(pb.SessionRequest(step=step))
        return await self._read_result(step.step_id)

    async def _write(self, request: pb.SessionRequest) -> None:
        await self._call.write(request)
        if request.WhichOneof("kind") == "step":
            self.sent_steps += 1

    def reading(self) -> asyncio.Future:
        """The read in flight on the stream, started if there is none. A read is never cancelled (grpc.aio
        would cancel the whole call with it): a wait that gives up leaves it to the next reader."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._call.read())
        return self._pending

    def push_failed(self, step_id: int) -> bool:
        """Whether the message just read (reading() is done) says this node could not hand step
        `step_id` on, or the stream failed after the node's result (it may have died before pushing)."""
        reading = self._pending
        if reading.exception() is not None or reading.result() is grpc.aio.EOF:
            return True  # left in place: the failure surfaces when the stream is next read
        self._pending = None
        reply = reading.result()
        if reply.WhichOneof("kind") == "result" and reply.result.push_error:
            self.push_failures.add(reply.result.step_id)
        return step_id in self.push_failures

    async def _read_result(self, step_id: int) -> pb.StepResult:
        while True:
            result = await self._read("result")
            if result.push_error:
                self.push_failures.add(result.step_id)
            elif result.step_id >= step_id:
                break
            # an older step's result (a step both pushed and re-sent after a failure), or a push-failure
            # notice that no longer matters
        if result.step_id != step_id:
            raise PeerError(self.peer.address, f"expected the result of step {step_id}, got step {result.step_id}")
        return result

    async def _exchange(self, request: pb.SessionRequest, expect: str):
        await self._write(request)
        return await self._read(expect)

    async def _read(self, expect: str):
        reply = await asyncio.shield(self.reading())
        self._pending = None
        if reply is grpc.aio.EOF:
            code = await self._call.code()
            details = await self._call.details()
            raise PeerError(self.peer.address, details or "stream closed", code)
        if reply.WhichOneof("kind") != expect:
            raise PeerError(self.peer.address, f"expected {expect!r}, got {reply.WhichOneof('kind')!r}")
        return getattr(reply, expect)

    async def _guarded(self, work, timeout: float):
        """Await `work` (reads and writes on the stream) within `timeout`; failures become PeerError."""
        try:
            async with asyncio.timeout(timeout):  # one timer per exchange
                return await work
        except grpc.aio.AioRpcError as error:
            raise PeerError.from_rpc(self.peer.address, error) from None
        except TimeoutError:
            self._call.cancel()
            raise PeerError(
                self.peer.address, f"no reply within {timeout:.2f}s", grpc.StatusCode.DEADLINE_EXCEEDED
            ) from None
        except asyncio.InvalidStateError:  # the RPC had already ended (e.g. the node was unreachable)
            code, details = await self._call.code(), await self._call.details()
            raise PeerError(self.peer.address, details or "stream already closed", code) from None

    async def close(self) -> None:
        if self._call is None:
            return
        if not self._call.done():
            try:
                await self._call.write(pb.SessionRequest(close=pb.CloseSession()))
                await self._call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the node already ended the stream; it frees the session either way
            self._call.cancel()
        if self._pending is not None:
            self._pending.cancel()
            await asyncio.gather(self._pending, return_exceptions=True)


MAX_CHUNKS_IN_FLIGHT = 8  # a long prompt is cut into at most this many chunks (nodes queue few steps per stream)


@dataclass
class _Chunk:
    """One chunk of a pipelined prefill, encoded once."""

    message: pb.Tensor
    pos: pb.Tensor | None
    mask: pb.Tensor | None
    position: int
    tokens: int
    step_id: int


class _ChainBroken(Exception):
    """A node could not hand a chunk on (its notice came back): finish the prefill client-driven."""


def _merged_history(history: list[pb.Step]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Consecutive steps a hop was sent, as one step: (hidden, position_ids, attention_mask or None)."""
    hiddens, positions, masks = [], [], []
    for step in history:
        hidden = codec.decode_tensor(step.hidden, "hidden")
        batch, tokens = hidden.shape[:2]
        hiddens.append(hidden)
        position_ids = codec.optional_tensor(step, "position_ids")
        positions.append(position_ids if position_ids is not None
                         else torch.arange(step.position, step.position + tokens).expand(batch, tokens))
        mask = codec.optional_tensor(step, "attention_mask")
        masks.append(mask)
    mask = None
    if any(m is not None for m in masks):
        mask = torch.cat([m if m is not None else torch.ones(h.shape[:2], dtype=torch.int64)
                          for m, h in zip(masks, hiddens)], dim=1)
    return torch.cat(hiddens, dim=1), torch.cat(positions, dim=1), mask


def _first_tokens(step: pb.Step, tokens: int, wire_dtype: str) -> pb.Step:
    """`step` with only its first `tokens` tokens (hidden states, position ids, mask)."""
    cut = pb.Step()
    cut.CopyFrom(step)
    cut.hidden.CopyFrom(codec.encode_hidden(codec.decode_tensor(step.hidden, "hidden")[:, :tokens], wire_dtype))
    for field in ("position_ids", "attention_mask"):
        value = codec.optional_tensor(step, field)
        if value is not None:
            getattr(cut, field).CopyFrom(codec.encode_tensor(value[:, :tokens]))
    return cut


def _history_prompts(history: list[pb.Step]) -> torch.Tensor | None:
    """The deep prompts a hop got with its first step (the prefill at position 0), or None."""
    if history and history[0].position == 0 and history[0].HasField("prompts"):
        return codec.decode_tensor(history[0].prompts, "prompts")
    return None


def _prompt_slice(prompts: torch.Tensor | None, base: int, hop: Hop, wire_dtype: str) -> pb.Tensor | None:
    """Hop `hop`'s layers of deep prompts whose first row is layer `base`, encoded (None: no prompts)."""
    if prompts is None:
        return None
    return codec.encode_hidden(prompts[hop.start - base : hop.end - base], wire_dtype)


class InferenceSession:
    """Steps hidden states through every hop in order; opened lazily on the first step."""

    def __init__(self, router: Router, route: list[Hop], max_length: int, wire_dtype: str, session_timeout: float,
                 max_failovers: int = 20, push: bool = True, verifier=None, prefill_chunk: int = 0,
                 adapter: str | None = None):
        self.router = router
        self.adapter = adapter  # every hop's stream (replacements and verifiers' shadows too) opens with it
        self.route = list(route)
        self.max_length = max_length
        self.wire_dtype = wire_dtype
        self.session_timeout = session_timeout
        self.max_failovers = max_failovers
        self.push = push  # let nodes forward each step along the chain (when all of them offer it)
        self.session_id = uuid.uuid4().hex
        self._ids = itertools.count()
        self._step_ids = itertools.count(1)  # one increasing sequence for every step sent to any hop
        self.position = 0
        self.batch_size = 0
        self.hops: list[HopStream] = []
        self.events: list[RecoveryEvent] = []
        self.steps = 0  # calls of step(): passes through the chain (a prompt's chunks count once)
        self.pushed_steps = 0  # steps that went through the whole chain by push
        self._push_backoff = 0  # after a failed handover, steps to drive by hand: 1, 2, 4 ... 64; 0 after a push
        self._push_pause = 0    # of which this many are left
        self.verifier = verifier  # client.verify.Verifier: recomputes hops on other nodes (None: trust them)
        self.prefill_chunk = prefill_chunk  # pushed prompts of 2x this many tokens or more go down the chain in chunks
        # convoys (common/wire/convoy.py): the one the next pushed step travels in (set by the caller, used once),
        # and the one the last step's output came back in (from the last hop; None if it came alone or by hand)
        self.next_convoy: tuple[int, int] | None = None
        self.arrived_convoy: tuple[int, int] | None = None

    def _stream(self, hop: Hop) -> HopStream:
        stream = HopStream(self.router.peer(hop.peer.address), hop, f"{self.session_id}-{next(self._ids)}",
                           self.max_length, self.batch_size, self.wire_dtype, self.adapter)
        if self.verifier is not None:
            stream.outputs = {}
        return stream

    async def _open(self) -> None:
        self.hops = [self._stream(hop) for hop in self.route]
        results = await asyncio.gather(
            *(s.open(self.session_timeout, self.router.deadline(s.hop, 1)) for s in self.hops), return_exceptions=True
        )
        for index in reversed(range(len(results))):  # a node that fails at open is replaced like any other
            if isinstance(results[index], PeerError):
                await self._recover(index, results[index], time.perf_counter(), time.perf_counter())
            elif isinstance(results[index], BaseException):
                raise results[index]

    @property
    def pushing(self) -> bool:
        """Whether the next step goes by push: asked for, more than one hop, and every hop's node offers it."""
        return (self.push and len(self.hops) > 1 and not self._push_pause
                and all(stream.push and stream.position == self.position for stream in self.hops))

    async def step(self, hidden: torch.Tensor, position_ids: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [batch, tokens, hidden_size] after the embeddings -> hidden after the last layer.

        `prompts` (deep prompt tuning, only on the first step): [num_layers, batch, prompt_tokens, hidden], added at
        each layer's input to the first prompt_tokens positions; each hop gets its layers' slice. Such a step is
        client-driven (never pushed: a node hands on its output, not the next hop's prompts)."""
        if prompts is not None and self.position != 0:
            raise ValueError("deep prompts go with the session's first step only")
        tokens = hidden.shape[1]
        self.steps += 1
        self.arrived_convoy = None  # until the last hop says otherwise
        if self.position + tokens > self.max_length:
            raise ValueError(
                f"session holds {self.position} tokens; {tokens} more exceed its max_length {self.max_length}"
            )
        if not self.hops:
            self.batch_size = hidden.shape[0]
            await self._open()
        if prompts is not None:
            if self.verifier is not None:
                raise NotImplementedError("verifying a session with deep prompts is not supported yet")
            message = await self._drive(
                0,
                codec.encode_hidden(hidden, self.wire_dtype),
                codec.encode_tensor(position_ids.to(torch.int64)) if position_ids is not None else None,
                codec.encode_tensor(attention_mask.to(torch.int64)) if attention_mask is not None else None,
                tokens,
                prompts,
            )
            self.position += tokens
            return codec.decode_tensor(message, "hidden").clone()
        if self.pushing and self.verifier is None and tokens >= 2 * self.prefill_chunk > 0:
            out = await self._pipelined_prefill(hidden, position_ids, attention_mask)
            self.position += tokens
            return out
        message = codec.encode_hidden(hidden, self.wire_dtype)
        pos = codec.encode_tensor(position_ids.to(torch.int64)) if position_ids is not None else None
        mask = codec.encode_tensor(attention_mask.to(torch.int64)) if attention_mask is not None else None
        index = 0
        if self.pushing:
            index, message = await self._push_step(message, pos, mask, tokens)
        elif self._push_pause:
            self._push_pause -= 1
        if index < len(self.hops):
            message = await self._drive(index, message, pos, mask, tokens)
        if self.verifier is not None:  # may replace a lying hop and recompute the step (client/verify.py)
            message = await self.verifier.after_step(self, message)
        self.position += tokens
        return codec.decode_tensor(message, "hidden").clone()

    async def _push_step(self, message: pb.Tensor, pos: pb.Tensor | None, mask: pb.Tensor | None,
                         tokens: int) -> tuple[int, pb.Tensor]:
        """Send the step to the first hop with the rest of the route, then read every hop's result.

        Returns (n, the input of hop n): n = len(hops) once every hop answered; otherwise hop n is the
        first without a result (recovered already if its stream failed) and the caller finishes the step
        from there. Hop j's result may take as long as the deadlines of hops 0..j together."""
        step_id = next(self._step_ids)
        first = self.hops[0].make_step(message, pos, mask, step_id)
        if self.next_convoy is not None:
            first.convoy, first.convoy_size = self.next_convoy
            self.next_convoy = None
        deadlines = [self.router.deadline(stream.hop, tokens) for stream in self.hops]
        for before, stream in zip(deadlines, self.hops[1:]):
            # the previous node may wait half its own deadline for this one to accept the step
            first.push.add(address=stream.peer.address, session_id=stream.session_id, timeout=before / 2)
        sent = last = time.perf_counter()
        budget = 0.0
        for index, stream in enumerate(self.hops):
            budget += deadlines[index]
            step = first if index == 0 else stream.make_step(message, pos, mask, step_id)
            step.position = self.position  # a pushed step carries the first hop's position to every hop
            try:
                if index == 0:
                    await stream.send(first, budget)
                result = await self._pushed_result(index, step_id, sent + budget)
            except PeerError as error:
                if error.code not in RECOVERABLE:
                    raise
                await self._recover(index, error, sent, time.perf_counter())
                return index, message
            if result is None and index == 0:  # refused over the node's rate limit: send it again by hand
                return index, message
            if result is None:
                # The previous node did not hand its output on: send it ourselves (that recovers the hop if it
                # is gone). Two nodes that cannot reach each other would cost this every token: back off.
                self._pause_push()
                log.info("hop %s did not push step %d to %s; client-driven for %d steps",
                         self.hops[index - 1].peer.address, step_id, stream.peer.address, self._push_pause)
                return index, message
            stream.record(step, result)
            message = result.hidden
            arrived = time.perf_counter()
            # hop j's share of a pushed step: from hop j-1's result to its own (hop 0: from sending the step)
            self.router.observe(stream.hop, arrived - last, tokens)
            last = arrived
        if result.convoy:
            self.arrived_convoy = (result.convoy, result.convoy_size)
        self.pushed_steps += 1
        self._push_backoff = 0
        return len(self.hops), message

    async def _pipelined_prefill(self, hidden: torch.Tensor, position_ids: torch.Tensor | None,
                                 attention_mask: torch.Tensor | None) -> torch.Tensor:
        """A long prompt as chunks that follow each other down the chain: node i+1 computes chunk c while
        node i computes chunk c+1. Every chunk goes to the first hop at once, each with the push route;
        results are read hop by hop, so while a hop's results are awaited the previous hop's stream can
        only hold failure notices (as for one pushed step). After a failure, each chunk is finished
        client-driven from the first hop that has not run it (a node that ran it unrecorded rewinds)."""
        tokens = hidden.shape[1]
        size = max(self.prefill_chunk, -(-tokens // MAX_CHUNKS_IN_FLIGHT))
        chunks = []
        for begin in range(0, tokens, size):
            end = min(begin + size, tokens)
            pos = position_ids[:, begin:end] if position_ids is not None else None
            mask = attention_mask[:, begin:end] if attention_mask is not None else None  # this chunk's tokens
            chunks.append(_Chunk(
                message=codec.encode_hidden(hidden[:, begin:end], self.wire_dtype),
                pos=codec.encode_tensor(pos.to(torch.int64)) if pos is not None else None,
                mask=codec.encode_tensor(mask.to(torch.int64)) if mask is not None else None,
                position=self.position + begin, tokens=end - begin, step_id=next(self._step_ids)))
        deadlines = [self.router.deadline(stream.hop, tokens) for stream in self.hops]
        outputs: dict[int, dict[int, pb.Tensor]] = {0: {c: chunk.message for c, chunk in enumerate(chunks)}}
        first = self.hops[0]
        sent = time.perf_counter()
        try:
            for chunk in chunks:
                step = self._chunk_step(first, chunk, chunk.message)
                for before, stream in zip(deadlines, self.hops[1:]):
                    step.push.add(address=stream.peer.address, session_id=stream.session_id, timeout=before / 2)
                await first.send(step, deadlines[0])
            budget = 0.0
            for index, stream in enumerate(self.hops):
                budget += deadlines[index]
                for c, chunk in enumerate(chunks):
                    result = await self._pushed_result(index, chunk.step_id, sent + budget)
                    if result is None:
                        self._pause_push()
                        raise _ChainBroken
                    stream.record(self._chunk_step(stream, chunk, outputs[stream.hop.start][c]), result)
                    outputs.setdefault(stream.hop.end, {})[c] = result.hidden
        except PeerError as error:
            if error.code not in RECOVERABLE:
                raise
            broken = next((i for i, s in enumerate(self.hops) if s.peer.address == error.address), 0)
            await self._recover(broken, error, sent, time.perf_counter())
        except _ChainBroken:
            log.info("a pipelined prefill chunk was not handed on; finishing client-driven")
        else:
            self.pushed_steps += len(chunks)
            self._push_backoff = 0
        finals = []
        for c, chunk in enumerate(chunks):
            last = self.hops[-1].hop.end
            if c in outputs.get(last, {}) and all(s.position > chunk.position for s in self.hops):
                finals.append(outputs[last][c])
                continue
            index = next(i for i, s in enumerate(self.hops) if s.position <= chunk.position)
            message = outputs[self.hops[index].hop.start][c]
            finals.append(await self._drive(index, message, chunk.pos, chunk.mask, chunk.tokens))
        return torch.cat([codec.decode_tensor(m, "hidden") for m in finals], dim=1)

    @staticmethod
    def _chunk_step(stream: HopStream, chunk: "_Chunk", hidden: pb.Tensor) -> pb.Step:
        step = stream.make_step(hidden, chunk.pos, chunk.mask, chunk.step_id)
        step.position = chunk.position
        return step

    def _pause_push(self) -> None:
        """A node could not hand a step on: drive the next 1, 2, 4 ... 64 steps by hand (two nodes that cannot
        reach each other would otherwise cost a notice every token)."""
        self._push_backoff = min(max(2 * self._push_backoff, 1), 64)
        self._push_pause = self._push_backoff

    async def _pushed_result(self, index: int, step_id: int, deadline: float) -> pb.StepResult | None:
        """Hop `index`'s result of pushed step `step_id` (by `deadline`, a perf_counter time), or None
        if the hop before it says it could not hand the step on (a second result with push_error), or the
        hop refused it over its rate limit (after waiting as it asks)."""
        stream = self.hops[index]
        result = await self._pushed_reply(index, step_id, deadline)
        if result is not None and result.refused:
            await stream.back_off(result)
            return None
        return result

    async def _pushed_reply(self, index: int, step_id: int, deadline: float) -> pb.StepResult | None:
        stream = self.hops[index]
        if index > 0:
            before = self.hops[index - 1]
            if step_id in before.push_failures:  # its notice was read already (pipelined steps)
                return None
            while True:
                result_read, notice_read = stream.reading(), before.reading()
                left = deadline - time.perf_counter()
                if left > 0:
                    await asyncio.wait({result_read, notice_read}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if result_read.done() or not notice_read.done():
                    break  # a result (or a failure) to read, or the deadline
                if before.push_failed(step_id):
                    return None
        return await stream.result(step_id, max(deadline - time.perf_counter(), 0.001))

    async def _drive(self, index: int, message: pb.Tensor, pos: pb.Tensor | None, mask: pb.Tensor | None,
                     tokens: int, prompts: torch.Tensor | None = None) -> pb.Tensor:
        """Client-driven: send the step to hop `index`, its result to the next hop, and so on to the last
        (each with its slice of the deep `prompts`, indexed by global layer, if given).

        A fresh step id, so that results a hop computed for a broken push of this step are skipped."""
        step_id = next(self._step_ids)
        while index < len(self.hops):
            stream = self.hops[index]
            sent = time.perf_counter()
            try:
                result = await stream.step(message, pos, mask, self.router.deadline(stream.hop, tokens), step_id,
                                           _prompt_slice(prompts, 0, stream.hop, self.wire_dtype))
            except PeerError as error:
                if error.code not in RECOVERABLE:
                    raise
                await self._recover(index, error, sent, time.perf_counter())
                continue  # the same step, from the first replacement hop
            self.router.observe(stream.hop, time.perf_counter() - sent, tokens)
            message = result.hidden
            index += 1
        return message

    async def _recover(self, index: int, error: PeerError, sent: float, noticed: float) -> None:
        """Replace hop `index` by a chain for the same layers, rebuilt from the hop's history."""
        failed = self.hops[index]
        start, end = failed.hop.start, failed.hop.end
        culprit = error.address
        for _ in range(self.max_failovers):
            if len(self.events) >= self.max_failovers:
                break
            began = time.perf_counter()
            route = await self.router.reroute(start, end, culprit)
            routed = time.perf_counter()
            streams = [self._stream(hop) for hop in route]
            try:
                replayed = await self._replay(failed.history, streams)
            except PeerError as again:
                if again.code not in RECOVERABLE:
                    raise
                culprit = again.address
                await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)
                continue
            await failed.close()
            self.hops[index : index + 1] = streams
            event = RecoveryEvent(
                address=error.address, start=start, end=end, reason=str(error),
                replacement=[(h.peer.address, h.start, h.end) for h in route],
                detect_s=noticed - sent, reroute_s=routed - began, replay_s=time.perf_counter() - routed,
                replayed_tokens=replayed, at_position=self.position,
            )
            self.events.append(event)
            log.warning(
                "hop %s [%d:%d) failed (%s); re-routed to %s and replayed %d tokens in %.0f ms",
                error.address, start, end, error, ", ".join(f"{a}[{s}:{e})" for a, s, e in event.replacement),
                replayed, (event.reroute_s + event.replay_s) * 1000,
            )
            return
        raise PeerError(error.address, f"gave up after {self.max_failovers} failovers: {error}", error.code)

    async def _replay(self, history: list[pb.Step], streams: list[HopStream]) -> int:
        await asyncio.gather(*(s.open(self.session_timeout, self.router.deadline(s.hop, 1)) for s in streams))
        if not history:
            return 0
        hidden, positions, mask = _merged_history(history)
        prompts = _history_prompts(history)  # the failed hop's layers, from streams[0].hop.start on
        tokens = hidden.shape[1]
        message = codec.encode_tensor(hidden)
        pos = codec.encode_tensor(positions)
        mask_message = codec.encode_tensor(mask) if mask is not None else None
        step_id = next(self._step_ids)
        for stream in streams:
            result = await stream.step(message, pos, mask_message, self.router.deadline(stream.hop, tokens), step_id,
                                       _prompt_slice(prompts, streams[0].hop.start, stream.hop, self.wire_dtype))
            message = result.hidden
        return tokens

    def rewind(self, position: int) -> None:
        """Forget the session's tokens from `position` on: the next step goes at `position`, and each node drops
        the later tokens from its cache when it runs that step. Speculative decoding takes back a rejected draft
        this way (client/model.py); the histories are cut too, so a failover replays only what is kept and a verifier
        checks only that (client/verify.py)."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot rewind to {position} tokens: the session holds {self.position}")
        if position == self.position:
            return
        for stream in self.hops:
            stream.cut(position)
            if self.verifier is not None:  # its shadows and checks follow the shorter history
                self.verifier.cut(stream)
        self.position = position

    async def settle(self) -> None:
        """Check every step not yet verified (spot mode leaves some); raises like `step` if a node lied."""
        if self.verifier is not None and self.hops:
            await self.verifier.settle(self)

    async def close(self) -> None:
        if self.verifier is not None:
            await self.verifier.close()
        await asyncio.gather(*(stream.close() for stream in self.hops), return_exceptions=True)
