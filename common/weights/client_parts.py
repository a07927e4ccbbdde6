"""What a client runs locally: token embeddings, the final norm and the LM head, read without the layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from common.weights import gguf
from common.weights.errors import ModelLoadError
from common.weights.files import ModelFiles
from common.weights.reading import LoadStats, check_materialised, decoder_layers, load_tensors, skeleton


@dataclass
class ClientParts:
    """What a client runs locally: token embeddings, the final norm and the LM head."""

    config: PretrainedConfig
    embed_tokens: nn.Module
    norm: nn.Module
    lm_head: nn.Module
    stats: LoadStats


def load_client_parts(files: ModelFiles, device: torch.device, dtype: torch.dtype) -> ClientParts:
    config = files.config()
    model = skeleton(config, dtype)
    prefix, _ = decoder_layers(model, config.num_hidden_layers)
    if files.gguf is not None:


        outside_layers = lambda name: gguf.layer_of(name) is None  # noqa: E731
        stats = gguf.load_tensors(gguf.read_header(files.gguf), model, outside_layers, device, dtype)
    else:
        weight_map = files.weight_map()
        keys = [key for key in weight_map if not key.startswith(prefix + ".")]
        stats = load_tensors(files, model, keys, weight_map, device, dtype)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight.is_meta and getattr(config, "tie_word_embeddings", False):
        head.weight = embed.weight
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    norm = getattr(base, "norm", None)
    if norm is None:
        raise ModelLoadError(f"{type(model).__name__} has no final norm at '{prefix.rsplit('.', 1)[0]}.norm'")
    parts = ClientParts(config=config, embed_tokens=embed, norm=norm, lm_head=head, stats=stats)
    for name, module in (("embeddings", embed), ("final norm", norm), ("LM head", head)):
        check_materialised(module, name)
        module.eval().requires_grad_(False)
    return parts
