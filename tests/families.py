"""Tiny random configs of the decoder-only families we support, for exactness tests."""

from __future__ import annotations

from transformers import (
    DeepseekV3Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Qwen2Config,
    Qwen3Config,
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
    if family == "deepseek_v3":
        common = dict(COMMON, num_key_value_heads=4)
        return DeepseekV3Config(
            **common,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        )
    raise KeyError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "deepseek_v3"]
