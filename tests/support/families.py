"""Tiny random configs of the decoder-only families we support, for exactness tests."""

from __future__ import annotations

from transformers import (
    DeepseekV2Config,
    DeepseekV3Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)

# Multi-head latent attention (DeepSeek): queries through a low-rank q_lora_rank (or one projection when
# None), keys/values from a kv_lora_rank latent; the cache holds the latent plus the shared rotary key.
MLA = dict(
    num_key_value_heads=4,
    moe_intermediate_size=32,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
)
# What real DeepSeek-V2/V3 checkpoints use: YaRN with an mscale that also changes the attention scale.
YARN = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=128,
    beta_fast=32,
    beta_slow=1,
    mscale=0.707,
    mscale_all_dim=0.707,
)


def tiny_config(family: str):
    if family == "llama":
        return LlamaConfig(**COMMON)
    if family == "mistral":
        return MistralConfig(**COMMON, sliding_window=16)  # shorter than the tests' sequences: the window matters
    if family == "qwen2":
        return Qwen2Config(**COMMON)
    if family == "qwen3":
        return Qwen3Config(**COMMON, head_dim=16)
    if family == "mixtral":
        return MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen2_moe":  # decoder_sparse_step 2: layers 0, 2, 4 dense, 1, 3, 5 sparse (+ a shared expert)
        return Qwen2MoeConfig(
            **COMMON,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=8,
            num_experts_per_tok=2,
            decoder_sparse_step=2,
        )
    if family == "qwen3_moe":  # mlp_only_layers: layers 0 and 3 dense, the others sparse
        return Qwen3MoeConfig(
            **COMMON, head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            mlp_only_layers=[0, 3], norm_topk_prob=True,
        )
    if family == "deepseek_v2":  # layers 0, 1 dense, 2..5 MoE: the first span boundary is dense | MoE
        return DeepseekV2Config(**dict(COMMON, **MLA), first_k_dense_replace=2, topk_method="greedy")
    if family == "deepseek_v2_group_yarn":  # group-limited routing, no query LoRA, YaRN rotary (complex freqs)
        return DeepseekV2Config(
            **{**COMMON, **MLA, "q_lora_rank": None}, first_k_dense_replace=1,
            topk_method="group_limited_greedy", n_group=2, topk_group=1, rope_parameters=dict(YARN),
        )
    if family in ("deepseek_v3", "deepseek_v3_yarn"):
        extra = dict(rope_parameters=dict(YARN)) if family == "deepseek_v3_yarn" else {}
        return DeepseekV3Config(**dict(COMMON, **MLA), first_k_dense_replace=1, n_group=2, topk_group=1, **extra)
    raise KeyError(family)


# Every family proven end to end through three nodes (tests/test_families.py).
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "deepseek_v3", "deepseek_v2", "qwen2_moe", "qwen3_moe"]
# Variants of those families proven in-process, span by span (tests/test_moe_mla.py): cheaper than a swarm.
VARIANTS = ["deepseek_v2_group_yarn", "deepseek_v3_yarn"]
