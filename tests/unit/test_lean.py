"""The lean runtime (fused weights, static KV cache, batched decoding) against plain transformers."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.weights.fast_linear import PackedWeight, mkl_packing_available, transpose_linears
from common.weights.files import ModelFiles
from node.model.compact import pack_lean
from node.model.loader import load_span
from node.runtime.executor import Executor

LEAN_FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]  # mistral's tiny config has a 16-token sliding window


def lean_span(folder, start, end, transposed=True, packed=False):
    span, _ = load_span(ModelFiles.open(str(folder)), start, end, torch.device("cpu"), torch.float32)
    if transposed:
        transpose_linears(span)
    assert span.make_lean() is None
    if packed:
        assert pack_lean(span.lean) == 4 * (end - start)
    return span


def reference_hidden(model, ids, mask, layers):
    """Hidden states after `layers` decoder layers, as transformers computes them (positions skip padding)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model.model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    return out.hidden_states[layers], positions


PACKINGS = [False, True] if mkl_packing_available() else [False]


def all_layers(model, ids):
    """transformers' hidden states after every layer, before the final norm (no padding)."""
    with torch.no_grad():
        hidden = model.model.embed_tokens(ids)
        positions = torch.arange(ids.shape[1])[None]
        rotary = model.model.rotary_emb(hidden, positions)
        for layer in model.model.layers:
            hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
    return hidden


def embedded_rows(folder, rows: int, tokens: int, seed: int):
    """transformers' model of `folder`, `rows` random sequences of `tokens` tokens embedded, and its outputs after
    all layers for them (what a span's steps must give)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(3, model.config.vocab_size, (rows, tokens), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model, model.model.embed_tokens(ids), all_layers(model, ids)


@pytest.mark.parametrize("packed", PACKINGS, ids=lambda p: "packed" if p else "plain")
@pytest.mark.parametrize("family", LEAN_FAMILIES)
def test_prefill_decode_and_rewind_match_transformers(family, packed, tiny_model_dir):
    folder = tiny_model_dir(family)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    span = lean_span(folder, 0, 5, transposed=family != "qwen2", packed=packed)  # both weight layouts
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding on the second sequence
    expected, positions = reference_hidden(model, ids, mask, 5)
    embeds = model.model.embed_tokens(ids).detach()
    cache = span.new_cache(2, 64)
    with torch.inference_mode():
        outputs = [span(embeds[:, :30], positions[:, :30], mask[:, :30], cache)]
        # a wrong token, then a rewind: the cache forgets it
        span(torch.randn(2, 1, embeds.shape[-1]), positions[:, 30:31], mask[:, :31], cache)
        cache.crop(-1)
        for t in range(30, 40):
            outputs.append(span(embeds[:, t : t + 1], positions[:, t : t + 1], mask[:, : t + 1], cache))
    got = torch.cat(outputs, dim=1)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_families_without_a_lean_path_say_why(tiny_model_dir):
    span, _ = load_span(ModelFiles.open(str(tiny_model_dir("mixtral"))), 0, 2, torch.device("cpu"), torch.float32)
    reason = span.make_lean()
    assert reason and "MixtralDecoderLayer" in reason
    assert span.lean is None


def test_concurrent_sessions_are_decoded_in_shared_passes(tiny_model_dir):
    """Sessions of different lengths stepping at once share passes, and each gets transformers' answer."""
    folder = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    executor = Executor(lean_span(folder, 0, 6), cache_tokens=4096, max_length=64)
    torch.manual_seed(4)
    lengths = [3, 9, 17, 30]
    sequences = [torch.randint(3, model.config.vocab_size, (1, n + 6)) for n in lengths]

    async def run():
        sessions = [executor.open(f"s{i}", 0, 6, 1, 64, torch.float32) for i in range(len(lengths))]
        embeds = [model.model.embed_tokens(ids).detach() for ids in sequences]
        outs = await asyncio.gather(*(executor.step(s, e[:, :n], None, None, 0)
                                      for s, e, n in zip(sessions, embeds, lengths)))
        outputs = [[o] for o in outs]
        for k in range(6):
            outs = await asyncio.gather(*(executor.step(s, e[:, n + k : n + k + 1], None, None, n + k)
                                          for s, e, n in zip(sessions, embeds, lengths)))
            for collected, out in zip(outputs, outs):
                collected.append(out)
        for session in sessions:
            executor.close(session.session_id)
        return [torch.cat(o, dim=1) for o in outputs]

    passes_before = executor.passes
    results = asyncio.run(run())
    executor.shutdown()
    steps = executor.batched_steps
    assert steps == 4 * 7
    assert executor.passes - passes_before < steps, "no two sessions ever shared a pass"
    for ids, got in zip(sequences, results):
        torch.testing.assert_close(got, all_layers(model, ids), rtol=1e-5, atol=1e-5)
    assert executor.sessions.reserved_tokens == 0


def test_batch_window_gathers_the_steps_of_recently_active_sessions(tiny_model_dir):
    """A step that arrives a little after another session's joins its pass when both sessions are active;
    a lone session never waits for the window."""
    import time

    folder = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hidden = model.model.embed_tokens(torch.randint(3, model.config.vocab_size, (1, 4))).detach()

    async def staggered(executor: Executor, sessions) -> tuple[int, int]:
        """Step every session once, 20 ms apart; returns (passes, steps) it took."""
        passes, steps = executor.passes, executor.batched_steps

        async def late(session, delay):
            await asyncio.sleep(delay)
            return await executor.step(session, hidden[:, 3:4], None, None, 3)

        await asyncio.gather(*(late(s, 0.02 * i) for i, s in enumerate(sessions)))
        return executor.passes - passes, executor.batched_steps - steps

    async def run(batch_wait: float):
        executor = Executor(lean_span(folder, 0, 6), cache_tokens=4096, max_length=64, batch_wait=batch_wait)
        sessions = [executor.open(f"s{i}", 0, 6, 1, 64, torch.float32) for i in range(3)]
        for session in sessions:  # a prefill each: all three sessions are now active here
            await executor.step(session, hidden[:, :3], None, None, 0)
        together = await staggered(executor, sessions)
        for session in sessions[1:]:
            executor.close(session.session_id)
        started = time.monotonic()
        await executor.step(sessions[0], hidden[:, 3:4], None, None, 3)  # alone now: no window
        alone = time.monotonic() - started
        executor.shutdown()
        return together, alone

    together, alone = asyncio.run(run(batch_wait=1.0))
    assert together == (1, 3), f"three steps 20 ms apart should share one pass with a 1 s window, got {together}"
    assert alone < 0.5, f"a lone session waited {alone:.2f} s for a batch window"
    apart, _ = asyncio.run(run(batch_wait=0.0))
    assert apart[0] > 1, "with no window, steps 20 ms apart run in separate passes"


def test_a_lone_decode_step_runs_on_the_event_loop_and_others_on_the_compute_thread(tiny_model_dir):
    """A lone session's one-token steps run on the event loop's thread (no hand-over to the compute thread and
    back), its prefill on the compute thread; with inline_decode=False every step takes the compute thread. The
    outputs are transformers' either way. A decode step that another active session's step may join (the batch
    window) is not run inline: the two share one pass."""
    import threading

    folder = tiny_model_dir("llama")
    _, embeds, expected = embedded_rows(folder, 2, 8, seed=3)

    async def alone(inline: bool):
        executor = Executor(lean_span(folder, 0, 6), cache_tokens=4096, max_length=64, inline_decode=inline)
        span, threads = executor.lean, []
        run = span.run

        def recording(*args, **kwargs):
            threads.append(threading.get_ident())
            return run(*args, **kwargs)

        span.run = recording
        session = executor.open("s", 0, 6, 1, 64, torch.float32)
        outs = [await executor.step(session, embeds[:1, :5], None, None, 0)]
        for position in range(5, 8):
            while executor.compute_busy:  # the compute thread may still be finishing the prefill's job
                await asyncio.sleep(0.001)
            outs.append(await executor.step(session, embeds[:1, position : position + 1], None, None, position))
        executor.shutdown()
        loop_thread = threading.get_ident()
        return torch.cat(outs, dim=1), [t == loop_thread for t in threads], executor.inline_passes

    out, on_loop, inline_passes = asyncio.run(alone(True))
    assert on_loop == [False, True, True, True] and inline_passes == 3
    torch.testing.assert_close(out, expected[:1], rtol=1e-5, atol=1e-5)
    out, on_loop, inline_passes = asyncio.run(alone(False))
    assert on_loop == [False] * 4 and inline_passes == 0
    torch.testing.assert_close(out, expected[:1], rtol=1e-5, atol=1e-5)

    async def together():
        # a window shorter than RECENT (1 s): s1's prefill waits it out for s0, which then still counts as active
        executor = Executor(lean_span(folder, 0, 6), cache_tokens=4096, max_length=64, batch_wait=0.3)
        sessions = [executor.open(f"s{i}", 0, 6, 1, 64, torch.float32) for i in range(2)]
        for i, session in enumerate(sessions):  # both sessions active here now
            await executor.step(session, embeds[i : i + 1, :7], None, None, 0)
        passes, inline = executor.passes, executor.inline_passes

        async def later(i):
            await asyncio.sleep(0.02 * i)
            return await executor.step(sessions[i], embeds[i : i + 1, 7:8], None, None, 7)

        outs = await asyncio.gather(later(0), later(1))
        executor.shutdown()
        return outs, executor.passes - passes, executor.inline_passes - inline

    outs, passes, inline = asyncio.run(together())
    assert (passes, inline) == (1, 0), f"two active sessions' steps 20 ms apart: {passes} passes, {inline} inline"
    for i, out in enumerate(outs):
        torch.testing.assert_close(out, expected[i : i + 1, 7:8], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not mkl_packing_available(), reason="this torch has no MKL (packing is skipped there too)")
def test_packed_weights_pass_gradients_like_transformers(tiny_model_dir):
    """A node's Backward runs the lean pass with autograd: through packed weights the input gradient equals
    transformers' own, and unpacking a weight gives it back bit for bit."""
    folder = tiny_model_dir("qwen2")  # q/k/v biases: the packed product adds them
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    span = lean_span(folder, 0, 5, packed=True)
    torch.manual_seed(0)
    embeds = torch.randn(2, 12, model.config.hidden_size)
    positions = torch.arange(12)[None].expand(2, 12)
    upstream = torch.randn(2, 12, model.config.hidden_size)
    ours, theirs = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(span(ours, positions), [ours], upstream)
    hidden = model.model(inputs_embeds=theirs, position_ids=positions, output_hidden_states=True).hidden_states[5]
    (want,) = torch.autograd.grad(hidden, [theirs], upstream)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    weight_t = torch.randn(64, 96)
    assert torch.equal(PackedWeight(weight_t).unpack(), weight_t)


@pytest.mark.skipif(not mkl_packing_available(), reason="this torch has no MKL (packing is skipped there too)")
@pytest.mark.parametrize("source", ["model-files", "changed-files", "none"])
def test_weights_are_packed_while_passes_batch_and_unpacked_after(tiny_model_dir, tmp_path, source):
    """node/runtime/layout.py: four sessions stepping together get the weights packed; one session alone
    afterwards gets them plain again, bit for bit the matrices it started with; every answer stays exact.
    They are unpacked by reading them again from the model files; from files that changed since the load
    (caught by the probe product) or without files, by products with the identity."""
    from node.model.loader import WeightSource

    folder = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    span = lean_span(folder, 0, 6)
    assert span.source is not None
    if source == "changed-files":  # the same architecture, other weights
        changed = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            for parameter in changed.parameters():
                parameter.add_(0.01)
        changed.save_pretrained(tmp_path / "changed")
        span.source = WeightSource(ModelFiles.open(str(tmp_path / "changed")), span.source.prefix, torch.float32)
    elif source == "none":
        span.source = None
    original = [layer.gate_up_t.clone() for layer in span.lean.layers]
    executor = Executor(span, cache_tokens=4096, max_length=64, batch_wait=0.5, pack=True)
    torch.manual_seed(5)
    ids = torch.randint(3, model.config.vocab_size, (4, 40))
    embeds = model.model.embed_tokens(ids).detach()

    def kinds() -> set[str]:
        return {type(layer.gate_up_t).__name__ for layer in span.lean.layers}

    async def run():
        sessions = [executor.open(f"s{i}", 0, 6, 1, 64, torch.float32) for i in range(4)]
        outs = list(await asyncio.gather(*(executor.step(s, embeds[i : i + 1, :4], None, None, 0)
                                           for i, s in enumerate(sessions))))
        outputs = [[o] for o in outs]
        for t in range(4, 14):  # together
            outs = await asyncio.gather(*(executor.step(s, embeds[i : i + 1, t : t + 1], None, None, t)
                                          for i, s in enumerate(sessions)))
            for collected, out in zip(outputs, outs):
                collected.append(out)
        await executor.settled()
        packed = kinds()
        for t in range(14, 40):  # the first session alone
            outputs[0].append(await executor.step(sessions[0], embeds[:1, t : t + 1], None, None, t))
        await executor.settled()
        for session in sessions:
            executor.close(session.session_id)
        return packed, [torch.cat(o, dim=1) for o in outputs]

    packed, results = asyncio.run(run())
    executor.shutdown()
    assert packed == {"PackedWeight"}, "four sessions in every pass: the weights should be packed"
    assert kinds() == {"Tensor"}, "one session alone for 26 steps: the weights should be plain again"
    assert all(torch.equal(layer.gate_up_t, w) for layer, w in zip(span.lean.layers, original))
    # every matrix read again, or none (a changed file is caught at the first one and never read from again)
    assert executor.layout.read_again == (4 * 6 if source == "model-files" else 0)
    expected = all_layers(model, ids)
    torch.testing.assert_close(results[0], expected[:1], rtol=1e-5, atol=1e-5)
    for i in range(1, 4):
        torch.testing.assert_close(results[i], expected[i : i + 1, :14], rtol=1e-5, atol=1e-5)


def test_a_node_can_be_told_never_to_pack(tiny_model_dir):
    span = lean_span(tiny_model_dir("llama"), 0, 2)
    assert Executor(span, cache_tokens=64, max_length=32, pack=False).layout is None
    assert (Executor(span, cache_tokens=64, max_length=32, pack=True).layout is not None) == mkl_packing_available()



def test_static_cache_memory_grows_with_the_session_in_chunks():
    """A session's cache holds KV_CHUNK-token chunks as its length grows, not its whole max_length upfront; the
    span's meter counts what is held, and gets it back when the cache goes. Values survive each growth."""
    import gc

    from node.model.lean import KV_CHUNK, KVMeter, StaticKV

    meter = KVMeter()
    layers, heads, dim = 3, 2, 8
    per_token = 2 * layers * heads * dim * 4  # keys + values, float32, batch 1
    cache = StaticKV(layers, 1, heads, 4 * KV_CHUNK, dim, torch.float32, torch.device("cpu"), meter=meter)
    assert meter.bytes == 0
    first = torch.randn(1, heads, 5, dim)
    for layer in range(layers):
        cache.write(layer, 0, first, -first)
    cache.length = 5
    assert cache.capacity == KV_CHUNK and meter.bytes == KV_CHUNK * per_token
    more = torch.randn(1, heads, KV_CHUNK, dim)
    keys, values = cache.write(0, 5, more, -more)
    assert cache.capacity == 2 * KV_CHUNK and meter.bytes == 2 * KV_CHUNK * per_token
    assert torch.equal(keys, torch.cat([first, more], dim=2)) and torch.equal(values, -keys)
    del cache, keys, values
    gc.collect()
    assert meter.bytes == 0
