"""One product for the LM-head calls of concurrent generations in one client process.

On CPU the head is the client's biggest cost per token (SmolLM2's reads 113 MB) and it is bound by
memory bandwidth: one product over 8 rows costs about 2x one row, not 8x. When several threads
generate at once (the API server, a batch of `generate` calls in threads) their head calls are
combined: the first caller runs the head on every row queued meanwhile, the others wait for their
share. A lone caller runs at once, with no wait."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch


class _Call:
    __slots__ = ("rows", "result", "error", "done", "lead")

    def __init__(self, rows: torch.Tensor):
        self.rows = rows
        self.result: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.lead = False  # set when a finishing leader hands the queue to this caller


class Combiner:
    """`combiner(x)` == `fn(x)` for x [..., features]; concurrent calls share one `fn` over their rows."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn
        self._lock = threading.Lock()
        self._queue: list[_Call] = []
        self._leading = False
        self.calls = 0    # fn calls made, and the callers they served (callers / calls = mean combined)
        self.callers = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        call = _Call(x)
        with self._lock:
            self._queue.append(call)
            lead = not self._leading
            self._leading = True
        if not lead:
            call.done.wait()
            if not call.lead:
                return self._outcome(call)
        # this caller leads: run what is queued (its own call among it), then hand over or stop
        self._run_queued()
        return self._outcome(call)

    @staticmethod
    def _outcome(call: _Call) -> torch.Tensor:
        if call.error is not None:
            raise call.error
        return call.result

    def _run_queued(self) -> None:
        with self._lock:
            batch, self._queue = self._queue, []
        try:
            flat = torch.cat([c.rows.reshape(-1, c.rows.shape[-1]) for c in batch])
            with torch.no_grad():
                out = self.fn(flat)
            for c, part in zip(batch, out.split([c.rows.numel() // c.rows.shape[-1] for c in batch])):
                c.result = part.reshape(*c.rows.shape[:-1], out.shape[-1])
        except BaseException as error:  # every caller of the batch sees it
            for c in batch:
                c.error = error
        self.calls += 1
        self.callers += len(batch)
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
