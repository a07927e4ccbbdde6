"""The thin gRPC servicer: decode, validate, call the executor, encode. Errors -> status codes here only."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from common.wire import codec, contract
from common.wire.caller import identity_of
from common.wire.convoy import Convoy
from common.wire.generated import potluck_pb2 as pb
from common.wire.generated import potluck_pb2_grpc as pb_grpc
from node.metrics import NodeMetrics
from node.rpc import push
from node.rpc.checks import check_gossip, check_id, check_push_targets, details
from node.rpc.probe import Prober
from node.rpc.ratelimit import RateLimited, RateLimiter, peer_host
from node.runtime.errors import Exhausted, FailedPrecondition, InvalidRequest, NotFound, RequestError, Unavailable
from node.runtime.executor import Executor
from node.runtime.quota import address_of, caller_key
from node.runtime.sessions import Session

log = logging.getLogger(__name__)

MAX_QUEUED_STEPS = 16  # requests and pushed steps waiting on one stream; beyond, the client's stream waits


@dataclass
class Serving:
    """The executor now serving (None while the node joins or moves), and what Info reports live."""

    executor: Executor | None = None
    state: str = "JOINING"
    throughput: float = 0.0
    prefill_throughput: float = 0.0
    started_at: float = field(default_factory=time.time)  # for uptime in Info and records
    memory: Callable[[], dict] | None = None  # node/metrics.MemoryView.snapshot once the span is loaded

    @property
    def draining(self) -> bool:
        return self.state in ("DRAINING", "OFFLINE")


@dataclass(frozen=True)
class NodeIdentity:
    """What Info reports besides live numbers."""

    node_id: str
    name: str
    model_id: str
    config_hash: str
    num_layers: int
    dtype: str
    device: str
    quant: str = "none"  # weight quantisation of the span (node/model/quant.py)


def _status(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status a request that failed with `error` gets, and its message."""
    if isinstance(error, RequestError):
        return getattr(grpc.StatusCode, error.kind), error.message
    if isinstance(error, codec.CodecError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    log.exception("internal error")
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


async def _abort(context: grpc.aio.ServicerContext, error: Exception, metrics: NodeMetrics | None) -> None:
    code, message = _status(error)
    if metrics is not None:
        metrics.error(code.name)
    await context.abort(code, details(message))


class PotluckServicer(pb_grpc.PotluckServicer):
    def __init__(self, serving: Serving, identity: NodeIdentity, membership=None, metrics: NodeMetrics | None = None,
                 limiter: RateLimiter | None = None):
        self.serving = serving
        self.limiter = limiter  # None: no per-peer rate limit
        self.identity = identity
        self.membership = membership
        self.metrics = metrics  # None: record nothing
        self.push_enabled = True  # accept Push and forward steps that carry a push list (advertised in Info, Opened)
        self.pusher = push.Pusher()
        self._streams: dict[str, _Stream] = {}  # session id -> its open stream, for Push
        self.prober = Prober()  # Probe: dials through the node's Security (set by start_node)
        self.relay = None  # rpc Attach: a RelayServicer, or NotARelay (node/relay/); set by start_node
        # connections our relay link opened to this server (their peer as gRPC names it) -> the caller the relay
        # saw; filled only by node/relay/link.py, so a caller behind a relay is charged as itself, not as loopback
        self.tunneled: dict[str, str] = {}
        self.model_files = None  # ModelFile: a node/rpc/model_files.ModelFileServer (set by start_node)

    def _executor(self) -> Executor:
        executor = self.serving.executor
        if executor is None:
            raise Unavailable("this node is joining (loading its layers); try again shortly")
        return executor

    def _caller(self, context) -> str:
        """Whose quotas a call counts against (node/runtime/quota.py): the calling host (the real caller for a
        connection tunneled through our relay, else the socket's peer), with the client identity the call proves
        (common/wire/caller.py), if any."""
        peer = context.peer()
        return caller_key(peer_host(self.tunneled.get(peer, peer)), identity_of(context.invocation_metadata()))

    def _charge(self, host: str, what: str) -> None:
        """One request from `host` against the per-peer rate limit (RESOURCE_EXHAUSTED past it)."""
        if self.limiter is not None:
            self.limiter.charge(host, what)

    async def Gossip(self, request: pb.GossipRequest, context) -> pb.GossipReply:
        if self.membership is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node does not gossip")
        try:
            self._charge(self._caller(context), "Gossip")
            check_gossip(request)
        except Exception as error:
            await _abort(context, error, self.metrics)
        context.set_compression(grpc.Compression.Gzip)
        return self.membership.handle(request, source=peer_host(context.peer()))

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoReply:
        try:
            self._charge(self._caller(context), "Info")
            executor = self._executor()
        except Exception as error:
            await _abort(context, error, self.metrics)
        span = executor.span
        return pb.InfoReply(
            protocol_version=contract.PROTOCOL_VERSION,
            node_id=self.identity.node_id,
            model_id=self.identity.model_id,
            config_hash=self.identity.config_hash,
            start=span.start,
            end=span.end,
            num_layers=self.identity.num_layers,
            hidden_size=executor.hidden_size,
            dtype=self.identity.dtype,
            device=self.identity.device,
            free_cache_tokens=max(executor.sessions.free_tokens, 0),
            max_length=executor.max_length,
            metadata=codec.pack_metadata({
                "sessions": len(executor.sessions), "name": self.identity.name, "state": self.serving.state,
                "throughput": self.serving.throughput, "prefill_throughput": self.serving.prefill_throughput,
                "started_at": self.serving.started_at, "push": self.push_enabled,
                "passes": executor.passes, "batched_steps": executor.batched_steps, "quant": self.identity.quant,
                "numerics": executor.numerics(),  # exact | fast: the products' numerics (docs/performance.md)
                "adapters": sorted(executor.adapters),
                "packed": executor.layout.packed_share() if executor.layout is not None else 0.0,
                "exact": executor.exact_formats(),  # matrices held in each exact narrow form (model/exact.py)
                "memory": self.serving.memory() if self.serving.memory is not None else {},  # bytes, node/metrics.py
            }),
        )

    async def Forward(self, request: pb.ForwardRequest, context) -> pb.ForwardReply:
        try:
            self._charge(self._caller(context), "Forward")
            executor = self._executor()
            dtype = codec.wire_dtype(request.wire_dtype or request.hidden.dtype)
            out = await executor.forward(
                request.start,
                request.end,
                codec.decode_tensor(request.hidden, "hidden"),
                codec.optional_tensor(request, "position_ids"),
                codec.optional_tensor(request, "attention_mask"),
                dtype,
                executor.max_length,
                _adapter(codec.unpack_metadata(request.metadata)),
                codec.optional_tensor(request, "prompts"),
            )
            reply = pb.ForwardReply(hidden=codec.encode_hidden(out, request.wire_dtype or request.hidden.dtype))
            if self.metrics is not None:
                self.metrics.forward(len(request.hidden.data), len(reply.hidden.data))
            return reply
        except Exception as error:
            await _abort(context, error, self.metrics)

    async def Backward(self, request: pb.BackwardRequest, context) -> pb.BackwardReply:
        """Training: recompute a stateless pass with autograd on its inputs; return their gradients."""
        try:
            self._charge(self._caller(context), "Backward")
            executor = self._executor()
            wire = request.wire_dtype or request.hidden.dtype
            grad_input, grad_prompts = await executor.backward(
                request.start,
                request.end,
                codec.decode_tensor(request.hidden, "hidden"),
                codec.decode_tensor(request.grad_output, "grad_output"),
                codec.optional_tensor(request, "position_ids"),
                codec.optional_tensor(request, "attention_mask"),
                codec.wire_dtype(wire),
                executor.max_length,
                _adapter(codec.unpack_metadata(request.metadata)),
                codec.optional_tensor(request, "prompts"),
            )
            reply = pb.BackwardReply(grad_input=codec.encode_hidden(grad_input, wire))
            if grad_prompts is not None:
                reply.grad_prompts.CopyFrom(codec.encode_hidden(grad_prompts, wire))
            if self.metrics is not None:
                received = len(request.hidden.data) + len(request.grad_output.data) + len(request.prompts.data)
                self.metrics.forward(received, len(reply.grad_input.data) + len(reply.grad_prompts.data))
            return reply
        except Exception as error:
            await _abort(context, error, self.metrics)

    async def Inference(self, requests: AsyncIterator[pb.SessionRequest], context) -> None:
        """One hop of one session. A reader task queues the client's requests; Push queues pushed steps
        on the same inbox; this handler runs them in arrival order and writes one reply per step.

        Replies go out with `context.write` rather than from a generator: a cancellation while a reply
        is being sent then lands in this coroutine, and `finally` frees the session at once."""
        stream = _Stream(self._caller(context))
        executor = None
        reader = None
        try:
            executor = self._executor()
            reader = asyncio.ensure_future(_read(requests, stream))
            while True:
                kind, item = await stream.inbox.get()
                if kind == "end":
                    break
                if kind == "error":
                    raise item
                if self.serving.executor is not executor:
                    raise Unavailable("this node moved to other layers; re-route the session")
                if self.serving.draining:
                    # finish nothing new: the client moves this session to another node (it keeps the history)
                    raise Unavailable("this node is draining; move the session to another node")
                if kind == "push":
                    await self._run(executor, stream.session, item, context)
                    continue
                request = item
                kind = request.WhichOneof("kind")
                if kind == "open":
                    self._charge(stream.peer, kind)
                    if stream.session is not None:
                        raise InvalidRequest("this stream already has an open session")
                    opened = request.open
                    check_id(opened.session_id, "session_id")
                    metadata = codec.unpack_metadata(opened.metadata)
                    session = await executor.admit(  # waits a bounded time for room if the node is full
                        opened.session_id,
                        opened.start,
                        opened.end,
                        opened.batch_size or 1,
                        opened.max_length,
                        codec.wire_dtype(opened.wire_dtype or "float32"),
                        _adapter(metadata),
                        peer=stream.peer,  # the per-peer quotas count it against its caller
                    )
                    session.wire = opened.wire_dtype or "float32"
                    session.handler = asyncio.current_task()
                    stream.session = session
                    self._streams[session.session_id] = stream
                    await context.write(pb.SessionReply(opened=pb.Opened(
                        session_id=session.session_id, max_length=session.max_length, push=self.push_enabled)))
                elif kind == "step":
                    if stream.session is None:
                        raise FailedPrecondition("send `open` before the first step")
                    if not await self._refused(stream, request.step, context):
                        await self._run(executor, stream.session, request.step, context)
                else:
                    raise InvalidRequest("empty SessionRequest: set one of open, step, close")
        except asyncio.CancelledError:
            session = stream.session
            if session is None or not session.evicted:
                raise  # the client went away
            # evicted (drain, idle): end the stream with a status the client fails over on
            self._free(stream, executor)
            await _abort(
                context, Unavailable(f"session evicted: {session.evicted}; move it to another node"), self.metrics
            )
        except Exception as error:
            self._free(stream, executor)
            await _abort(context, error, self.metrics)
        finally:
            self._free(stream, executor)  # no await before the session is freed: a second cancel must not skip it
            if reader is not None:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

    def _free(self, stream: "_Stream", executor: Executor | None) -> None:
        """Forget the stream's session and give its cache back (again: a no-op). Done before an error status goes
        out, not after: a client told to fail over may open again at once, and must find the room."""
        stream.closed = True
        if stream.session is not None:
            if self._streams.get(stream.session.session_id) is stream:
                del self._streams[stream.session.session_id]
            executor.close(stream.session.session_id)

    async def _refused(self, stream: "_Stream", step: pb.Step, context) -> bool:
        """Charge a client's step to the rate limit. Over it, the step is refused with a result of its own (`refused`,
        `retry_after_ms`) and the session lives on unchanged: the client backs off and sends it again. So are the
        steps queued behind a refused one that no longer fit the session's cache. Returns whether it was refused."""
        session = stream.session
        try:
            if stream.refusing and step.position > session.position:
                raise RateLimited(f"step {step.step_id} refused: an earlier step of this session was refused "
                                  f"(--rate-limit); the session holds {session.position} tokens", stream.refusing)
            self._charge(stream.peer, "step")
        except RateLimited as refusal:
            stream.refusing = max(refusal.retry_after, 0.001)
            if self.metrics is not None:
                self.metrics.error(grpc.StatusCode.RESOURCE_EXHAUSTED.name)
            await context.write(pb.SessionReply(result=pb.StepResult(
                step_id=step.step_id, position=session.position, refused=details(refusal.message),
                retry_after_ms=max(1, round(refusal.retry_after * 1000)))))
            return True
        stream.refusing = 0.0
        return False

    async def _run(self, executor: Executor, session: Session, step: pb.Step, context) -> None:
        """Run one step (the client's or a pushed one) and answer it; hand its output on if it carries a push list.

        The handover to the next node sets off first (it is on the token's path; in a convoy, with the convoy's
        other outputs) and this hop's reply goes out while the next node accepts the step, not after: the client
        reads every hop's result before its next step, so a reply held for the handover's round trip cost a
        whole extra one-way delay per token over a WAN (5 instead of 4 trips through 3 nodes). If the handover
        fails, a second, small result for the same step follows, with `push_error` set: the client learns where
        the chain broke without a deadline."""
        if step.push:
            if not self.push_enabled:
                raise FailedPrecondition("this node does not forward pushed steps; send each hop its step")
            push.check_targets(step.push)
            check_push_targets(step.push)
            _check_unprompted(step)
        started = time.perf_counter()
        # where the output goes: the next node, or this stream's client (results of one pass to one client process
        # share its channel, hence its peer address and port)
        convoy = Convoy.of(step.convoy, step.convoy_size, step.push[0].address if step.push else context.peer())
        out = await executor.step(
            session,
            codec.decode_tensor(step.hidden, "hidden"),
            codec.optional_tensor(step, "position_ids"),
            codec.optional_tensor(step, "attention_mask"),
            step.position,
            codec.optional_tensor(step, "prompts"),
            convoy,
        )
        seconds = time.perf_counter() - started
        hidden = codec.encode_hidden(out, session.wire)
        reply = pb.SessionReply(result=pb.StepResult(hidden=hidden, step_id=step.step_id, position=session.position,
                                                     compute_ms=seconds * 1000))
        if convoy.leaves is not None and not step.push:
            reply.result.convoy, reply.result.convoy_size = convoy.leaves
        if self.metrics is not None:
            sent = len(hidden.data) * (2 if step.push else 1)
            self.metrics.step(out.shape[1], seconds, len(step.hidden.data), sent)
        if not step.push:
            await context.write(reply)
            return
        under_way = asyncio.get_running_loop().create_future()
        handover = asyncio.ensure_future(self.pusher.forward(hidden, step, convoy.leaves, under_way))
        try:
            # the handover (with the rest of its convoy) sets off first: it is on the token's path
            await asyncio.wait((under_way, handover), return_when=asyncio.FIRST_COMPLETED)
            await context.write(reply)  # before the failure notice, which precedes later results
            error = await handover
        finally:
            handover.cancel()  # only if the stream was cancelled meanwhile
        if self.metrics is not None:
            self.metrics.handover(not error)
        if error:
            log.info("session %s: %s", session.session_id, error)
            await context.write(pb.SessionReply(result=pb.StepResult(step_id=step.step_id, position=session.position,
                                                                     push_error=error)))

    async def Push(self, request: pb.PushRequest, context) -> pb.PushReply:
        """Accept a step handed over by the previous hop into one of this node's sessions.

        Returns once the step is queued on that session's stream (its result goes to the client there);
        a step that cannot be accepted gets a status here, for the pushing node to report."""
        if not self.push_enabled:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node does not accept pushed steps")
        try:
            self._accept_push(self._executor(), request)
            return pb.PushReply()
        except Exception as error:
            await _abort(context, error, self.metrics)

    async def PushMany(self, request: pb.PushManyRequest, context) -> pb.PushManyReply:
        """Push for several steps at once (the previous node's outputs of one pass that come here): each is
        accepted or refused on its own, in order, and its outcome says which status Push would have answered."""
        if not self.push_enabled:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node does not accept pushed steps")
        try:
            if len(request.steps) > push.MAX_PUSH_MANY:
                raise InvalidRequest(
                    f"{len(request.steps)} steps in one PushMany exceed the limit of {push.MAX_PUSH_MANY}"
                )
            executor = self._executor()
        except Exception as error:
            await _abort(context, error, self.metrics)
        reply = pb.PushManyReply()
        for one in request.steps:
            outcome = reply.outcomes.add()
            try:
                self._accept_push(executor, one)
            except Exception as error:
                code, message = _status(error)
                if self.metrics is not None:
                    self.metrics.error(code.name)
                outcome.code, outcome.message = code.name, details(message)
        return reply

    def _accept_push(self, executor: Executor, request: pb.PushRequest) -> None:
        """Queue a pushed step on its session's stream, or raise why not."""
        if self.serving.draining:
            raise Unavailable("this node is draining; move the session to another node")
        check_id(request.session_id, "session_id")
        session = executor.sessions.get(request.session_id)
        stream = self._streams.get(request.session_id)
        if stream is None or stream.session is not session or stream.closed:
            raise NotFound(f"session {request.session_id!r} has no open stream on this node")
        self._charge(stream.peer, "Push")  # the session's client pays, not the node handing it over
        step = request.step
        _check_pushed(step, executor, session)
        if step.step_id <= stream.last_step_id:
            raise FailedPrecondition(
                f"stale step {step.step_id}: session {request.session_id!r} has already seen step {stream.last_step_id}"
            )
        if stream.inbox.full() or stream.queueing:  # a client's step waiting for room goes first
            raise Exhausted(f"session {request.session_id!r} already has {MAX_QUEUED_STEPS} steps waiting")
        if step.position > stream.next_position:  # refused here, so the session itself lives on
            raise FailedPrecondition(
                f"pushed step {step.step_id} starts at position {step.position} but session "
                f"{request.session_id!r} will hold {stream.next_position} tokens (an earlier step was not handed on)"
            )
        stream.last_step_id = step.step_id
        stream.next_position = step.position + _tokens(step)
        stream.inbox.put_nowait(("push", step))

    async def Probe(self, request: pb.ProbeRequest, context) -> pb.ProbeReply:
        """`potluck doctor`: does `address` answer a gRPC health check from here? (node/rpc/probe.py)"""
        arrived = time.time()
        try:
            caller = self._caller(context)
            self._charge(caller, "Probe")
            if not request.address:
                return pb.ProbeReply(time=arrived)
            reachable, detail = await self.prober.probe(request.address, address_of(caller))
        except Exception as error:
            await _abort(context, error, self.metrics)
        return pb.ProbeReply(reachable=reachable, detail=detail, time=arrived)

    async def ModelFile(self, request: pb.ModelFileRequest, context) -> AsyncIterator[pb.ModelFileChunk]:
        """The client's files (config, tokenizer, client parts) from this node's folder (node/rpc/model_files.py)."""
        try:
            self._charge(peer_host(context.peer()), "ModelFile")
            if self.model_files is None:
                raise NotFound("this node serves no model files")
            size, chunks = self.model_files.open(request.name)
        except Exception as error:
            await _abort(context, error, self.metrics)
        async for data in chunks:
            yield pb.ModelFileChunk(data=data, size=size)

    async def close(self) -> None:
        """Close the channels to push targets (after the server has stopped)."""
        await self.pusher.close()


class _Stream:
    """One Inference stream: its session, and the steps waiting to run (the client's and pushed ones)."""

    def __init__(self, peer: str) -> None:
        self.peer = peer  # the client's address (without port): what the rate limit charges
        self.session: Session | None = None
        self.inbox: asyncio.Queue[tuple[str, object]] = asyncio.Queue(MAX_QUEUED_STEPS)  # bounded: memory too
        self.last_step_id = -1  # highest step id seen; a pushed step must be above it (older ones are stale)
        self.next_position = 0  # tokens the session holds once the steps queued so far have run
        self.queueing = False  # the reader waits for room in the inbox (a full one) to queue a client's request
        self.refusing = 0.0  # after a step refused over the rate limit: its retry_after (0: none refused)
        self.closed = False


async def _read(requests: AsyncIterator[pb.SessionRequest], stream: _Stream) -> None:
    """Queue the client's requests on the stream's inbox until it closes (or half-closes) the stream."""
    try:
        async for request in requests:
            if request.WhichOneof("kind") == "close":
                break
            # a full inbox stops reading (gRPC flow control holds the client); no pushed step may pass this one
            # meanwhile
            stream.queueing = True
            await stream.inbox.put(("request", request))
            stream.queueing = False
            if request.WhichOneof("kind") == "step":  # only once queued: a pushed step checked against it comes after
                stream.last_step_id = max(stream.last_step_id, request.step.step_id)
                stream.next_position = request.step.position + _tokens(request.step)
    except Exception as error:  # the handler raises it, in order, after the requests before it
        await stream.inbox.put(("error", error))
        return
    await stream.inbox.put(("end", None))


def _adapter(metadata: dict) -> str | None:
    """The LoRA adapter a request's metadata names (OpenSession, ForwardRequest); None: the base model."""
    name = metadata.get("adapter")
    if name is not None and not isinstance(name, str):
        raise InvalidRequest(f"metadata 'adapter' must be a string, got {type(name).__name__}")
    return name or None


def _tokens(step: pb.Step) -> int:
    """Tokens per sequence in a step ([batch, tokens, hidden]; 0 for a malformed shape, checked later)."""
    shape = step.hidden.shape
    return int(shape[1]) if len(shape) == 3 and shape[1] >= 0 else 0


def _check_unprompted(step: pb.Step) -> None:
    """Deep prompts are one hop's slice: a step that carries them is not handed on (the client sends each hop its
    own)."""
    if step.HasField("prompts"):
        raise InvalidRequest("a step with prompts cannot be pushed: send each hop its own step with its slice")


def _check_pushed(step: pb.Step, executor: Executor, session: Session) -> None:
    """What the pushing node can be told at once (the executor checks the rest when the step runs)."""
    push.check_targets(step.push)
    check_push_targets(step.push)
    _check_unprompted(step)
    codec.optional_tensor(step, "position_ids")
    codec.optional_tensor(step, "attention_mask")
    executor.check_hidden(codec.decode_tensor(step.hidden, "hidden"), session.batch_size, session.wire_dtype)
