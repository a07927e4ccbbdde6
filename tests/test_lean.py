"""The lean runtime (fused weights, static KV cache, batched decoding) against plain transformers."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from node.model.fast_linear import transpose_linears
from node.model.loader import ModelFiles, load_span
from node.runtime.executor import Executor

LEAN_FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]  # mistral's tiny config has a 16-token sliding window


def lean_span(folder, start, end, transposed=True):
    span, _ = load_span(ModelFiles.open(str(folder)), start, end, torch.device("cpu"), torch.float32)
    if transposed:
        transpose_linears(span)
    assert span.make_lean() is None
    return span


def reference_hidden(model, ids, mask, layers):
    """Hidden states after `layers` decoder layers, as transformers computes them (positions skip padding)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model.model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    return out.hidden_states[layers], positions


@pytest.mark.parametrize("family", LEAN_FAMILIES)
def test_prefill_decode_and_rewind_match_transformers(family, tiny_model_dir):
    folder = tiny_model_dir(family)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    span = lean_span(folder, 0, 5, transposed=family != "qwen2")  # both weight layouts
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
        with torch.no_grad():  # all 6 layers, before the final norm
            hidden = model.model.embed_tokens(ids)
            positions = torch.arange(ids.shape[1])[None]
            rotary = model.model.rotary_emb(hidden, positions)
            for layer in model.model.layers:
                hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
        torch.testing.assert_close(got, hidden, rtol=1e-5, atol=1e-5)
    assert executor.sessions.reserved_tokens == 0
