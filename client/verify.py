"""Verification of peers' outputs: recompute hops on other nodes and compare.

For each hop of a session the verifier keeps a shadow: streams over the same layers on other nodes (one
node serving them all where there is one, else a chain). At a check it sends the shadow, as one merged step, every
input of the hop the shadow has
not seen yet (each hop's history, see client/session.py), and compares the shadow's outputs with what
the hop returned for all those steps, token by token, within a tolerance set by the dtypes involved.
So a check covers every step since the previous one, not only the step that triggered it.

- "full" checks after every step, before the step's output leaves the session; "spot" checks after a
  random share of steps (gaps drawn uniformly from 1 .. 2/fraction - 1: a lie is caught at most that
  many steps after it was told) and once more when generation ends (`settle`).
- A disagreement is settled by a referee: a third chain over the layers, on nodes that are neither the
  hop's nor the shadow's, fed the hop's whole history. The side the referee disagrees with is wrong;
  if it agrees with neither, or there is no third node, VerificationError (the client cannot tell).
- A hop caught lying is convicted (the swarm client bans it for good and reports a signed strike) and
  replaced like a failed hop (re-route, replay its history). If its first wrong output belongs to the
  step in progress, every hop from it on rewinds that step and runs it again with the right input, so
  the step's final output is right (always the case in full mode). If an earlier, already used step
  was wrong, the session raises VerificationRestart: `generate` starts again without the liar.
- The cost: each verified hop's layers run twice (the shadow's merged steps are prefills, cheap per
  token); full mode adds one round trip per step (all hops' shadows run at once), spot mode one per
  check. A hop no other node serves is not verified (logged once, counted in `stats`)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from client.routing import Hop, MissingLayersError, weights_kind
from client.session import HopStream, _merged_history
from client.transport import PeerError
from common.wire import codec
from common.wire.generated import potluck_pb2 as pb

log = logging.getLogger(__name__)

# The largest relative difference (per token: L2 norm of the difference / mean L2 norm of the outputs)
# two honest nodes may show for the same inputs: by the session's wire format (per hop of the longer
# chain compared: each hop boundary rounds to it once more) and by each node's compute dtype; the
# loosest one involved wins. Measured maxima on SmolLM2 (docs/reliability.md): fp32 0; with one more
# boundary on one side, wire fp16 0.0009, bf16 0.010, int8 0.11 (0 with the same boundaries); compute
# fp16 0.014, bf16 0.11 (against fp32 nodes).
WIRE_TOLERANCE = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 3e-2, "int8": 0.15}
COMPUTE_TOLERANCE = {"float32": 1e-3, "float16": 0.05, "bfloat16": 0.3}
# Quantised weights (node/model/quant.py) when the two sides' quantisations differ (the same quantisation on
# both sides runs the same weights: only the tolerances above apply). Measured on SmolLM2, all 30 layers in one
# hop, 256 tokens of node/bench/eval-text.txt against float32: int8 max 0.049, nf4 max 0.48 (docs/quantization.md).
# A liar's noise below these passes unseen, so shadows with the hop's own quantisation are preferred.
# "fast": unquantised weights multiplied in llama.cpp's numerics (`--numerics fast`): SmolLM2, 10 layers a hop,
# 256 tokens of node/bench/eval-text.txt against exact, max 0.029 (docs/performance.md#fast-numerics).
QUANT_TOLERANCE = {"int8": 0.15, "nf4": 1.0, "fast": 0.1}
SHADOW_ATTEMPTS = 3  # shadows or referees tried per check before the hop counts as unverified


class VerificationError(RuntimeError):
    """Nodes disagree about a hop's output and nothing settles which of them is wrong."""


class VerificationRestart(RuntimeError):
    """A node was caught lying in a step whose output was already used: the session's earlier outputs may
    be wrong. The liar is banned and reported; start the generation again (`generate` does so itself)."""


class Referees(Protocol):
    """What the verifier needs from the swarm client (client/swarm.py)."""

    async def alternatives(self, start: int, end: int, avoid: set[str], quant: str | None = None) -> list[Hop]: ...
    async def convict(self, hop: Hop, reason: str) -> None: ...


def tolerance(wire: str, *compute: str, hops: int = 1, quants: tuple[str, ...] = ()) -> float:
    """The tolerance for outputs sent in `wire` format through chains of up to `hops` hops by nodes computing
    in `compute` dtypes (unknown ones are ignored), whose weights are quantised as `quants` (counted only when
    they differ)."""
    kinds = {quant or "none" for quant in quants}
    quantised = [QUANT_TOLERANCE.get(quant, max(QUANT_TOLERANCE.values())) for quant in kinds - {"none"}]
    return max([WIRE_TOLERANCE.get(wire, WIRE_TOLERANCE["float32"]) * max(hops, 1)]
               + [COMPUTE_TOLERANCE[dtype] for dtype in compute if dtype in COMPUTE_TOLERANCE]
               + (quantised if len(kinds) > 1 else []))


def relative_errors(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, tokens] relative L2 differences of two [batch, tokens, hidden] outputs; padding (mask 0) is 0,
    anything non-finite or of another shape is inf."""
    if ours.shape != theirs.shape:
        return torch.full(ours.shape[:2], float("inf"))
    a, b = ours.float(), theirs.float()
    scale = (a.norm(dim=-1) + b.norm(dim=-1)) / 2
    errors = (a - b).norm(dim=-1) / scale.clamp_min(1e-12)
    errors = torch.nan_to_num(errors, nan=float("inf"), posinf=float("inf"))
    if mask is not None:
        errors = torch.where(mask.to(torch.bool), errors, torch.zeros_like(errors))
    return errors


def first_disagreement(errors: torch.Tensor, limit: float) -> int | None:
    """The first token (column) where some row's error exceeds `limit`, or None."""
    bad = (errors > limit).any(dim=0).nonzero()
    return int(bad[0, 0]) if len(bad) else None


@dataclass
class VerifyStats:
    checks: int = 0              # checks run (each covers every hop's steps since the previous one)
    compared_tokens: int = 0     # hop outputs compared (tokens x hops)
    unverified_tokens: int = 0   # hop outputs no other node could recompute
    max_error: float = 0.0       # largest relative difference between outputs that were accepted
    caught: list[str] = field(default_factory=list)  # addresses of nodes caught returning wrong outputs


class _Chain:
    """Streams over one hop's layers on other nodes, fed that hop's history lazily."""

    def __init__(self, streams: list[HopStream]):
        self.streams = streams
        self.fed = 0  # history entries of the hop this chain has run

    @property
    def addresses(self) -> set[str]:
        return {stream.peer.address for stream in self.streams}

    def __str__(self) -> str:
        return "+".join(stream.peer.address for stream in self.streams)

    async def run(self, session, history: list[pb.Step], end: int) -> torch.Tensor:
        """Run history[fed:end] as one step; the outputs of those tokens."""
        steps = history[self.fed : end]
        hidden, positions, mask = _merged_history(steps)
        message, pos = codec.encode_tensor(hidden), codec.encode_tensor(positions)
        mask_message = codec.encode_tensor(mask) if mask is not None else None
        step_id = next(session._step_ids)
        for stream in self.streams:
            stream.position = steps[0].position  # rewinds, if this chain saw a step that was later redone
            deadline = session.router.deadline(stream.hop, hidden.shape[1])
            result = await stream.step(message, pos, mask_message, deadline, step_id)
            stream.history.clear()  # a shadow is never replayed
            message = result.hidden
        self.fed = end
        return codec.decode_tensor(message, "hidden")

    async def close(self) -> None:
        await asyncio.gather(*(stream.close() for stream in self.streams), return_exceptions=True)


@dataclass
class _Watch:
    checked: int = 0               # history entries of the hop verified so far
    shadow: _Chain | None = None


@dataclass
class _Caught:
    stream: HopStream
    entry: int      # the hop's first wrong history entry
    current: bool   # that entry is the step in progress (its output not used yet)
    reason: str


def _tokens(steps: list[pb.Step]) -> list[int]:
    return [int(step.hidden.shape[1]) for step in steps]


def _mask(steps: list[pb.Step]) -> torch.Tensor | None:
    """The attention mask of these steps' tokens, [batch, tokens] (None: no padding anywhere)."""
    masks = [codec.optional_tensor(step, "attention_mask") for step in steps]
    if all(mask is None for mask in masks):
        return None
    shapes = [(int(step.hidden.shape[0]), int(step.hidden.shape[1])) for step in steps]
    return torch.cat([mask if mask is not None else torch.ones(shape, dtype=torch.int64)
                      for mask, shape in zip(masks, shapes)], dim=1)


class Verifier:
    def __init__(self, referees: Referees, mode: str, fraction: float = 0.25, wire_dtype: str = "float32",
                 rng: random.Random | None = None):
        if mode not in ("spot", "full"):
            raise ValueError(f"verify mode {mode!r} is not spot or full")
        self.referees = referees
        self.mode = mode
        self.fraction = fraction
        self.wire_dtype = wire_dtype
        self.rng = rng or random.Random()
        self.stats = VerifyStats()
        self._watches: dict[HopStream, _Watch] = {}
        self._avoid: set[str] = set()       # nodes that failed this session as shadows or referees
        self._unserved: set[tuple[int, int]] = set()  # layer ranges already logged as unverifiable
        self._countdown = self._gap()

    def _gap(self) -> int:
        return self.rng.randint(1, max(1, round(2 / self.fraction) - 1))

    # -- the session's hooks ----------------------------------------------------------------------
    async def after_step(self, session, message: pb.Tensor) -> pb.Tensor:
        """Called once a step went through every hop; returns its (possibly recomputed) final output."""
        if self.mode == "spot":
            self._countdown -= 1
            if self._countdown > 0:
                return message
            self._countdown = self._gap()
        return await self._verify(session, message, in_progress=True)

    async def settle(self, session) -> None:
        """Check every step not verified yet (the session's outputs have all been used)."""
        await self._verify(session, None, in_progress=False)

    async def close(self) -> None:
        watches, self._watches = list(self._watches.values()), {}
        await asyncio.gather(*(w.shadow.close() for w in watches if w.shadow is not None), return_exceptions=True)

    def cut(self, stream: HopStream) -> None:
        """The session took tokens back (a rewind, client/session.py) and `stream`'s history now ends sooner. What was
        checked stays checked (an entry cut short keeps its first tokens, checked with it); the shadow goes on from
        the first entry not checked, and its nodes drop the later tokens when it runs that entry."""
        watch = self._watches.get(stream)
        if watch is None:
            return
        watch.checked = min(watch.checked, len(stream.history))
        if watch.shadow is not None:
            watch.shadow.fed = min(watch.shadow.fed, watch.checked)

    # -- checking ---------------------------------------------------------------------------------
    async def _verify(self, session, message, in_progress: bool):
        while True:
            await self._forget_gone(session)
            self.stats.checks += 1
            verdicts = await asyncio.gather(*(self._check(session, stream) for stream in session.hops),
                                            return_exceptions=True)  # every check ends before anything is raised
            for verdict in verdicts:
                if isinstance(verdict, BaseException):
                    raise verdict
            caught = [verdict for verdict in verdicts if verdict is not None]
            if not caught:
                return message
            for verdict in caught:
                self.stats.caught.append(verdict.stream.peer.address)
                await self.referees.convict(verdict.stream.hop, verdict.reason)
            if not in_progress or not all(verdict.current for verdict in caught):
                raise VerificationRestart(
                    "; ".join(f"{v.stream.peer.address} returned wrong activations for layers "
                              f"{v.stream.hop.start}:{v.stream.hop.end} ({v.reason})" for v in caught)
                    + ": outputs already used may be wrong")
            message = await self._redo(session, caught)

    async def _check(self, session, stream: HopStream) -> _Caught | None:
        """Compare the hop's unverified outputs with its shadow's; settle a disagreement with a referee."""
        watch = self._watches.setdefault(stream, _Watch())
        end = len(stream.history)
        if watch.checked >= end:
            return None
        theirs = await self._shadow_outputs(session, stream, watch, end)
        if theirs is None:
            self._unverified(stream, watch, end)
            return None
        # an entry cut by a rewind keeps its first tokens, and its output covers more: only those count
        ours = torch.cat([codec.decode_tensor(stream.outputs[watch.checked + i], "hidden")[:, :tokens]
                          for i, tokens in enumerate(_tokens(stream.history[watch.checked : end]))], dim=1)
        mask = _mask(stream.history[watch.checked : end])
        theirs = theirs[:, theirs.shape[1] - ours.shape[1] :]
        limit = self._tolerance(stream, watch.shadow)
        errors = relative_errors(ours, theirs, mask)
        if first_disagreement(errors, limit) is None:
            self._accept(stream, watch, end, errors)
            return None
        return await self._dispute(session, stream, watch, end, ours, theirs, mask, limit)

    async def _shadow_outputs(self, session, stream: HopStream, watch: _Watch, end: int) -> torch.Tensor | None:
        for _ in range(SHADOW_ATTEMPTS):
            if watch.shadow is None:
                watch.shadow = await self._chain(session, stream, set())
                if watch.shadow is None:
                    return None
            try:
                return await watch.shadow.run(session, stream.history, end)
            except PeerError as error:
                log.info("shadow %s of %s failed (%s); trying another", watch.shadow, stream.peer.address, error)
                self._avoid.add(error.address)
                await watch.shadow.close()
                watch.shadow = None
        return None

    async def _dispute(self, session, stream: HopStream, watch: _Watch, end: int, ours: torch.Tensor,
                       theirs: torch.Tensor, mask: torch.Tensor | None, limit: float) -> _Caught | None:
        shadow = watch.shadow
        hop = stream.hop
        what = f"layers {hop.start}:{hop.end}"
        referee, judged = None, None
        for _ in range(SHADOW_ATTEMPTS):
            referee = await self._chain(session, stream, shadow.addresses)
            if referee is None:
                break
            try:
                judged = await referee.run(session, stream.history, end)
                break
            except PeerError as error:
                self._avoid.add(error.address)
                await referee.close()
                referee = None
        if referee is None or judged is None:
            raise VerificationError(f"{stream.peer.address} and {shadow} disagree about {what} (relative error "
                                    f"{float(relative_errors(ours, theirs, mask).max()):.3g}, tolerance {limit:.3g}) "
                                    "and no third node could tell which is wrong")
        judged = judged[:, judged.shape[1] - ours.shape[1] :]
        limit = max(limit, self._tolerance(stream, referee))
        hop_errors, shadow_errors = relative_errors(ours, judged, mask), relative_errors(theirs, judged, mask)
        hop_wrong, shadow_wrong = first_disagreement(hop_errors, limit), first_disagreement(shadow_errors, limit)
        if hop_wrong is None:  # the hop agrees with the referee: the shadow is the one that is off
            if shadow_wrong is not None:
                await self._blame(shadow, f"{what}: relative error {float(shadow_errors.max()):.3g} against "
                                          f"{stream.peer.address} and {referee} (tolerance {limit:.3g})")
            await shadow.close()
            watch.shadow = referee
            self._accept(stream, watch, end, hop_errors)
            return None
        await referee.close()
        if shadow_wrong is not None:
            raise VerificationError(f"{stream.peer.address}, {shadow} and {referee} all disagree about {what}")
        entry, token = watch.checked, hop_wrong  # the hop's first wrong entry, from the first wrong token
        for tokens in _tokens(stream.history[watch.checked : end]):
            if token < tokens:
                break
            token -= tokens
            entry += 1
        position = stream.history[entry].position + token
        reason = (f"relative error {float(hop_errors[:, hop_wrong].max()):.3g} at token {position}, tolerance "
                  f"{limit:.3g}; {shadow} and {referee} agree")
        current = entry == end - 1 and stream.history[entry].position == session.position
        return _Caught(stream, entry, current, reason)

    def _tolerance(self, stream: HopStream, chain: _Chain) -> float:
        peers = [stream.hop.peer] + [s.hop.peer for s in chain.streams]
        return tolerance(self.wire_dtype, *(peer.dtype for peer in peers), hops=len(chain.streams),
                         quants=tuple(weights_kind(peer) for peer in peers))

    def _accept(self, stream: HopStream, watch: _Watch, end: int, errors: torch.Tensor) -> None:
        self.stats.compared_tokens += errors.shape[1]
        self.stats.max_error = max(self.stats.max_error, float(errors.max()) if errors.numel() else 0.0)
        self._done(stream, watch, end)

    def _unverified(self, stream: HopStream, watch: _Watch, end: int) -> None:
        self.stats.unverified_tokens += sum(_tokens(stream.history[watch.checked : end]))
        span = (stream.hop.start, stream.hop.end)
        if span not in self._unserved:
            self._unserved.add(span)
            log.warning("no other node serves layers %d:%d: the outputs of %s are not verified",
                        *span, stream.peer.address)
        self._done(stream, watch, end)

    @staticmethod
    def _done(stream: HopStream, watch: _Watch, end: int) -> None:
        for index in range(watch.checked, end):
            stream.outputs.pop(index, None)
        watch.checked = end

    async def _chain(self, session, stream: HopStream, avoid: set[str]) -> _Chain | None:
        """An opened chain over the hop's layers on other nodes (none of `avoid`), or None if there is none."""
        for _ in range(SHADOW_ATTEMPTS):
            exclude = {stream.peer.address} | avoid | self._avoid
            try:
                route = await self.referees.alternatives(stream.hop.start, stream.hop.end, exclude,
                                                         quant=weights_kind(stream.hop.peer))
            except MissingLayersError:
                return None
            streams = [session._stream(hop) for hop in route]
            for other in streams:
                other.outputs = None
            opened = await asyncio.gather(
                *(s.open(session.session_timeout, session.router.deadline(s.hop, 1)) for s in streams),
                return_exceptions=True)
            failed = [error for error in opened if isinstance(error, BaseException)]
            if not failed:
                return _Chain(streams)
            await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)
            for error in failed:
                if not isinstance(error, PeerError):
                    raise error
                self._avoid.add(error.address)
        return None

    async def _blame(self, chain: _Chain, reason: str) -> None:
        """A shadow the referee disagreed with: convict its node; a chain of several cannot be pinned on one."""
        if len(chain.streams) == 1:
            self.stats.caught.append(chain.streams[0].peer.address)
            await self.referees.convict(chain.streams[0].hop, reason)
        else:
            log.warning("the chain %s returned wrong activations (%s); not using its nodes to verify", chain, reason)
            self._avoid |= chain.addresses

    async def _forget_gone(self, session) -> None:
        """Drop the shadows of hops no longer in the route (replaced after a failure)."""
        current = set(session.hops)
        gone = [stream for stream in self._watches if stream not in current]
        for stream in gone:
            watch = self._watches.pop(stream)
            if watch.shadow is not None:
                await watch.shadow.close()

    # -- repair -----------------------------------------------------------------------------------
    async def _redo(self, session, caught: list[_Caught]) -> pb.Tensor:
        """Replace the liars (whose wrong outputs are all from the step in progress) and run that step again
        from the first of them: every later hop rewinds it. Returns the step's new final output."""
        index = {stream: i for i, stream in enumerate(session.hops)}
        first = min(index[verdict.stream] for verdict in caught)
        step = session.hops[first].history[-1]  # the input of the first liar, from honest hops before it
        for stream in session.hops[first:]:
            stream.history.pop()
            stream.outputs.pop(len(stream.history), None)
            stream.position = session.position
            self.cut(stream)
            watch = self._watches.get(stream)
            if watch is not None and watch.shadow is not None:  # it ran the wrong input: start it afresh
                await watch.shadow.close()
                watch.shadow = None
        for verdict in sorted(caught, key=lambda v: index[v.stream], reverse=True):
            error = PeerError(verdict.stream.peer.address, f"returned wrong activations ({verdict.reason})")
            now = time.perf_counter()
            await session._recover(index[verdict.stream], error, now, now)
        pos = step.position_ids if step.HasField("position_ids") else None
        mask = step.attention_mask if step.HasField("attention_mask") else None
        return await session._drive(first, step.hidden, pos, mask, int(step.hidden.shape[1]))
