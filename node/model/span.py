"""A contiguous span of decoder layers `[start, end)` and its forward pass.

Plain torch: no networking here. The layers are transformers' own classes, run with
the same recipe as the family's `XModel.forward` (rotary once, a causal mask per
attention type, then each layer with the shared cache)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from node.model.lean import LeanSpan, Row, lean_unsupported


def attention_types(config: PretrainedConfig) -> list[str]:
    """The attention type of every layer, as the family's model forward decides it."""
    n = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return list(layer_types)[:n]
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return ["sliding_attention"] * n
    return ["full_attention"] * n


_MASK_FUNCTIONS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


class SpanModel(nn.Module):
    """Layers `[start, end)` of a decoder-only model, with global layer indices kept."""

    def __init__(self, config: PretrainedConfig, start: int, end: int, layers: nn.ModuleList, rotary: nn.Module | None):
        super().__init__()
        self.config = config
        self.start = start
        self.end = end
        self.layers = layers  # layers[i] is global layer start + i
        self.rotary_emb = rotary
        types = attention_types(config)[start:end]
        unknown = sorted(set(types) - set(_MASK_FUNCTIONS))
        if unknown:
            raise NotImplementedError(f"attention types {unknown} are not supported yet")
        self.layer_types = types
        self.lean = None  # a LeanSpan once `make_lean` succeeded: every pass runs on it then
        self.source = None  # node/model/loader.WeightSource: where the weights can be read again (None: nowhere)

    @property
    def dtype(self) -> torch.dtype:
        return self.lean.dtype if self.lean is not None else next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return self.lean.device if self.lean is not None else next(self.parameters()).device

    def make_lean(self) -> str | None:
        """Switch to the lean runtime (node/model/lean.py) if this family has one; returns why not, or None.

        The layers' own projection weights are released (the fused copies replace them)."""
        reason = lean_unsupported(self)
        if reason is None:
            self.lean = LeanSpan(self)
        return reason

    def new_cache(self, batch: int = 1, max_length: int = 2048, start: int | None = None, end: int | None = None):
        """An empty cache for layers [start, end): static on the lean path, transformers' DynamicCache otherwise."""
        if self.lean is None:
            return DynamicCache(config=self.config)
        start = self.start if start is None else start
        end = self.end if end is None else end
        return self.lean.new_cache(start, end, batch, max_length)

    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        start: int | None = None,
        end: int | None = None,
        adapter=None,
    ) -> torch.Tensor:
        """Run layers `[start, end)` (default: the whole span) over `hidden` [batch, tokens, hidden].

        `attention_mask` is the 2D mask over past + new tokens (None means no padding);
        `cache` holds the past keys/values by global layer index and is updated in place;
        `adapter` is a node/model/lora.LoraAdapter to apply (None: the base model)."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        if self.lean is not None:
            return self._lean_forward(hidden, position_ids, attention_mask, cache, start, end, adapter)
        if adapter is not None:
            with adapter.hooked(self):  # forward hooks on the targeted projections, for this call only
                return self.forward(hidden, position_ids, attention_mask, cache, start, end)
        mask_kwargs = dict(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            layer_idx=start,
        )
        masks = {
            kind: _MASK_FUNCTIONS[kind](**mask_kwargs)
            for kind in set(self.layer_types[start - self.start : end - self.start])
        }
        position_embeddings = self.rotary_emb(hidden, position_ids) if self.rotary_emb is not None else None
        for index in range(start, end):
            hidden = self.layers[index - self.start](
                hidden,
                attention_mask=masks[self.layer_types[index - self.start]],
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                cache=cache,
                use_cache=cache is not None,
            )
            if isinstance(hidden, tuple):  # a few families still return (hidden, ...)
                hidden = hidden[0]
        return hidden

    def forward_prompted(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         start: int, end: int, prompts: torch.Tensor | None, adapter=None,
                         cache: DynamicCache | None = None) -> torch.Tensor:
        """A pass over `[start, end)` with deep prompts (Petals-style deep prompt tuning): before each
        layer `start + i`, `prompts[i]` ([batch, prompt_tokens, hidden]) is added to the first prompt_tokens
        positions of the hidden states. Without prompts, one ordinary pass. Differentiable (no in-place writes).

        `cache` (a session's prefill; the generic path only: the lean one takes prompts in its `Row`) is updated
        layer by layer as in `forward`."""
        if prompts is None:
            return self(hidden, position_ids, attention_mask, cache, start=start, end=end, adapter=adapter)
        if cache is not None and self.lean is not None:
            raise ValueError("on the lean path, a cached pass takes its deep prompts in its Row")
        count = prompts.shape[2]
        for index in range(start, end):
            hidden = torch.cat([hidden[:, :count] + prompts[index - start], hidden[:, count:]], dim=1)
            hidden = self(hidden, position_ids, attention_mask, cache, start=index, end=index + 1, adapter=adapter)
        return hidden

    def _lean_forward(self, hidden, position_ids, attention_mask, cache, start: int, end: int,
                      adapter=None) -> torch.Tensor:
        past = cache.length if cache is not None else 0
        tokens = hidden.shape[1]
        if cache is not None and past + tokens > cache.max_length:
            raise ValueError(f"the cache holds {cache.max_length} tokens; {past} + {tokens} do not fit")
        row = Row(hidden, position_ids.expand(hidden.shape[0], tokens), past, cache, attention_mask, adapter)
        return self.lean.run([row], start, end)[0]
