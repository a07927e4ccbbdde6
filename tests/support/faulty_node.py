"""Deliberately faulty nodes for tests: a real in-process node whose executor adds noise to the hidden states it
returns (verification tests), or one slower than it advertises (routing tests). Test-only: production code has no
flag for these."""

from __future__ import annotations

import asyncio

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


class SlowExecutor(Executor):
    """Computes honestly, but every session step takes `delay` seconds more (a node slower than it advertises)."""

    delay = 0.0  # set by make_slow
    steps = 0

    async def step(
        self, session, hidden, position_ids, attention_mask, position, prompts=None, convoy=None
    ) -> torch.Tensor:
        self.steps += 1
        await asyncio.sleep(self.delay)
        return await super().step(session, hidden, position_ids, attention_mask, position, prompts, convoy)


def make_slow(node: RunningNode, delay: float) -> SlowExecutor:
    """Make a started node's executor (before any session) `delay` seconds slower per step than it is."""
    executor = node.serving.executor
    executor.__class__ = SlowExecutor
    executor.delay = delay
    return executor
