"""A lean span's decode pass in one C call (node/model/lean_decode.py, common/weights/kernels/decode.c): equal to
transformers up to float rounding, taken only where it computes what the torch path would."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from node.model.compact import exact_span
from node.model.lean import Row
from node.model.lean_decode import FusedDecode, span_unfit
from tests.unit.test_exact import exact_model_dir, kernels  # noqa: F401 (fixtures)
from tests.unit.test_lean import lean_span, reference_hidden


def _exact_lean(folder, built, layers=5):
    span = lean_span(folder, 0, layers)
    exact_span(span, built)
    return span.lean


def _calls(monkeypatch) -> list[int]:
    """How many rows each fused pass took (FusedDecode.run spied on)."""
    taken, run = [], FusedDecode.run

    def spy(self, rows, start, end):
        taken.append(len(rows))
        return run(self, rows, start, end)

    monkeypatch.setattr(FusedDecode, "run", spy)
    return taken


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_decode_steps_in_one_call_match_transformers(family, exact_model_dir, kernels, monkeypatch):  # noqa: F811
    """Layers of q4, q8 and bf16 weights; a 12-token prompt (torch), then 12 decode steps (decode.c). Mistral's tiny
    config has a 16-token sliding window: steps past it go back to torch (the window needs a mask)."""
    folder = exact_model_dir(family)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    lean = _exact_lean(folder, kernels)
    assert span_unfit(lean) is None
    taken = _calls(monkeypatch)
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, 24))
    expected, positions = reference_hidden(model, ids, torch.ones_like(ids), 5)
    embeds = model.model.embed_tokens(ids).detach()
    cache = lean.new_cache(0, 5, 1, 64)
    with torch.inference_mode():
        outputs = lean.run([Row(embeds[:, :12], positions[:, :12], 0, cache)], 0, 5)
        for t in range(12, 24):
            outputs += lean.run([Row(embeds[:, t: t + 1], positions[:, t: t + 1], t, cache)], 0, 5)
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, rtol=1e-5, atol=1e-5)
    window = model.config.sliding_window if family == "mistral" else None
    assert len(taken) == (12 if window is None else window - 12)  # every step within the window, none past it
    assert cache.length == 24


def test_sessions_in_one_fused_pass_get_the_bits_each_gets_alone(exact_model_dir, kernels):  # noqa: F811
    """Three sessions at different lengths (one of two sequences) in one pass: the products sum each row in the same
    order whatever the rows, attention runs per sequence over its own cache, so each row's bits are its own."""
    lean = _exact_lean(exact_model_dir("llama"), kernels)
    hidden = lean.layers[0].input_norm.shape[0]
    torch.manual_seed(1)
    batches, pasts = [1, 2, 1], [5, 17, 30]
    prompts = [torch.randn(b, p, hidden) for b, p in zip(batches, pasts)]
    steps = [torch.randn(b, 1, hidden) for b in batches]

    def fresh():
        caches = [lean.new_cache(0, 5, b, 64) for b in batches]
        with torch.inference_mode():
            for cache, prompt, past in zip(caches, prompts, pasts):
                lean.run([Row(prompt, torch.arange(past)[None].expand(prompt.shape[0], -1), 0, cache)], 0, 5)
        return caches

    def row(i, cache):
        return Row(steps[i], torch.full((batches[i], 1), pasts[i]), pasts[i], cache)

    together, alone = fresh(), fresh()
    with torch.inference_mode():
        batched = lean.run([row(i, c) for i, c in enumerate(together)], 0, 5)
        single = [lean.run([row(i, c)], 0, 5)[0] for i, c in enumerate(alone)]
    for got, want in zip(batched, single):
        assert torch.equal(got, want)
    for a, b, past in zip(together, alone, pasts):
        assert torch.equal(a.keys[:, :, :, : past + 1], b.keys[:, :, :, : past + 1])


@pytest.mark.parametrize("numerics", ["exact", "fast"])
def test_a_fused_pass_equals_the_torch_path_in_either_numerics(numerics, exact_model_dir, kernels):  # noqa: F811
    """The same steps through decode.c and through torch's operations around the same product kernels (fast:
    llama.cpp's numerics for the q4 and q8 layers), over a cache that grows past its first allocation."""
    lean = _exact_lean(exact_model_dir("llama"), kernels)
    for layer in lean.layers:
        for name in ("qkv_t", "o_t", "gate_up_t", "down_t"):
            getattr(layer, name).use_numerics(numerics)
    hidden = lean.layers[0].input_norm.shape[0]
    torch.manual_seed(2)
    fused, plain = lean.new_cache(0, 5, 1, 300), lean.new_cache(0, 5, 1, 300)
    worst = 0.0
    with torch.inference_mode():
        for t in range(270):
            x = torch.randn(1, 1, hidden)
            a = lean.run([Row(x, torch.tensor([[t]]), t, fused)], 0, 5)[0]
            kept, lean.fused = lean.fused, None
            b = lean.run([Row(x, torch.tensor([[t]]), t, plain)], 0, 5)[0]
            lean.fused = kept
            worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
    assert fused.capacity > 256 and fused.length == plain.length == 270
    # fast: an input that differs in its last bit may round an activation to the next 8-bit code
    assert worst < (1e-5 if numerics == "exact" else 1e-3)


def test_what_decode_c_does_not_compute_runs_on_torch(exact_model_dir, tiny_model_dir, kernels, monkeypatch):  # noqa: F811
    lean = _exact_lean(exact_model_dir("llama"), kernels)
    taken = _calls(monkeypatch)
    hidden = lean.layers[0].input_norm.shape[0]
    cache = lean.new_cache(0, 5, 1, 64)
    with torch.inference_mode():
        lean.run([Row(torch.randn(1, 3, hidden), torch.arange(3)[None], 0, cache)], 0, 5)  # a prompt
        lean.run([Row(torch.randn(1, 1, hidden), torch.tensor([[3]]), 3, cache, mask=torch.ones(1, 4))], 0, 5)
        lean.run([Row(torch.randn(1, 1, hidden), torch.tensor([[4]]), 4, None)], 0, 5)  # no cache (Forward)
    assert taken == []
    assert span_unfit(_exact_lean(exact_model_dir("qwen3"), kernels)) == "q/k norms"
    assert span_unfit(_exact_lean(exact_model_dir("qwen2"), kernels)) == "biases"
    dense = lean_span(tiny_model_dir("llama"), 0, 2)  # random float32 weights: no exact form
    assert span_unfit(dense.lean) == "a matrix not held as one exact compact weight"
    with torch.inference_mode():
        cache = dense.lean.new_cache(0, 2, 1, 8)
        dense.lean.run([Row(torch.randn(1, 1, hidden), torch.tensor([[0]]), 0, cache)], 0, 2)
    assert taken == []
    layer = lean.layers[0]
    layer.qkv_t = layer.qkv_t.dense().t().contiguous()  # a matrix replaced (as a layout change does): looked at again
    assert lean.fused.takes([Row(torch.randn(1, 1, hidden), torch.tensor([[5]]), 5, cache)]) == [False]


def test_a_pass_mixing_decode_steps_and_a_prompt_gives_each_row_its_bits_alone(exact_model_dir, kernels, monkeypatch):  # noqa: F811
    """A session's prompt arriving while others decode: the decode steps still run in decode.c, the prompt on torch,
    so each row's bits are those it gets alone (the same row always takes the same path)."""
    lean = _exact_lean(exact_model_dir("llama"), kernels)
    hidden = lean.layers[0].input_norm.shape[0]
    torch.manual_seed(3)
    prompt, history = torch.randn(1, 6, hidden), torch.randn(1, 9, hidden)
    step = torch.randn(1, 1, hidden)

    def fresh():
        decoding, prompted = lean.new_cache(0, 5, 1, 64), lean.new_cache(0, 5, 1, 64)
        with torch.inference_mode():
            lean.run([Row(history, torch.arange(9)[None], 0, decoding)], 0, 5)
        return decoding, prompted

    def rows(decoding, prompted):
        return [Row(step, torch.tensor([[9]]), 9, decoding), Row(prompt, torch.arange(6)[None], 0, prompted)]

    taken = _calls(monkeypatch)
    together, alone = rows(*fresh()), rows(*fresh())
    with torch.inference_mode():
        mixed = lean.run(together, 0, 5)
        single = [lean.run([row], 0, 5)[0] for row in alone]
    assert taken == [1, 1]  # the decode step in decode.c, in the mixed pass and alone
    for got, want in zip(mixed, single):
        assert torch.equal(got, want)


def test_one_row_passes_take_the_thread_count_their_own_timings_favour():
    """PassThreads tries each count in turn, keeps the one whose passes were faster, and tries again later (the
    count chosen at load may have been timed while other nodes loaded on the same cores)."""
    from common.weights.threads import PassThreads

    chooser = PassThreads((1, 2), first=1, trials=4, every=10)
    slow = {1: 2.0, 2: 1.0}
    tried = []
    for _ in range(8):
        threads = chooser.pick()
        tried.append(threads)
        chooser.record(threads, slow[threads])
    assert sorted(tried) == [1, 1, 1, 1, 2, 2, 2, 2] and chooser.chosen == 2
    for _ in range(10):  # settled: the faster count only, its timings not kept
        assert chooser.pick() == 2
        chooser.record(2, 5.0)
    slow = {1: 1.0, 2: 3.0}  # the machine changed: one thread is faster now
    for _ in range(8):
        threads = chooser.pick()
        chooser.record(threads, slow[threads])
    assert chooser.chosen == 1 and chooser.pick() == 1


def test_a_fused_pass_of_one_row_times_the_thread_counts_it_may_run_on(exact_model_dir, kernels):  # noqa: F811
    """A one-session decode through decode.c: its passes are timed on one thread and on the pass's own count,
    and every one of them gives the same bits whichever count ran it."""
    from common.weights.threads import one_torch_thread

    lean = _exact_lean(exact_model_dir("llama"), kernels)
    torch.manual_seed(0)
    hidden = torch.randn(1, 1, lean.layers[0].input_norm.shape[0])
    outputs = []
    with torch.inference_mode(), one_torch_thread():
        for _ in range(20):
            cache = lean.new_cache(0, 5, 1, 8)
            outputs.append(lean.run([Row(hidden, torch.tensor([[0]]), 0, cache)], 0, 5)[0])
    chooser = lean.fused.threads
    assert chooser is not None and chooser.candidates == tuple(sorted({1, torch.get_num_threads()}))
    assert all(torch.equal(out, outputs[0]) for out in outputs)
