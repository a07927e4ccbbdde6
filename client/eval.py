"""Perplexity over a text, through the swarm or any local causal LM: the quality check to run
before trusting a swarm (quantised nodes, a new family, a node you do not know).

Sliding window, as in transformers' perplexity guide: windows of `window` tokens start every
`stride` tokens; each token is scored once, in the first window that ends after it, with as much
left context as that window gives it. One function for both sides, so a swarm and a local model
are scored by exactly the same arithmetic."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Perplexity:
    nll: float      # mean negative log-likelihood per scored token, in nats
    tokens: int     # tokens scored (every token after the first)
    windows: int    # forward passes made

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    def as_json(self) -> dict:
        return {"perplexity": self.perplexity, "nll": self.nll, "tokens": self.tokens, "windows": self.windows}


def window_starts(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of every window over `length` tokens. Pure; tested directly.

    The first window scores its tokens 1..window-1; each next one ends `stride` tokens later and
    scores only those, so every token keeps at least `window - stride` tokens of context."""
    if window < 2 or not 0 < stride < window:
        raise ValueError(f"need window >= 2 and 0 < stride < window (got window={window}, stride={stride})")
    end = min(window, length)
    spans = [(0, end, 1)]  # the first token has no context: it is never scored
    while end < length:
        first, end = end, min(end + stride, length)
        spans.append((max(0, end - window), end, first))
    return spans


@torch.inference_mode()
def perplexity(model, input_ids: torch.Tensor, window: int = 512, stride: int = 256,
               advance: Callable[[float], None] | None = None, greedy: list[torch.Tensor] | None = None) -> Perplexity:
    """Perplexity of `model` (anything called as `model(input_ids=...).logits`) over `input_ids` [tokens] or [1,
    tokens]. `greedy`: a list this extends with the model's greedy choice (argmax) for every scored token, in order
    (for `greedy_agreement`)."""
    ids = input_ids.reshape(-1).to(torch.long)
    if ids.numel() < 2:
        raise ValueError("the text must have at least 2 tokens")
    total, count, spans = 0.0, 0, window_starts(ids.numel(), window, stride)
    for begin, end, scored in spans:
        logits = model(input_ids=ids[begin:end].unsqueeze(0)).logits[0].float()
        # logits at position p predict token p + 1; score the targets scored..end-1
        predictions = logits[scored - 1 - begin : end - 1 - begin]
        targets = ids[scored:end]
        if greedy is not None:
            greedy.append(predictions.argmax(dim=-1))
        total += F.cross_entropy(predictions, targets, reduction="sum").item()
        count += targets.numel()
        if advance is not None:
            advance(1)
    return Perplexity(nll=total / count, tokens=count, windows=len(spans))


def greedy_agreement(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The share of scored tokens where two models' greedy choices (`perplexity(..., greedy=)`) are the same token,
    each given the text's own tokens before it (teacher forcing: one divergence does not carry over to the next)."""
    a, b = torch.cat(ours), torch.cat(reference)
    if a.shape != b.shape or not a.numel():
        raise ValueError(f"greedy choices over different tokens ({a.numel()} and {b.numel()})")
    return float((a == b).float().mean())
