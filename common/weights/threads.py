"""torch's own small operations on one thread, while the real products keep torch's thread count.

A node's decode pass (`Kernels.hot`, common/weights/exact.py) and a client's `generate` (client/model.py) both
run many tiny torch operations around a few heavy products. For the tiny ones torch wakes its OpenMP
workers, which costs more than they gain (an attention call over 8 one-token rows: 69 µs with two
PASSIVE threads, 17 with one), and under libgomp's default policy leaves them spinning afterwards: on a
machine the client shares with nodes, those spinning workers took a core from the node computing the next
step (48.2 tok/s through 3 nodes with two client threads against 58.2 with one, alternating runs).

So inside `one_torch_thread()` the calling thread runs torch on one thread, and the heavy products take
the count it had: the exact kernels read `saved_threads()`, and `saved_torch_threads()` gives torch its
count back around a product torch computes itself (a dense LM head). The count is per thread (torch's
OpenMP setting is, for threads that already ran torch); threads started meanwhile inherit one thread, as
torch gives a new thread the count last set anywhere."""

from __future__ import annotations

import contextlib
import logging
import statistics
import threading

import torch

log = logging.getLogger(__name__)

_local = threading.local()  # .threads: torch's count before the outermost one_torch_thread (0: outside one)


def saved_threads() -> int:
    """Inside `one_torch_thread`: torch's thread count before it; 0 outside."""
    return getattr(_local, "threads", 0)


@contextlib.contextmanager
def one_torch_thread():
    """The calling thread runs torch on one thread inside this (nested: the outermost count is kept)."""
    threads, outer = torch.get_num_threads(), saved_threads()
    _local.threads = outer or threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _local.threads = outer


@contextlib.contextmanager
def saved_torch_threads():
    """Inside `one_torch_thread`: torch's count from before it, for a heavy product; elsewhere nothing changes."""
    threads = saved_threads()
    if not threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(1)


class PassThreads:
    """The thread count of a node's one-row decode passes, chosen from those passes' own timings as it serves.

    A node times products on one thread and on all at load (`calibrate_threads`), when the machine may be busy
    with something else: three nodes starting at once on two cores gave one of them one thread in each of two
    tries, and its 10-layer passes then took 4.5 ms instead of 2.7 through the chain. So the passes themselves
    decide: `pick` alternates the candidates until each has run `trials` passes, keeps the one whose median was
    lowest for the next `every` passes, then tries them all again. A row's bits do not depend on the threads
    (every output is summed by one thread, in one order), only its time does."""

    def __init__(self, candidates: tuple[int, ...], first: int, trials: int = 8, every: int = 2000):
        self.candidates = tuple(sorted(set(candidates)))
        self.chosen = first if first in self.candidates else self.candidates[-1]
        self.trials, self.every = trials, every
        self._times: dict[int, list[float]] = {c: [] for c in self.candidates}
        self._settled = 0  # passes left before the candidates are tried again (0: trying them now)

    def pick(self) -> int:
        if self._settled > 0 or len(self.candidates) == 1:
            return self.chosen
        return min(self.candidates, key=lambda c: len(self._times[c]))  # the one least tried so far

    def record(self, threads: int, seconds: float) -> None:
        if self._settled > 0:
            self._settled -= 1
            return
        if threads not in self._times:
            return
        self._times[threads].append(seconds)
        if all(len(times) >= self.trials for times in self._times.values()):
            best = min(self.candidates, key=lambda c: statistics.median(self._times[c]))
            if best != self.chosen:
                log.info("one-row passes now on %d thread(s) (medians: %s)", best, ", ".join(
                    f"{c}: {statistics.median(t) * 1000:.2f} ms" for c, t in self._times.items()))
            self.chosen = best
            self._times = {c: [] for c in self.candidates}
            self._settled = self.every
