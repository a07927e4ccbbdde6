"""Differentiable passes through the swarm, for training prompts on the client (docs/finetune.md).

One autograd Function per hop: its forward calls the node's Forward RPC, its backward calls Backward on the
same node with the hop's saved input (the node recomputes its pass with autograd on the inputs only; its
weights stay frozen). A hop that fails is banned and its layers re-routed (SwarmClient.reroute); the new
chain recomputes from the saved input, so the step ends with the same gradients."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
import torch

from client.routing import Hop
from client.session import RECOVERABLE
from client.transport import PeerError
from common.wire import codec
from common.wire.generated import potluck_pb2 as pb

log = logging.getLogger(__name__)


@dataclass
class TrainStats:
    """What training passes cost so far (SwarmClient.train_stats)."""

    forward_calls: int = 0
    backward_calls: int = 0
    bytes_sent: int = 0       # request bytes of Forward and Backward calls (activations, gradients, prompts)
    bytes_received: int = 0
    failovers: int = 0
    route: tuple[str, ...] = ()  # the addresses of the last pass's hops, in order (before any failover)


class RemoteSpan:
    """Layers `[start, end)` of one differentiable pass: the chain now serving them and each hop's input."""

    def __init__(self, swarm, start: int, end: int, route: list[Hop], position_ids, attention_mask):
        self.swarm = swarm
        self.start, self.end = start, end
        self.route = route
        self.position_ids = position_ids
        self.attention_mask = attention_mask
        self.inputs: list[torch.Tensor] = []  # inputs[i]: what route[i] got in the last forward

    def _request(self, kind, hop: Hop, hidden: torch.Tensor, prompts: torch.Tensor | None, **extra):
        wire = self.swarm.config.wire_dtype
        request = kind(start=hop.start, end=hop.end, hidden=codec.encode_hidden(hidden, wire), wire_dtype=wire, **extra)
        if self.swarm.config.adapter is not None:
            request.metadata = codec.pack_metadata({"adapter": self.swarm.config.adapter})
        if self.position_ids is not None:
            request.position_ids.CopyFrom(codec.encode_tensor(self.position_ids.to(torch.int64)))
        if self.attention_mask is not None:
            request.attention_mask.CopyFrom(codec.encode_tensor(self.attention_mask.to(torch.int64)))
        if prompts is not None:
            request.prompts.CopyFrom(codec.encode_hidden(prompts[hop.start - self.start : hop.end - self.start], wire))
        return request

    async def _call(self, method: str, hop: Hop, request):
        stats = self.swarm.train_stats
        stats.bytes_sent += request.ByteSize()
        try:
            peer = await self.swarm._dial(hop.peer.address)
            reply = await getattr(peer.stub, method)(request, timeout=self.swarm.config.step_timeout)
        except grpc.aio.AioRpcError as error:
            raise PeerError.from_rpc(hop.peer.address, error) from None
        stats.bytes_received += reply.ByteSize()
        return reply

    async def _run_chain(self, hidden: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        inputs, x = [], hidden
        for hop in self.route:
            inputs.append(x)
            reply = await self._call("Forward", hop, self._request(pb.ForwardRequest, hop, x, prompts))
            self.swarm.train_stats.forward_calls += 1
            x = codec.decode_tensor(reply.hidden, "hidden").to(hidden.dtype).clone()
        self.inputs = inputs
        return x

    async def _back_chain(self, grad: torch.Tensor, prompts: torch.Tensor | None):
        grad_prompts = torch.zeros_like(prompts) if prompts is not None else None
        for hop, x in reversed(list(zip(self.route, self.inputs))):
            request = self._request(pb.BackwardRequest, hop, x, prompts,
                                    grad_output=codec.encode_hidden(grad, self.swarm.config.wire_dtype))
            reply = await self._call("Backward", hop, request)
            self.swarm.train_stats.backward_calls += 1
            grad = codec.decode_tensor(reply.grad_input, "grad_input").to(x.dtype).clone()
            if prompts is not None:
                if not reply.HasField("grad_prompts"):
                    raise PeerError(hop.peer.address, "Backward sent no grad_prompts for the prompts it got")
                part = codec.decode_tensor(reply.grad_prompts, "grad_prompts").to(prompts.dtype)
                grad_prompts[hop.start - self.start : hop.end - self.start] = part
        return grad, grad_prompts

    async def _recover(self, error: PeerError, attempt: int) -> None:
        """Ban the failed node and re-route these layers, or re-raise if that cannot help."""
        if error.code not in RECOVERABLE or attempt >= self.swarm.config.max_failovers:
            raise error
        log.warning("training pass over layers %d:%d: %s; re-routing", self.start, self.end, error)
        self.route = await self.swarm.reroute(self.start, self.end, error.address)
        self.swarm.train_stats.failovers += 1

    async def forward(self, hidden: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        attempt = 0
        while True:
            try:
                return await self._run_chain(hidden, prompts)
            except PeerError as error:
                attempt += 1
                await self._recover(error, attempt)

    async def backward(self, hidden: torch.Tensor, grad: torch.Tensor, prompts: torch.Tensor | None):
        attempt, recompute = 0, False
        while True:
            try:
                if recompute:  # a new chain: its hops' inputs come from recomputing the pass
                    await self._run_chain(hidden, prompts)
                return await self._back_chain(grad, prompts)
            except PeerError as error:
                attempt += 1
                await self._recover(error, attempt)
                recompute = True


class _HopFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, prompts: torch.Tensor | None, span: RemoteSpan) -> torch.Tensor:
        ctx.span = span
        ctx.has_prompts = prompts is not None
        ctx.save_for_backward(hidden, prompts)
        return span.swarm._loop.run(span.forward(hidden.detach(), prompts.detach() if prompts is not None else None))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, prompts = ctx.saved_tensors
        span: RemoteSpan = ctx.span
        grad_input, grad_prompts = span.swarm._loop.run(span.backward(hidden.detach(), grad.contiguous(), prompts))
        return grad_input, (grad_prompts if ctx.has_prompts else None), None


def remote_forward(swarm, route: list[Hop], hidden: torch.Tensor, position_ids=None, attention_mask=None,
                   prompts: torch.Tensor | None = None) -> torch.Tensor:
    """All layers over `hidden` [batch, tokens, hidden], differentiable w.r.t. `hidden` and the deep `prompts`
    ([num_layers, batch, prompt_tokens, hidden] added at each layer's input, or None)."""
    swarm.train_stats.route = tuple(hop.peer.address for hop in route)
    for hop in route:
        span = RemoteSpan(swarm, hop.start, hop.end, [hop], position_ids, attention_mask)
        part = prompts[hop.start : hop.end] if prompts is not None else None
        hidden = _HopFunction.apply(hidden, part, span)
    return hidden
