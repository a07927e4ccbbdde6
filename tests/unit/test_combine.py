"""Concurrent LM-head calls combined into one product, packed for MKL when it carries several rows
(client/combine.py)."""

from __future__ import annotations

import threading

import pytest
import torch

from client.combine import PACK_HEAD_AFTER, Combiner, PackedHead
from common.weights.fast_linear import TransposedLinear, mkl_packing_available


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


@pytest.mark.skipif(not mkl_packing_available(), reason="this torch has no MKL packing (the head is used as is)")
def test_the_head_gets_a_packed_copy_once_products_carry_several_rows():
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 500, bias=True)
    for head in (TransposedLinear.from_linear(linear), linear):
        packed = PackedHead(lambda: head)
        with torch.no_grad():
            for _ in range(PACK_HEAD_AFTER - 1):
                rows = torch.randn(3, 64)
                torch.testing.assert_close(packed(rows), head(rows))
            assert packed.packed is None  # not yet: a client that rarely combines keeps one copy
            rows = torch.randn(4, 64)
            torch.testing.assert_close(packed(rows), head(rows), rtol=1e-5, atol=1e-5)
            assert packed.packed is not None
            one = torch.randn(1, 64)
            assert torch.equal(packed(one), head(one))  # one row: the stored weight, exactly
            weight = head.weight_t if isinstance(head, TransposedLinear) else head.weight
            weight.mul_(2)  # an in-place update (an optimiser step): the packed copy is made again
            torch.testing.assert_close(packed(rows), head(rows), rtol=1e-5, atol=1e-5)
    off = PackedHead(lambda: linear, enabled=False)
    with torch.no_grad():
        for _ in range(PACK_HEAD_AFTER + 1):
            off(torch.randn(3, 64))
    assert off.packed is None


def test_generate_runs_small_operations_on_one_thread_and_the_head_on_torchs_count():
    """common/weights/threads.py: inside generate torch's own small operations run on the calling thread alone,
    the head product on the count torch had before (waking, and leaving spinning, OpenMP workers for every
    token's tiny operations took a core from the nodes on a shared machine)."""
    from common.weights.threads import one_torch_thread, saved_torch_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with saved_torch_threads():  # outside generate: nothing changes
            assert torch.get_num_threads() == 2
        with one_torch_thread():
            assert torch.get_num_threads() == 1
            with saved_torch_threads():
                assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 1
            with one_torch_thread():  # nested (generate calling generate): the head still gets the outer count
                with saved_torch_threads():
                    assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_torch_thread():
            raise RuntimeError("a failing generate")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
