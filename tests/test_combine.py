"""Concurrent LM-head calls combined into one product (client/combine.py)."""

from __future__ import annotations

import threading

import pytest
import torch

from client.combine import Combiner


def test_concurrent_calls_share_products_and_get_their_own_rows():
    torch.manual_seed(0)
    weight = torch.randn(300, 16)
    entered = threading.Event()
    release = threading.Event()

    def head(rows: torch.Tensor) -> torch.Tensor:
        if not entered.is_set():  # hold the first product until every other caller has queued
            entered.set()
            release.wait(5)
        return rows @ weight.t()

    combiner = Combiner(head)
    inputs = [torch.randn(1, 1 + i % 3, 16) for i in range(8)]
    results: list[torch.Tensor | None] = [None] * len(inputs)

    def call(index: int) -> None:
        results[index] = combiner(inputs[index])

    first = threading.Thread(target=call, args=(0,))
    first.start()
    assert entered.wait(5)
    others = [threading.Thread(target=call, args=(i,)) for i in range(1, len(inputs))]
    for thread in others:
        thread.start()
    while len(combiner._queue) < len(inputs) - 1:  # the 7 others wait behind the running product
        threading.Event().wait(0.001)
    release.set()
    for thread in [first, *others]:
        thread.join(5)
    for x, got in zip(inputs, results):
        torch.testing.assert_close(got, x @ weight.t())
    assert combiner.calls == 2 and combiner.callers == 8, (combiner.calls, combiner.callers)


def test_an_error_reaches_every_caller_of_its_product_and_the_next_call_works():
    combiner = Combiner(lambda rows: rows.sum(-1, keepdim=True) if rows.shape[-1] == 4 else 1 / 0)
    with pytest.raises(ZeroDivisionError):
        combiner(torch.ones(1, 1, 3))
    assert combiner(torch.ones(2, 1, 4)).tolist() == [[[4.0]], [[4.0]]]
