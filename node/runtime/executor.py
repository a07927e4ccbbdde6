"""Validates steps and runs them on the span off the event loop.

On the lean path (node/model/lean.py) the steps that arrive while the compute thread is busy are
run together in its next pass (continuous batching over sessions of different lengths); on the
generic path they run one at a time. Over exact compact weights (common/weights/exact.py) a pass of
several steps holds at most KERNEL_ROWS tokens, so that each step's products take the same kernel
alone and batched: a session's outputs are then the same bits whoever shares its passes.

Under load: a step cancelled while it waits for a pass never runs (its session's cache stays as it
was), one cancelled while its pass runs is computed and dropped, and every other step of the pass
gets its result. Whatever fails on the compute thread fails the steps it concerns (and is logged);
a closed session's cache tokens go back to the budget only once no pass uses its cache any more.

A batch window (node/runtime/window.py) gathers the steps of concurrent sessions before a pass:
convoys of steps that left one pass together (common/wire/convoy.py) are run in one pass again, so
every weight is read once per convoy instead of once per session.

A lone decode step (one token, nothing else queued or running on the compute thread, no window to wait for) runs
on the event loop's own thread instead (`inline_decode`): the hand-over to the compute thread and back (two
thread wake-ups) cost more than the loop gives up by computing one token's pass itself, during which it could only
have queued steps for the next pass. Anything else takes the compute thread as before."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from common.weights.exact import KERNEL_ROWS, pass_threads
from common.wire.convoy import Convoy, send_off
from node.model.compact import exact_formats, span_kernels, span_numerics
from node.model.lean import Row
from node.model.loader import release_free_heap
from node.model.span import SpanModel
from node.runtime.errors import Exhausted, FailedPrecondition, Full, InvalidRequest, NotFound, OutOfRange, Unavailable
from node.runtime.layout import AdaptiveLayout
from node.runtime.sessions import Session, SessionTable, kv_bytes_per_token
from node.runtime.window import BATCH_WAIT, BatchWindow

log = logging.getLogger(__name__)


class ComputeError(RuntimeError):
    """Something other than an Exception (a BaseException) ended a pass on the compute thread."""


@dataclass
class _Work:
    """A step waiting for the compute thread."""

    session: Session
    hidden: torch.Tensor
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    position: int
    prompts: torch.Tensor | None = None  # deep prompts of a prefill step (see Executor.step)
    convoy: Convoy | None = None
    future: Future = field(default_factory=Future)

    @property
    def tokens(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]


def _chunks(works: list[_Work], max_tokens: int) -> list[list[_Work]]:
    """Consecutive groups of steps with at most `max_tokens` tokens each (a bigger step goes alone)."""
    chunks, current, size = [], [], 0
    for work in works:
        if current and size + work.tokens > max_tokens:
            chunks.append(current)
            current, size = [], 0
        current.append(work)
        size += work.tokens
    if current:
        chunks.append(current)
    return chunks


class Executor:
    """Owns the span, the open sessions and the compute thread."""

    def __init__(self, span: SpanModel, cache_tokens: int, max_length: int, max_batch: int = 64,
                 max_pass_tokens: int = 4096, *, cache_memory: int | None = None, max_sessions: int = 0,
                 max_session_tokens: int = 0, admission_wait: float = 0.0, adapters: dict | None = None,
                 batch_wait: float = BATCH_WAIT, pack: bool = False, max_peer_sessions: int = 0,
                 max_peer_tokens: int = 0, peer_share: float = 1.0, inline_decode: bool = True):
        self.span = span
        self.adapters = adapters or {}  # LoRA adapters by name (node/model/lora.py), loaded for this span
        self.kv_bytes_per_token = kv_bytes_per_token(span.config, span.end - span.start, span.dtype)  # an estimate
        budget, flag = cache_tokens, "--cache-tokens"
        if cache_memory is not None:  # a budget in bytes replaces the one in tokens
            budget, flag = cache_memory // self.kv_bytes_per_token, "--cache-memory"
            if budget < 1:
                raise ValueError(f"--cache-memory {cache_memory} bytes hold no token of this span's KV cache "
                                 f"({self.kv_bytes_per_token} bytes a token)")
        # one peer's cache tokens: max_peer_tokens, else a share of the budget (node/config.py: half)
        max_peer_tokens = max_peer_tokens or max(1, int(budget * peer_share))
        self.sessions = SessionTable(budget, max_sessions, max_session_tokens, flag, max_peer_sessions,
                                     max_peer_tokens)
        self.admission_wait = admission_wait  # seconds an open (or a step's cache) waits for room: RESOURCE_EXHAUSTED
        self._room_waiters: set[asyncio.Future] = set()  # opens waiting for a session to close
        self.max_length = max_length
        self.max_batch = max_batch
        self.hidden_size = span.config.hidden_size
        # One compute thread: torch uses its own intra-op threads; steps never run concurrently.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="potluck-compute")
        self._jobs = 0  # compute-thread jobs submitted and not finished (submitted on the loop, counted under _lock)
        self.inline_decode = inline_decode  # lone decode steps on the loop's thread (the module's docstring)
        self.inline_passes = 0
        self.lean = span.lean  # None: the generic span, one step at a time
        self.max_pass_tokens = max_pass_tokens
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # a step was queued (the batch window waits on it)
        self.window = BatchWindow(batch_wait)
        self._pending: list[_Work] = []
        self._pass_queued = False
        # CPU float32: the weights packed for MKL while passes carry several rows (node/runtime/layout.py)
        self.layout = AdaptiveLayout.for_span(self.lean, getattr(span, "source", None)) if pack else None
        self._kernels = span_kernels(span)  # exact weights' kernels: a pass's threads (common/weights/exact.py)
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop steps come from (set by the first step)
        self.passes = 0  # lean passes run, and the steps they carried (steps / passes = mean batch)
        self.batched_steps = 0

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:  # steps queued for a pass that will not run now
            pending, self._pending = self._pending, []
        for work in pending:
            if work.future.set_running_or_notify_cancel():
                work.future.set_exception(Unavailable("this node stopped serving these layers; re-route the session"))

    def numerics(self) -> str:
        """"fast" where the span's products run in llama.cpp's numerics (`--numerics fast`), else "exact"."""
        return span_numerics(self.span)

    def exact_formats(self) -> dict[str, int]:
        """How many of the span's matrices are held in each exact narrow form (common/weights/exact.py)."""
        return exact_formats(self.span)

    # -- validation -------------------------------------------------------------------------
    async def settled(self) -> None:
        """Return once the compute thread has done all it was given so far (passes, weight conversions)."""
        await asyncio.wrap_future(self._submit(lambda: None))

    def check_subspan(self, start: int, end: int) -> None:
        if not self.span.start <= start < end <= self.span.end:
            raise InvalidRequest(
                f"layers {start}:{end} are not served here; this node serves {self.span.start}:{self.span.end}"
            )

    def check_hidden(self, hidden: torch.Tensor, batch_size: int | None, wire_dtype: torch.dtype) -> None:
        """Hidden states fit this model (and the session's batch and wire dtype); InvalidRequest if not."""
        if hidden.dim() != 3:
            raise InvalidRequest(
                f"hidden states must be [batch, tokens, {self.hidden_size}], got shape {list(hidden.shape)}"
            )
        if hidden.shape[2] != self.hidden_size:
            raise InvalidRequest(f"hidden size {hidden.shape[2]} does not match the model's {self.hidden_size}")
        if batch_size is not None and hidden.shape[0] != batch_size:
            raise InvalidRequest(f"batch of {hidden.shape[0]} does not match the session's batch_size {batch_size}")
        if hidden.shape[0] < 1 or hidden.shape[1] < 1:
            raise InvalidRequest(f"hidden states are empty: shape {list(hidden.shape)}")
        if hidden.dtype != wire_dtype:
            raise InvalidRequest(f"hidden states are {hidden.dtype} but the wire dtype is {wire_dtype}")

    @staticmethod
    def _check_aux(name: str, tensor: torch.Tensor | None, shape: tuple[int, int], positions: int = 0) -> None:
        """An optional [batch, tokens] integer tensor: position ids within 0..positions-1 (positions > 0),
        else an attention mask of 0 and 1."""
        if tensor is None:
            return
        if tuple(tensor.shape) != shape:
            raise InvalidRequest(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")
        if tensor.dtype.is_floating_point:
            raise InvalidRequest(f"{name} must be an integer tensor, got {tensor.dtype}")
        values = tensor.to(torch.long)
        if positions:
            low, high = int(values.min()), int(values.max())
            if low < 0 or high >= positions:
                raise InvalidRequest(f"{name} must lie within 0..{positions - 1}, got values {low}..{high}")
        elif not bool(((values == 0) | (values == 1)).all()):
            raise InvalidRequest(f"{name} must hold only 0 (padding) and 1 (real token)")

    def adapter(self, name: str | None):
        """The LoRA adapter called `name` (None or "": the base model); NOT_FOUND if this node does not serve it."""
        if not name:
            return None
        try:
            return self.adapters[name]
        except KeyError:
            served = ", ".join(sorted(self.adapters)) or "none"
            raise NotFound(f"adapter {name!r} is not served by this node (its adapters: {served})") from None

    # -- sessions ---------------------------------------------------------------------------
    def open(self, session_id: str, start: int, end: int, batch_size: int, max_length: int, wire_dtype: torch.dtype,
             adapter: str | None = None, peer: str = "") -> Session:
        """A new session of `peer` (the caller, for the per-peer quotas); it reserves cache only as it steps."""
        if not session_id:
            raise InvalidRequest("session_id is empty")
        self.check_subspan(start, end)
        lora = self.adapter(adapter)
        if not 1 <= batch_size <= self.max_batch:
            raise InvalidRequest(f"batch_size {batch_size} is not within 1..{self.max_batch}")
        if not 1 <= max_length <= self.max_length:
            raise OutOfRange(f"max_length {max_length} is not within 1..{self.max_length} (this node's limit)")
        self.sessions.check_room(session_id, batch_size, max_length, peer)  # before the cache takes any memory
        cache = self.span.new_cache(batch_size, max_length, start, end)
        session = Session(session_id, start, end, batch_size, max_length, wire_dtype, cache, adapter=lora, peer=peer)
        self.sessions.add(session)
        return session

    async def admit(self, session_id: str, start: int, end: int, batch_size: int, max_length: int,
                    wire_dtype: torch.dtype, adapter: str | None = None, peer: str = "") -> Session:
        """`open`, waiting up to `admission_wait` seconds for room (other sessions closing) when the node is
        full; RESOURCE_EXHAUSTED at once when the session could never fit."""
        return await self._when_room(lambda: self.open(session_id, start, end, batch_size, max_length, wire_dtype,
                                                       adapter, peer))

    async def _when_room(self, attempt):
        """`attempt()`, tried again whenever a session's cache is released, for up to `admission_wait` seconds while
        it raises Full (then that Full, saying how long it waited)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.admission_wait
        while True:
            try:
                return attempt()
            except Full as error:
                left = deadline - loop.time()
                if left <= 0:
                    waited = (
                        f"; waited {self.admission_wait:g}s for room (--admission-wait)" if self.admission_wait else ""
                    )
                    raise Full(error.message + waited) from None
            waiter = loop.create_future()
            self._room_waiters.add(waiter)
            try:
                await asyncio.wait({waiter}, timeout=left)
            finally:
                self._room_waiters.discard(waiter)

    def _drop(self, session_id: str) -> None:
        """Forget a session; its cache tokens go back to the budget (waking the opens waiting for room) now, or
        once the compute thread is done with its steps (a cancelled step's pass may still write its cache)."""
        with self._lock:
            self.window.forget(session_id)  # a pass need not wait for it any more
            session = self.sessions.retire(session_id)
            if session is None:
                return
            session.closed = True
            if session.computing:
                return  # `_computed` releases it
        self._release(session)

    def _track(self, session: Session, future: Future) -> None:
        """`future` is a step of `session` on the compute thread: its cache is in use until the future is done
        (run, failed, or cancelled before it ran). Called on the event loop."""
        self._loop = asyncio.get_running_loop()
        with self._lock:
            session.computing += 1
        future.add_done_callback(lambda _: self._computed(session))

    def _computed(self, session: Session) -> None:
        """One of `session`'s steps is done with its cache (any thread): release a closed session's tokens once
        none is left."""
        with self._lock:
            session.computing -= 1
            last = session.closed and not session.computing
        if not last:
            return
        if self._loop.is_closed():  # nothing waits for room any more
            self.sessions.release(session)
        else:
            self._loop.call_soon_threadsafe(self._release, session)

    def _release(self, session: Session) -> None:
        """A closed session's cache tokens go back to the budget; the opens waiting for room try again."""
        self.sessions.release(session)
        for waiter in self._room_waiters:
            if not waiter.done():
                waiter.set_result(None)

    def close(self, session_id: str) -> None:
        self._drop(session_id)

    def evict(self, sessions: list[Session], reason: str) -> int:
        """End these sessions' streams with UNAVAILABLE (their handlers free the caches); returns how many."""
        count = 0
        for session in sessions:
            if session.handler is not None and not session.handler.done() and not session.evicted:
                session.evicted = reason
                session.handler.cancel()
                count += 1
        return count

    async def step(
        self,
        session: Session,
        hidden: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position: int,
        prompts: torch.Tensor | None = None,
        convoy: Convoy | None = None,
    ) -> torch.Tensor:
        """Run one step of `session`. `prompts` (deep prompt tuning): [end - start, batch, prompt_tokens, hidden],
        added at each layer's input to the first prompt_tokens positions, as in `forward`; only on a step at
        position 0 (the prefill holding the soft prompt's positions). `convoy`: the convoy the step came in; its
        `leaves` is set once the step ran (lean path only)."""
        self.check_hidden(hidden, session.batch_size, session.wire_dtype)
        tokens = hidden.shape[1]
        if prompts is not None:
            if position != 0:
                raise InvalidRequest(f"prompts are only allowed on a step at position 0 (the prompt's positions), "
                                     f"not at position {position}")
            self._check_prompts(prompts, session.end - session.start, session.batch_size, tokens, session.wire_dtype)
        if position > session.position:
            raise InvalidRequest(f"step says the cache holds {position} tokens but it holds {session.position}")
        # position < session.position rewinds: the client re-sends a step this node already ran (push recovery)
        if position + tokens > session.max_length:
            raise OutOfRange(
                f"step would reach position {position + tokens}, past the session's max_length {session.max_length}"
            )
        self._check_aux("position_ids", position_ids, (session.batch_size, tokens), positions=session.max_length)
        self._check_aux("attention_mask", attention_mask, (session.batch_size, tokens))
        session.busy = True
        try:
            if position + tokens > session.reserved:  # the cache it reaches, reserved as it grows
                await self._when_room(lambda: self.sessions.reserve(session, position + tokens))
            if self.lean is not None:
                return await self._batched(session, hidden, position_ids, attention_mask, position, prompts, convoy)
            future = self._submit(self._run_step, session, hidden, position_ids, attention_mask, position, prompts)
            self._track(session, future)
            return await asyncio.wrap_future(future)
        except Exception:
            self._drop(session.session_id)  # its cache may be half-updated: never reuse it
            raise
        finally:
            session.busy = False
            session.last_used = time.monotonic()

    def _prepare(self, session: Session, hidden, position_ids, attention_mask, position: int):
        """Rewind if asked; then the step's position ids and the 2D mask over past + new tokens (None: no
        padding). Nothing else changes until `_commit`, so a failed pass can be retried."""
        if position < session.position:
            self._rewind(session, position)
        tokens = hidden.shape[1]
        if position_ids is None:
            position_ids = torch.arange(session.position, session.position + tokens).expand(session.batch_size, tokens)
        mask = None
        if attention_mask is not None or session.mask is not None:
            new = (
                torch.ones(session.batch_size, tokens, dtype=torch.long)
                if attention_mask is None
                else attention_mask.to(torch.long)
            )
            past = (
                session.mask
                if session.mask is not None
                else torch.ones(session.batch_size, session.position, dtype=torch.long)
            )
            full = torch.cat([past, new], dim=1)
            mask = None if bool(full.all()) else full
        return position_ids.to(torch.long), mask

    @staticmethod
    def _commit(session: Session, tokens: int, mask: torch.Tensor | None) -> None:
        session.mask = mask
        session.position += tokens

    def _run_step(self, session: Session, hidden, position_ids, attention_mask, position: int,
                  prompts: torch.Tensor | None = None) -> torch.Tensor:
        """One step on the generic span (transformers' layers and DynamicCache)."""
        position_ids, mask = self._prepare(session, hidden, position_ids, attention_mask, position)
        device, dtype = self.span.device, self.span.dtype
        with torch.inference_mode(), pass_threads(self._kernels, hidden.shape[0] * hidden.shape[1]):
            out = self.span.forward_prompted(
                hidden.to(device=device, dtype=dtype),
                position_ids.to(device=device),
                mask.to(device) if mask is not None else None,
                session.start,
                session.end,
                prompts.to(device=device, dtype=dtype) if prompts is not None else None,
                adapter=session.adapter,
                cache=session.cache,
            )
        self._commit(session, hidden.shape[1], mask)
        return out.to(device="cpu", dtype=session.wire_dtype)

    # -- continuous batching (lean path) ----------------------------------------------------
    async def _batched(self, session: Session, hidden, position_ids, attention_mask, position: int,
                       prompts: torch.Tensor | None = None, convoy: Convoy | None = None) -> torch.Tensor:
        """Queue the step; the compute thread runs every queued step of the same layers in one pass."""
        work = _Work(session, hidden, position_ids, attention_mask, position, prompts, convoy)
        self._track(session, work.future)
        if self._run_inline(work):
            return work.future.result()  # done (a result or the step's error), without a round through the loop
        with self._lock:
            self._pending.append(work)
            self.window.stepped(session.session_id, time.monotonic())
            submit = not self._pass_queued
            self._pass_queued = True
            self._arrived.notify()
        if submit:
            self._submit(self._run_pending)
        return await asyncio.wrap_future(work.future)

    def _submit(self, fn, *args) -> Future:
        """`fn(*args)` on the compute thread, counted in `_jobs` until it ends (on the event loop)."""
        with self._lock:
            self._jobs += 1
        return self._pool.submit(self._counted, fn, *args)

    @property
    def compute_busy(self) -> bool:
        """Whether the compute thread has work (a job submitted and not finished)."""
        with self._lock:
            return self._jobs > 0

    def _counted(self, fn, *args):
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._jobs -= 1

    def _run_inline(self, work: _Work) -> bool:
        """Run `work` (a step of the lean path) on this thread, the event loop's, if it is a lone decode step; True
        if it ran (its future is done). Only the loop submits compute-thread jobs, so none starts meanwhile."""
        if not self.inline_decode or work.tokens != 1 or (self.layout is not None and self.layout.converting()):
            return False  # (a layout change goes on after the compute thread's passes)
        now = time.monotonic()
        with self._lock:
            self.window.stepped(work.session.session_id, now)  # as a queued step (the window counts it)
            # no job: nothing queued either (a queued step's pass is a job from the moment it is queued)
            if self._jobs or self.window.left([work], now, now) > 0:
                return False
        if work.future.set_running_or_notify_cancel():
            self._run_guarded([work], "a pass on the event loop")
            self.inline_passes += 1
        return True

    def _run_pending(self) -> None:
        """The compute thread's job: run every queued step. It never raises (the pool would keep the error where
        nobody looks): a failure fails the steps it concerns, with the error, and is logged."""
        with self._lock:
            started = time.monotonic()
            while (left := self.window.left(self._pending, time.monotonic(), started)) > 0:
                self._arrived.wait(left)
            pending, self._pending = self._pending, []
            self._pass_queued = False
        # a step cancelled while it waited (its stream ended) is not run; the others can no longer be cancelled
        works = [work for work in pending if work.future.set_running_or_notify_cancel()]
        if self._run_guarded(works):
            while self.layout is not None and not self._pending and self.layout.convert_one():
                pass  # idle: move the weights toward the layout the load asks for, one matrix at a time

    def _run_guarded(self, works: list[_Work], where: str = "the compute thread") -> bool:
        """`_run_works`, never raising: a failure fails the steps it concerns, with the error, and is logged (naming
        `where` it ran); False then."""
        try:
            self._run_works(works)
            return True
        except BaseException as error:  # noqa: B036 -- logged, and every step it concerns fails with it
            log.exception("%s failed; failing the %d steps of its passes", where, len(works))
            if not isinstance(error, Exception):
                error = ComputeError(f"the node's pass ({where}) was interrupted: {type(error).__name__}: {error}")
            for work in works:
                if not work.future.done():
                    work.future.set_exception(error)

    def _pass_limit(self) -> int:
        """The most tokens a pass of several steps takes. Over exact weights, KERNEL_ROWS: a step's products then
        run the same kernel alone and batched (a longer step runs alone), so batching never changes its bits."""
        return min(self.max_pass_tokens, KERNEL_ROWS) if self._kernels is not None else self.max_pass_tokens

    def _run_works(self, works: list[_Work]) -> None:
        groups: dict[tuple[int, int], list[_Work]] = {}
        for work in works:
            groups.setdefault((work.session.start, work.session.end), []).append(work)
        for (start, end), group in groups.items():
            for chunk in _chunks(group, self._pass_limit()):
                tokens = sum(work.tokens for work in chunk)
                with pass_threads(self._kernels, tokens):
                    self._run_pass(start, end, chunk)
                if tokens > KERNEL_ROWS:  # a prefill's temporaries (activations, int8 blocks dequantised) stay in
                    release_free_heap()  # the C heap once freed: tens of MB of resident memory unless given back
                if self.layout is not None:
                    self.layout.observe(tokens)

    def _run_pass(self, start: int, end: int, works: list[_Work]) -> None:
        """One forward over several sessions' steps; a failing pass is retried step by step so that one
        bad step fails alone (a static cache slot written twice at the same position is harmless)."""
        try:
            outputs = self._lean_pass(start, end, works)
        except Exception as error:
            if len(works) == 1:
                works[0].future.set_exception(error)
                return
            for work in works:
                self._run_pass(start, end, [work])
            return
        self.passes += 1
        self.batched_steps += len(works)
        send_off([work.convoy for work in works])
        for work, out in zip(works, outputs):
            work.future.set_result(out)

    def _lean_pass(self, start: int, end: int, works: list[_Work]) -> list[torch.Tensor]:
        rows = []
        for work in works:
            session = work.session
            position_ids, mask = self._prepare(
                session, work.hidden, work.position_ids, work.attention_mask, work.position
            )
            prompts = (work.prompts.to(device=self.span.device, dtype=self.span.dtype)
                       if work.prompts is not None else None)
            rows.append(Row(work.hidden, position_ids, session.position, session.cache, mask, session.adapter, prompts))
        with torch.inference_mode():
            outputs = self.lean.run(rows, start, end)
        results = []
        for work, row, out in zip(works, rows, outputs):
            session = work.session
            self._commit(session, work.hidden.shape[1], row.mask)
            results.append(out.to(device="cpu", dtype=session.wire_dtype))
        return results

    @staticmethod
    def _rewind(session: Session, position: int) -> None:
        """Forget the cached tokens from `position` on."""
        try:
            session.cache.crop(position - session.position)  # a negative count: tokens to drop
        except (RuntimeError, ValueError) as error:  # sliding-window layers past their window cannot go back
            raise FailedPrecondition(f"cannot rewind this session's cache to {position} tokens: {error}") from None
        if session.mask is not None:
            session.mask = session.mask[:, :position]
        session.position = position

    def _check_pass(self, start: int, end: int, hidden: torch.Tensor, position_ids: torch.Tensor | None,
                    attention_mask: torch.Tensor | None, wire_dtype: torch.dtype, max_tokens: int,
                    prompts: torch.Tensor | None) -> None:
        """A stateless pass (Forward, Backward) fits this node: layers, shapes, length, memory; InvalidRequest if
        not."""
        self.check_subspan(start, end)
        self.check_hidden(hidden, None, wire_dtype)
        batch, tokens = hidden.shape[:2]
        if batch > self.max_batch:
            raise InvalidRequest(f"batch {batch} exceeds this node's limit of {self.max_batch}")
        if tokens > min(self.max_length, max_tokens):
            raise OutOfRange(f"{tokens} tokens exceed this node's max_length {min(self.max_length, max_tokens)}")
        limit = min(self.sessions.max_session_tokens, self.sessions.budget_tokens)
        if batch * tokens > limit:
            raise Exhausted(f"a pass over {batch} x {tokens} tokens is more than one session may hold here ({limit} "
                            f"tokens: --max-session-tokens, {self.sessions.budget_flag})")
        self._check_aux("position_ids", position_ids, (batch, tokens), positions=min(self.max_length, max_tokens))
        self._check_aux("attention_mask", attention_mask, (batch, tokens))
        if prompts is not None:
            self._check_prompts(prompts, end - start, batch, tokens, wire_dtype)

    def _check_prompts(
        self, prompts: torch.Tensor, layers: int, batch: int, tokens: int, wire_dtype: torch.dtype
    ) -> None:
        """Deep prompts [layers, batch, prompt_tokens, hidden] fit a pass or step of `tokens` tokens."""
        if prompts.dim() != 4 or tuple(prompts.shape[:2]) != (layers, batch) or prompts.shape[3] != self.hidden_size:
            raise InvalidRequest(f"prompts must be [{layers} layers, {batch} batch, prompt_tokens, "
                                 f"{self.hidden_size}], got shape {list(prompts.shape)}")
        if not 1 <= prompts.shape[2] <= tokens:
            raise InvalidRequest(f"prompts cover {prompts.shape[2]} tokens; must be 1..{tokens} (the pass's tokens)")
        if prompts.dtype != wire_dtype:
            raise InvalidRequest(f"prompts are {prompts.dtype} but the wire dtype is {wire_dtype}")

    def _pass_inputs(self, hidden, position_ids, attention_mask, prompts):
        """The tensors of a stateless pass on the span's device and dtype (default position ids, no all-ones mask)."""
        batch, tokens = hidden.shape[:2]
        device, dtype = self.span.device, self.span.dtype
        pos = position_ids if position_ids is not None else torch.arange(tokens).expand(batch, tokens)
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.to(device, torch.long)
        prompts = prompts.to(device=device, dtype=dtype) if prompts is not None else None
        return hidden.to(device=device, dtype=dtype), pos.to(device=device, dtype=torch.long), mask, prompts

    async def forward(
        self,
        start: int,
        end: int,
        hidden: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        wire_dtype: torch.dtype,
        max_tokens: int,
        adapter: str | None = None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A stateless pass over `[start, end)` with no cache kept (with LoRA adapter `adapter`, if named; with
        deep prompts [end - start, batch, prompt_tokens, hidden] added at each layer's input, if given)."""
        self.check_subspan(start, end)
        lora = self.adapter(adapter)
        self._check_pass(start, end, hidden, position_ids, attention_mask, wire_dtype, max_tokens, prompts)

        def run() -> torch.Tensor:
            x, pos, mask, deep = self._pass_inputs(hidden, position_ids, attention_mask, prompts)
            with torch.inference_mode():
                out = self.span.forward_prompted(x, pos, mask, start, end, deep, adapter=lora)
            return out.to(device="cpu", dtype=wire_dtype)

        return await asyncio.wrap_future(self._submit(run))

    async def backward(
        self,
        start: int,
        end: int,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        wire_dtype: torch.dtype,
        max_tokens: int,
        adapter: str | None = None,
        prompts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The gradients of a stateless pass w.r.t. its inputs (and deep prompts): the pass is recomputed with
        autograd on `hidden` and `prompts` only; the span's weights are frozen and get no gradient."""
        self.check_subspan(start, end)
        lora = self.adapter(adapter)
        self._check_pass(start, end, hidden, position_ids, attention_mask, wire_dtype, max_tokens, prompts)
        if tuple(grad_output.shape) != tuple(hidden.shape):
            raise InvalidRequest(f"grad_output must have the shape of hidden {list(hidden.shape)}, "
                                 f"got {list(grad_output.shape)}")
        if grad_output.dtype != wire_dtype:
            raise InvalidRequest(f"grad_output is {grad_output.dtype} but the wire dtype is {wire_dtype}")

        def run() -> tuple[torch.Tensor, torch.Tensor | None]:
            x, pos, mask, deep = self._pass_inputs(hidden, position_ids, attention_mask, prompts)
            inputs = [x.detach().clone().requires_grad_(True)]
            if deep is not None:
                inputs.append(deep.detach().clone().requires_grad_(True))
            with torch.enable_grad():
                out = self.span.forward_prompted(
                    inputs[0], pos, mask, start, end, inputs[1] if deep is not None else None, adapter=lora
                )
                grads = torch.autograd.grad(out, inputs, grad_output.to(device=out.device, dtype=out.dtype),
                                            allow_unused=True)
            grads = [g if g is not None else torch.zeros_like(i) for g, i in zip(grads, inputs)]
            grad_input = grads[0].to(device="cpu", dtype=wire_dtype)
            grad_prompts = grads[1].to(device="cpu", dtype=wire_dtype) if deep is not None else None
            return grad_input, grad_prompts

        return await asyncio.wrap_future(self._submit(run))
