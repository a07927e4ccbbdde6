"""The thin gRPC servicer: decode, validate, call the executor, encode. Errors -> status codes here only."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from node.metrics import NodeMetrics
from node.rpc import codec
from node.rpc.generated import potluck_pb2 as pb
from node.rpc.generated import potluck_pb2_grpc as pb_grpc
from node.runtime.errors import FailedPrecondition, InvalidRequest, RequestError, Unavailable
from node.runtime.executor import Executor

log = logging.getLogger(__name__)


@dataclass
class Serving:
    """The executor now serving (None while the node joins or moves), and what Info reports live."""

    executor: Executor | None = None
    state: str = "JOINING"
    throughput: float = 0.0
    prefill_throughput: float = 0.0
    started_at: float = field(default_factory=time.time)  # for uptime in Info and records

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


async def _abort(context: grpc.aio.ServicerContext, error: Exception, metrics: NodeMetrics | None) -> None:
    if isinstance(error, RequestError):
        code, message = getattr(grpc.StatusCode, error.kind), error.message
    elif isinstance(error, codec.CodecError):
        code, message = grpc.StatusCode.INVALID_ARGUMENT, str(error)
    else:
        log.exception("internal error")
        code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"
    if metrics is not None:
        metrics.error(code.name)
    await context.abort(code, message)


class PotluckServicer(pb_grpc.PotluckServicer):
    def __init__(self, serving: Serving, identity: NodeIdentity, membership=None, metrics: NodeMetrics | None = None):
        self.serving = serving
        self.identity = identity
        self.membership = membership
        self.metrics = metrics  # None: record nothing

    def _executor(self) -> Executor:
        executor = self.serving.executor
        if executor is None:
            raise Unavailable("this node is joining (loading its layers); try again shortly")
        return executor

    async def Gossip(self, request: pb.GossipRequest, context) -> pb.GossipReply:
        if self.membership is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node does not gossip")
        return self.membership.handle(request)

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoReply:
        try:
            executor = self._executor()
        except Exception as error:
            await _abort(context, error, self.metrics)
        span = executor.span
        return pb.InfoReply(
            protocol_version=codec.PROTOCOL_VERSION,
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
                "started_at": self.serving.started_at,
            }),
        )

    async def Forward(self, request: pb.ForwardRequest, context) -> pb.ForwardReply:
        try:
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
            )
            reply = pb.ForwardReply(hidden=codec.encode_hidden(out, request.wire_dtype or request.hidden.dtype))
            if self.metrics is not None:
                self.metrics.forward(len(request.hidden.data), len(reply.hidden.data))
            return reply
        except Exception as error:
            await _abort(context, error, self.metrics)

    async def Inference(self, requests: AsyncIterator[pb.SessionRequest], context) -> AsyncIterator[pb.SessionReply]:
        session = None
        executor = None
        try:
            executor = self._executor()
            async for request in requests:
                if self.serving.executor is not executor:
                    raise Unavailable("this node moved to other layers; re-route the session")
                kind = request.WhichOneof("kind")
                if self.serving.draining and kind != "close":
                    # finish nothing new: the client moves this session to another node (it keeps the history)
                    raise Unavailable("this node is draining; move the session to another node")
                if kind == "open":
                    if session is not None:
                        raise InvalidRequest("this stream already has an open session")
                    opened = request.open
                    codec.unpack_metadata(opened.metadata)
                    session = executor.open(
                        opened.session_id,
                        opened.start,
                        opened.end,
                        opened.batch_size or 1,
                        opened.max_length,
                        codec.wire_dtype(opened.wire_dtype or "float32"),
                    )
                    session.wire = opened.wire_dtype or "float32"
                    session.handler = asyncio.current_task()
                    yield pb.SessionReply(opened=pb.Opened(session_id=session.session_id, max_length=session.max_length))
                elif kind == "step":
                    if session is None:
                        raise FailedPrecondition("send `open` before the first step")
                    step = request.step
                    started = time.perf_counter()
                    out = await executor.step(
                        session,
                        codec.decode_tensor(step.hidden, "hidden"),
                        codec.optional_tensor(step, "position_ids"),
                        codec.optional_tensor(step, "attention_mask"),
                        step.position,
                    )
                    seconds = time.perf_counter() - started
                    reply = pb.SessionReply(
                        result=pb.StepResult(hidden=codec.encode_hidden(out, session.wire), step_id=step.step_id,
                                             position=session.position, compute_ms=seconds * 1000)
                    )
                    if self.metrics is not None:
                        self.metrics.step(out.shape[1], seconds, len(step.hidden.data), len(reply.result.hidden.data))
                    yield reply
                elif kind == "close":
                    break
                else:
                    raise InvalidRequest("empty SessionRequest: set one of open, step, close")
        except asyncio.CancelledError:
            if session is None or not session.evicted:
                raise  # the client went away
            # evicted (drain, idle): end the stream with a status the client fails over on
            await _abort(context, Unavailable(f"session evicted: {session.evicted}; move it to another node"), self.metrics)
        except Exception as error:
            await _abort(context, error, self.metrics)
        finally:
            if session is not None:
                executor.close(session.session_id)
