"""A deliberately faulty node for the verification tests: a real in-process node whose executor adds
noise to the hidden states it returns. Test-only: production code has no flag for this."""

from __future__ import annotations

import torch

from node.runtime.executor import Executor
from node.server import RunningNode


class LyingExecutor(Executor):
    """Computes honestly, then perturbs its outputs from its `honest_steps`-th session step on (counted over
    all sessions): noise of `scale` times each token's own norm."""

    honest_steps = 0  # set by make_liar
    scale = 0.5
    steps = 0  # steps computed
    lies = 0  # of which returned wrong

    async def step(
        self, session, hidden, position_ids, attention_mask, position, prompts=None, convoy=None
    ) -> torch.Tensor:
        out = await super().step(session, hidden, position_ids, attention_mask, position, prompts, convoy)
        self.steps += 1
        if self.steps <= self.honest_steps:
            return out
        self.lies += 1
        noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(self.steps), dtype=torch.float32)
        norm = out.float().norm(dim=-1, keepdim=True) / out.shape[-1] ** 0.5
        return (out.float() + self.scale * norm * noise).to(out.dtype)


def make_liar(node: RunningNode, honest_steps: int = 0, scale: float = 0.5) -> LyingExecutor:
    """Turn a started node's executor (before any session) into a lying one: same layers, same limits."""
    executor = node.serving.executor
    executor.__class__ = LyingExecutor
    executor.honest_steps, executor.scale = honest_steps, scale
    return executor
