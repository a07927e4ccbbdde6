"""Mixture-of-experts and multi-head latent attention, in-process: variants too costly for a swarm each,
the layout of the tiny MoE configs, and the cache/weight accounting a node's budget rests on."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from common.weights.files import ModelFiles
from node.model.loader import bytes_per_layer, load_span
from node.runtime.sessions import kv_bytes_per_token
from tests.conftest import TINY_SPANS
from tests.support.families import FAMILIES, VARIANTS, tiny_config

CPU = torch.device("cpu")
PREFILL, DECODE = 12, 8
MOE_FAMILIES = ["mixtral", "deepseek_v3", "deepseek_v2", "qwen2_moe", "qwen3_moe"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_spans_match_transformers(variant, tiny_model_dir):
    """Three spans in a chain, prefill then decode, equal transformers' hidden states at every boundary."""
    folder = tiny_model_dir(variant)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (1, PREFILL + DECODE))
    with torch.no_grad():
        expected = model.model(ids, output_hidden_states=True).hidden_states
    hidden = expected[0]
    for start, end in TINY_SPANS:
        span, _ = load_span(ModelFiles.open(str(folder)), start, end, CPU, torch.float32)
        cache = span.new_cache()
        with torch.no_grad():
            outputs = [span(hidden[:, :PREFILL], torch.arange(PREFILL)[None], cache=cache)]
            for t in range(PREFILL, PREFILL + DECODE):
                outputs.append(span(hidden[:, t : t + 1], torch.tensor([[t]]), cache=cache))
        hidden = torch.cat(outputs, dim=1)
        want = expected[end] if end < len(expected) - 1 else None
        if want is not None:  # the last entry is after the final norm
            torch.testing.assert_close(hidden, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.model.norm(hidden), expected[-1], rtol=1e-5, atol=1e-5)


def _mlp_kinds(model: nn.Module) -> list[str]:
    return [type(layer.mlp).__name__ for layer in model.model.layers]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_tiny_moe_configs_route_and_mix_layer_kinds(family):
    """Several experts, top-k >= 2, and dense and sparse layers mixed, within a span and across nodes."""
    config = tiny_config(family)
    experts = (
        getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or config.n_routed_experts
    )
    assert experts >= 4 and config.num_experts_per_tok >= 2
    with torch.device("meta"):
        kinds = _mlp_kinds(AutoModelForCausalLM.from_config(config))
    if family == "mixtral":  # every layer is sparse
        assert len(set(kinds)) == 1
        return
    assert len(set(kinds)) == 2, kinds
    switches = [b for b in range(1, len(kinds)) if kinds[b - 1] != kinds[b]]
    boundaries = [b for _, b in TINY_SPANS[:-1]]
    if family == "deepseek_v3":  # dense -> MoE inside the first span
        assert switches == [1], kinds
    else:  # dense -> MoE (or back) between two nodes
        assert set(switches) & set(boundaries), kinds


def _cached_bytes_per_token(cache, tokens: int) -> int:
    """The bytes a prefill of `tokens` tokens left in transformers' DynamicCache, per token."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    assert total % tokens == 0
    return total // tokens


@pytest.mark.parametrize("family", FAMILIES + VARIANTS)
def test_kv_bytes_per_token_is_what_the_cache_holds(family):
    """The node's budget estimate equals the real cache tensors after a prefill (MLA: the compressed
    latent + rotary key, with key and value widths that differ; sliding windows not cut yet)."""
    config = tiny_config(family)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    batch, tokens = 2, 8  # shorter than mistral's 16-token window
    with torch.no_grad():
        out = model(torch.randint(3, config.vocab_size, (batch, tokens)), use_cache=True)
    real = _cached_bytes_per_token(out.past_key_values, batch * tokens)
    assert kv_bytes_per_token(config, config.num_hidden_layers, torch.float32) == real
    per_layer = real // config.num_hidden_layers
    assert kv_bytes_per_token(config, 3, torch.bfloat16) == 3 * per_layer // 2  # a span of 3 layers, half the bytes


def test_mla_cache_is_the_compressed_latent(tiny_model_dir):
    """A DeepSeek node's cache holds kv_lora_rank + qk_rope_head_dim per token and layer, far below
    per-head keys and values (heads x (qk_nope + qk_rope + v_head_dim))."""
    config = tiny_config("deepseek_v2")
    span, _ = load_span(ModelFiles.open(str(tiny_model_dir("deepseek_v2"))), 2, 4, CPU, torch.float32)
    cache = span.new_cache()
    with torch.no_grad():
        span(torch.randn(1, 5, config.hidden_size), torch.arange(5)[None], cache=cache)
    widths = [(layer.keys.shape[-1], layer.values.shape[-1]) for layer in cache.layers[2:4]]
    assert widths == [(config.kv_lora_rank, config.qk_rope_head_dim)] * 2
    assert _cached_bytes_per_token(cache, 5) == kv_bytes_per_token(config, 2, torch.float32) == 2 * (16 + 8) * 4
    per_head = config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    assert kv_bytes_per_token(config, 2, torch.float32) < 2 * per_head * 4


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "deepseek_v2"])
def test_bytes_per_layer_is_the_largest_sparse_layer(family):
    """Placement sizes spans by the largest layer: with dense and sparse layers mixed, a sparse one
    (all its experts, shared expert and router included)."""
    config = tiny_config(family)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    sizes = [
        sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in model.model.layers
    ]  # routers may stay float32
    kinds = _mlp_kinds(model)
    largest = max(range(len(sizes)), key=sizes.__getitem__)
    assert "Moe" in kinds[largest] or "Sparse" in kinds[largest]
    assert bytes_per_layer(config, torch.bfloat16) == sizes[largest] > min(sizes)
