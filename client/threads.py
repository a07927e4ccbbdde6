"""Torch's threads on the client's token path.

Outside the LM head, a generation step's own operations on the client are tiny (an embedding row, a norm,
the logits processors and the choice of a token): torch wakes its OpenMP workers for some of them (an
argmax over the vocabulary) and, under libgomp's default policy, leaves them spinning afterwards. On a
machine the client shares with nodes (`potluck demo`, a lab box) those spinning workers take a core from
the node computing the next step: through 3 nodes on 2 cores, 48.2 tok/s with two torch threads in the
client against 58.2 with one (alternating runs). So `generate` runs with one torch thread in its thread
(`small_ops`), and gives the head back the count it had (`head_threads`): a head product over a big
vocabulary is real work."""

from __future__ import annotations

import contextlib
import threading

import torch

_local = threading.local()  # .head: torch threads the head gets back inside small_ops (0: outside)


@contextlib.contextmanager
def small_ops():
    """The calling thread runs torch on one thread inside this, except the head (`head_threads`)."""
    threads = torch.get_num_threads()
    outer = getattr(_local, "head", 0)
    _local.head = outer or threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _local.head = outer


@contextlib.contextmanager
def head_threads():
    """Inside `small_ops`: torch's thread count from before it, for the head product; elsewhere nothing changes."""
    threads = getattr(_local, "head", 0)
    if not threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(1)
