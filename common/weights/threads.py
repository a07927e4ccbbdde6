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
import threading

import torch

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
