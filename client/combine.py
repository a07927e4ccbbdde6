"""One product for the LM-head calls of concurrent generations in one client process.

On CPU the head is the client's biggest cost per token (SmolLM2's reads 113 MB) and it is bound by
memory bandwidth: one product over 8 rows costs about 2x one row, not 8x. When several threads
generate at once (the API server, a batch of `generate` calls in threads) their head calls are
combined: the first caller runs the head on every row queued meanwhile, the others wait for their
share. A lone caller runs at once, with no wait.

A product of several rows is where MKL's packed layout pays (common/weights/fast_linear.py): on this CPU
SmolLM2's head takes ~13 ms for one row with one thread, ~24 ms for two to four rows as it is stored,
~15 ms packed. So once a few combined calls have carried several rows, `PackedHead` makes a packed copy
of the head (as much memory again as the head: 113 MB for SmolLM2) and runs such calls through it; one
row still takes the stored weight, which is faster for it. A client that never combines never packs.

A product takes at most `max_rows` rows (KERNEL_ROWS for the model's head): where the head is held in an exact
narrow form, a row's logits then come from the same kernel alone and combined, bit for bit the same. A leader that
fails (any BaseException) fails only its own product and hands the queue to the next caller; a caller waits at most
FOLLOW_WAIT for its share."""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections.abc import Callable

import torch
from torch import nn

from common.weights.exact import KERNEL_ROWS, ExactWeight, shared_kernels
from common.weights.fast_linear import PACKED_ROWS, PackedWeight, TransposedLinear, mkl_packing_available
from common.wire.convoy import Convoy, incomplete, new_convoy_id

PACK_HEAD_AFTER = 4  # combined calls of several rows before the head gets its packed copy
HEAD_WAIT = 0.01     # seconds a head product waits for the rest of the convoy its rows came in
GATE_WAIT = 0.05     # seconds a session's next step waits for the other sessions of its head product
FORGET_GATES = 1.0   # gates older than this many seconds are dropped
MERGE_WAIT = 0.05    # seconds a head product waits for an older session on the chain (convoys merge)
FOLLOW_WAIT = 120.0  # seconds a caller waits for the product a leader runs for it before it gives up


class _Call:
    __slots__ = ("rows", "convoy", "age", "result", "error", "done", "lead")

    def __init__(self, rows: torch.Tensor, arrived: tuple[int, int] | None, age: int | None):
        self.rows = rows
        self.convoy = Convoy(arrived)  # the convoy its rows came in; `leaves` is set by the product
        self.age = age  # a travelling session's seniority (it will step again: it counts in the next convoy)
        self.result: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.lead = False  # set when a finishing leader hands the queue to this caller


class Combiner:
    """`combiner(x)` == `fn(x)` for x [..., features]; concurrent calls share one `fn` over their rows.

    With convoys (common/wire/convoy.py), for "travelling" callers (sessions that step again):
    - a product waits up to HEAD_WAIT for the rest of the convoys its rows arrived in (the last node's
      results of one pass reach their threads one by one);
    - the sessions it served send their next steps as one convoy: `depart` holds each of them, up to
      GATE_WAIT, until all have one ready, so that the first node gets them together;
    - convoys merge: a product also waits, up to MERGE_WAIT, while a session older than all of its own is
      on the chain. Only the younger side waits, so it drifts by up to MERGE_WAIT a token towards the
      older one until they meet (two sessions that both waited would keep their distance)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], max_rows: int = KERNEL_ROWS):
        self.fn = fn
        self.max_rows = max_rows  # rows one product takes at most (a bigger call runs alone)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a call was queued, or a session departed
        self._queue: list[_Call] = []
        self._leading = False
        self._gates: dict[int, list] = {}  # convoy id -> [sessions at the gate so far, when the first came]
        self._ages: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # session -> seniority (first seen)
        self._next_age = itertools.count()
        self._in_flight: dict[int, int] = {}  # id(session) -> seniority, of sessions with a one-token step out
        self.calls = 0    # fn calls made, and the callers they served (callers / calls = mean combined)
        self.callers = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.combined(x)[0]

    def combined(self, x: torch.Tensor, arrived: tuple[int, int] | None = None,
                 session: object = None) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """`fn(x)`, and the convoy a travelling caller's (`session`'s) next step leaves in (None for others)."""
        with self._lock:
            age = self._age(session) if session is not None else None
            self._in_flight.pop(id(session), None)
            call = _Call(x, arrived, age)
            self._queue.append(call)
            lead = not self._leading
            self._leading = True
            self._changed.notify_all()
        if not lead:
            self._follow(call)
            if not call.lead:
                return self._outcome(call)
        # this caller leads: run what is queued (its own call first), then hand over or stop
        self._run_queued(call)
        return self._outcome(call)

    def _follow(self, call: _Call) -> None:
        """Wait until a leader ran `call`'s product or handed it the lead; give up after FOLLOW_WAIT."""
        if call.done.wait(FOLLOW_WAIT):
            return
        with self._lock:
            if call in self._queue:
                self._queue.remove(call)
            given_up = not call.lead
        if given_up:
            raise TimeoutError(f"no head product for this generation within {FOLLOW_WAIT:g} s (its leader hangs)")

    def _age(self, session: object) -> int:
        age = self._ages.get(session)
        if age is None:
            age = self._ages[session] = next(self._next_age)
        return age

    @staticmethod
    def _outcome(call: _Call) -> tuple[torch.Tensor, tuple[int, int] | None]:
        if call.error is not None:
            raise call.error
        return call.result, call.convoy.leaves

    def _wait_left(self, started: float, now: float) -> float:
        """How much longer the product should wait for rows about to come (0: run now); under the lock."""
        if incomplete(c.convoy for c in self._queue) and now < started + HEAD_WAIT:
            return started + HEAD_WAIT - now
        ages = [c.age for c in self._queue if c.age is not None]
        if ages and now < started + MERGE_WAIT and any(age < min(ages) for age in self._in_flight.values()):
            return started + MERGE_WAIT - now
        return 0.0

    def _take(self) -> list[_Call]:
        """The calls of the next product, in order, up to max_rows rows (the first one whatever its size); under
        the lock."""
        taken, rows = 0, 0
        for c in self._queue:
            count = c.rows.numel() // c.rows.shape[-1]
            if taken and rows + count > self.max_rows:
                break
            taken, rows = taken + 1, rows + count
        batch, self._queue = self._queue[:taken], self._queue[taken:]
        return batch

    def _run_queued(self, own: _Call) -> None:
        """One product over the calls queued now (the leader's `own` first); then the next caller in line leads (or
        nobody does). Whatever escapes (any BaseException) fails this product's callers only, and the queue is
        still handed on."""
        batch: list[_Call] = []
        try:
            with self._lock:
                started = time.monotonic()
                while (left := self._wait_left(started, time.monotonic())) > 0:
                    self._changed.wait(left)
                batch = self._take()
            self._product(batch)
        except BaseException as error:  # noqa: B036 -- every caller of the batch sees it, and the leader raises it
            for c in batch:
                if c.result is None and c.error is None:
                    c.error = error
            with self._lock:
                if own in self._queue:  # the leader failed before its product: nobody waits for its call
                    self._queue.remove(own)
            raise
        finally:
            self._hand_on(batch)

    def _product(self, batch: list[_Call]) -> None:
        try:
            flat = torch.cat([c.rows.reshape(-1, c.rows.shape[-1]) for c in batch])
            with torch.no_grad():
                out = self.fn(flat)
            for c, part in zip(batch, out.split([c.rows.numel() // c.rows.shape[-1] for c in batch])):
                c.result = part.reshape(*c.rows.shape[:-1], out.shape[-1])
        except BaseException as error:  # noqa: B036 -- every caller of the batch sees it
            for c in batch:
                c.error = error
        travellers = [c for c in batch if c.age is not None]
        leaves = (new_convoy_id(), len(travellers))
        for c in travellers:
            c.convoy.leaves = leaves
        self.calls += 1
        self.callers += len(batch)

    def _hand_on(self, batch: list[_Call]) -> None:
        """Wake the product's callers, and let the next caller in line lead the calls queued meanwhile."""
        with self._lock:
            successor = self._queue[0] if self._queue else None
            if successor is None:
                self._leading = False
            else:
                successor.lead = True  # the next caller in line leads the calls queued during this one
        for c in batch:
            c.done.set()
        if successor is not None:
            successor.done.set()

    def depart(self, session: object, convoy: tuple[int, int] | None, tokens: int) -> None:
        """`session` is about to send a step of `tokens` tokens in `convoy`: hold it until every session of the
        convoy has one ready (at most GATE_WAIT). A one-token step then counts as on the chain (products of
        younger sessions may wait for it) until `combined` sees the session again, or `abandon`."""
        with self._lock:
            if convoy is not None and convoy[1] > 1:
                now = time.monotonic()
                for key, (_, first) in list(self._gates.items()):
                    if now - first > FORGET_GATES:
                        del self._gates[key]
                entry = self._gates.setdefault(convoy[0], [0, now])
                entry[0] += 1
                self._changed.notify_all()
                while entry[0] < convoy[1] and (left := now + GATE_WAIT - time.monotonic()) > 0:
                    self._changed.wait(left)
            if tokens == 1:
                self._in_flight[id(session)] = self._age(session)

    def abandon(self, session: object) -> None:
        """`session`'s step failed: it is not on the chain any more."""
        with self._lock:
            self._in_flight.pop(id(session), None)
            self._changed.notify_all()


class PackedHead:
    """`packed_head(rows)` == `head()(rows)` for rows [n, features] outside autograd, for a float32 CPU nn.Linear or
    TransposedLinear head (any other head is always called itself):

    - when its weight is exactly held by a narrow form (`exact`; common/weights/exact.py: e.g. a GGUF model's Q8_0
      embeddings tied to the head), up to KERNEL_ROWS rows go through that copy: a quarter of the bytes;
    - otherwise 2 to 32 rows go through a packed copy of the weight once PACK_HEAD_AFTER such calls were seen
      (MKL here).

    Either copy is made again if the weight changes (an optimiser step on it, a new tensor)."""

    def __init__(self, head: Callable[[], nn.Module], enabled: bool = True, exact: bool = True,
                 numerics: str = "exact"):
        self.head = head  # the model's head now (it may be replaced)
        self.exact_enabled = exact
        self.numerics = numerics  # the exact copy's products: "exact", or "fast" (llama.cpp's; q4/q8 copies only)
        self._exact: tuple[tuple[int, int], ExactWeight | None] | None = None  # (weight made from, its exact copy)
        self.enabled = enabled and mkl_packing_available()
        self.packed: PackedWeight | None = None
        self.several_rows = 0  # calls with 2 to 32 rows so far
        self._made_from: tuple[int, int] | None = None  # (data_ptr, version) of the weight packed

    def _weight_t(self) -> torch.Tensor | None:
        """The head's weight as [in, out] (a view), if it is a plain float32 CPU linear layer."""
        head = self.head()
        if type(head) is TransposedLinear:
            weight_t = head.weight_t
        elif type(head) is nn.Linear:
            weight_t = head.weight.t()
        else:
            return None
        return weight_t if weight_t.dtype == torch.float32 and weight_t.device.type == "cpu" else None

    def _packed_weight(self) -> PackedWeight | None:
        weight_t = self._weight_t()
        if weight_t is None:
            return None
        made_from = (weight_t.data_ptr(), weight_t._version)
        if self.packed is None or made_from != self._made_from:
            self.packed, self._made_from = PackedWeight(weight_t.detach()), made_from
        return self.packed

    def exact_weight(self) -> ExactWeight | None:
        """The head's weight in an exact narrow form, made (about a second for 28M weights) once per weight; None
        where it has none, or the kernels cannot be built here."""
        weight_t = self._weight_t() if self.exact_enabled else None
        if weight_t is None:
            return None
        made_from = (weight_t.data_ptr(), weight_t._version)
        if self._exact is None or self._exact[0] != made_from:
            kernels = shared_kernels()
            exact = ExactWeight.of(weight_t.detach().t(), kernels) if kernels is not None else None
            if exact is not None:
                exact.use_numerics(self.numerics)  # a bf16 copy stays exact (fast.c has q4 and q8 forms)
            self._exact = (made_from, exact)
        return self._exact[1]

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        count = rows.numel() // rows.shape[-1]
        exact = self.exact_weight() if rows.dtype == torch.float32 and not torch.is_grad_enabled() else None
        # the fast numerics at every row count (a scored window too, as a node's): what generation gets is measured
        if exact is not None and (count <= KERNEL_ROWS or exact.fast):
            flat = exact.linear(rows.reshape(count, -1), self.head().bias)
            return flat.reshape(*rows.shape[:-1], flat.shape[-1])
        if self.enabled and count in PACKED_ROWS and rows.dtype == torch.float32 and not torch.is_grad_enabled():
            self.several_rows += 1
            if self.several_rows >= PACK_HEAD_AFTER and (packed := self._packed_weight()) is not None:
                flat = packed.product(rows.reshape(count, -1), self.head().bias)
                return flat.reshape(*rows.shape[:-1], flat.shape[-1])
        return self.head()(rows)
