"""Convoys (common/wire/convoy.py): steps of several sessions that left one pass together are run in one pass
again at the next node, and the client's head products and next steps keep them together."""

from __future__ import annotations

import asyncio
import threading
import time

import torch
from transformers import AutoModelForCausalLM

from client.combine import Combiner
from common.wire.convoy import CONVOY_WAIT, Convoy, incomplete, send_off
from node.runtime.executor import Executor
from tests.unit.test_lean import embedded_rows, lean_span


def test_a_convoy_is_complete_once_all_its_steps_are_there():
    convoys = [Convoy((7, 3)), Convoy((7, 3)), None, Convoy(None)]
    assert incomplete(convoys)
    assert not incomplete(convoys + [Convoy((7, 3))])
    assert Convoy.of(0, 5, "x").arrived is None and Convoy.of(9, 1, "x").arrived is None  # none, or alone
    leaving = [Convoy(destination="a"), Convoy(destination="b"), None, Convoy(destination="a")]
    send_off(leaving)
    ident = leaving[0].leaves[0]
    assert ident and [c.leaves for c in leaving if c] == [(ident, 2), (ident, 1), (ident, 2)]


def test_a_node_runs_a_convoy_in_one_pass_even_when_its_steps_arrive_apart(tiny_model_dir, monkeypatch):
    """Three sessions' steps of one convoy, 8 ms apart: with their convoy they share one pass (and leave it as
    one convoy per destination); without it, the short batch window lets them run apart. Either way the
    outputs are transformers'."""
    monkeypatch.setattr("node.runtime.window.CONVOY_WAIT", 2.0)  # a slow CI machine must not split the convoy
    folder = tiny_model_dir("llama")
    _, embeds, expected = embedded_rows(folder, 3, 5, seed=0)

    async def run(tagged: bool):
        executor = Executor(lean_span(folder, 0, 6), cache_tokens=4096, max_length=64, batch_wait=0.002)
        sessions = [executor.open(f"s{i}", 0, 6, 1, 64, torch.float32) for i in range(3)]
        for i, session in enumerate(sessions):
            await executor.step(session, embeds[i : i + 1, :4], None, None, 0)
        convoys = [Convoy.of(41, 3, "a" if i < 2 else "b") if tagged else None for i in range(3)]
        passes, steps = executor.passes, executor.batched_steps

        async def late(i):
            await asyncio.sleep(0.008 * i)
            return await executor.step(sessions[i], embeds[i : i + 1, 4:5], None, None, 4, convoy=convoys[i])

        outs = await asyncio.gather(*(late(i) for i in range(3)))
        executor.shutdown()
        return outs, executor.passes - passes, executor.batched_steps - steps, convoys

    outs, passes, steps, convoys = asyncio.run(run(tagged=True))
    assert (passes, steps) == (1, 3), f"a convoy of 3 should run in one pass, got {passes} passes for {steps} steps"
    ident = convoys[0].leaves[0]
    assert [c.leaves for c in convoys] == [(ident, 2), (ident, 2), (ident, 1)]  # per destination
    for i, out in enumerate(outs):
        torch.testing.assert_close(out, expected[i : i + 1, 4:5], rtol=1e-5, atol=1e-5)
    outs, passes, _, _ = asyncio.run(run(tagged=False))
    assert passes > 1, "without a convoy, steps 8 ms apart should not wait for each other (2 ms window)"
    for i, out in enumerate(outs):
        torch.testing.assert_close(out, expected[i : i + 1, 4:5], rtol=1e-5, atol=1e-5)


def test_a_node_waits_for_a_missing_convoy_member_only_briefly(tiny_model_dir):
    folder = tiny_model_dir("llama")
    hidden = torch.randn(1, 4, AutoModelForCausalLM.from_pretrained(folder).config.hidden_size)

    async def run():
        executor = Executor(lean_span(folder, 0, 6), cache_tokens=4096, max_length=64)
        sessions = [executor.open(f"s{i}", 0, 6, 1, 64, torch.float32) for i in range(2)]
        started = time.monotonic()
        await asyncio.gather(*(executor.step(s, hidden, None, None, 0, convoy=Convoy.of(5, 4, "a")) for s in sessions))
        elapsed = time.monotonic() - started
        executor.shutdown()
        return elapsed, executor.passes

    elapsed, passes = asyncio.run(run())
    assert passes == 1  # the two that came ran together, after the wait
    assert CONVOY_WAIT <= elapsed < CONVOY_WAIT + 1.0, elapsed


class _Session:  # what the client's head product keys sessions by (a SyncSession in the model)
    pass


def test_a_head_product_waits_for_its_convoy_and_the_next_steps_leave_together(monkeypatch):
    monkeypatch.setattr("client.combine.HEAD_WAIT", 2.0)  # bounds far above the test's own delays
    monkeypatch.setattr("client.combine.GATE_WAIT", 2.0)
    weight = torch.randn(50, 8)
    calls = []

    def head(rows):
        calls.append(rows.shape[0])
        return rows @ weight.t()

    combiner = Combiner(head)
    sessions = [_Session() for _ in range(3)]
    inputs = [torch.randn(1, 1, 8) for _ in range(3)]
    results, leaving, passed = [None] * 3, [None] * 3, [0.0] * 3

    def generation(i):  # the last node's results of one pass reach the threads a few ms apart
        time.sleep(0.005 * i)
        results[i], leaving[i] = combiner.combined(inputs[i], (99, 3), sessions[i])
        time.sleep(0.04 * (2 - i))  # and their next steps are ready 40 ms apart
        combiner.depart(sessions[i], leaving[i], 1)
        passed[i] = time.monotonic()

    threads = [threading.Thread(target=generation, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert calls == [3], f"one product over the convoy's 3 rows, got {calls}"
    for x, got in zip(inputs, results):
        torch.testing.assert_close(got, x @ weight.t())
    assert leaving[0] == leaving[1] == leaving[2] and leaving[0][1] == 3
    assert max(passed) - min(passed) < 0.03, "the gate lets the three next steps go together"
    # one that never comes holds the others at the gate for GATE_WAIT at most
    monkeypatch.setattr("client.combine.GATE_WAIT", 0.05)
    started = time.monotonic()
    combiner.depart(_Session(), (1234, 2), 1)
    assert 0.045 <= time.monotonic() - started < 1.0
    # a caller that does not travel (no session) is not counted in the convoy
    _, alone = combiner.combined(torch.randn(1, 8))
    assert alone is None


def test_a_younger_session_waits_for_an_older_one_on_the_chain_and_they_merge(monkeypatch):
    """Two sessions a token out of step: the younger one's head product waits for the older one, which is on
    the chain, so both rows go in one product and their next steps leave as one convoy. The older one never
    waits for the younger (if both did, they would keep their distance)."""
    monkeypatch.setattr("client.combine.MERGE_WAIT", 2.0)
    calls = []
    combiner = Combiner(lambda rows: calls.append(rows.shape[0]) or rows * 2)
    old, young = _Session(), _Session()
    combiner.combined(torch.ones(1, 4), None, old)  # the older session is seen first
    combiner.combined(torch.ones(1, 4), None, young)
    combiner.depart(old, None, 1)  # the old one's step goes down the chain
    assert calls == [1, 1]
    out = {}
    waiting = threading.Thread(target=lambda: out.update(young=combiner.combined(torch.ones(1, 4), None, young)))
    waiting.start()
    time.sleep(0.1)
    assert calls == [1, 1], "the younger session's product waits while the older one is on the chain"
    out["old"] = combiner.combined(torch.ones(1, 4), None, old)  # the older one's result is back
    waiting.join(5)
    assert calls == [1, 1, 2] and out["old"][1] == out["young"][1] and out["old"][1][1] == 2
    # the older one's product does not wait for the younger one
    combiner.depart(young, None, 1)
    started = time.monotonic()
    combiner.combined(torch.ones(1, 4), None, old)
    assert time.monotonic() - started < 1.0
    # nor does anybody wait for a session whose step failed
    combiner.depart(old, None, 1)
    combiner.abandon(old)
    started = time.monotonic()
    combiner.combined(torch.ones(1, 4), None, young)
    assert time.monotonic() - started < 1.0
