"""Draft lengths for speculative decoding through the swarm.

A pass through the chain costs about the same for a few tokens as for one, but not for many: on SmolLM2 over
3 CPU nodes, 1, 2, 3, 5 and 9 tokens took 90, 95, 103, 105 and 149 ms, about 8 % more per draft token.
transformers' prompt lookup always drafts as many tokens as it finds (up to `prompt_lookup_num_tokens`), so
where its drafts are wrong the swarm pays for long passes that bring one token.

`AdaptiveDraft` keeps a running estimate of p, the chance that a draft token is accepted given the ones before
it were (tokens accepted / (tokens accepted + drafts cut short), recent drafts weighing most), and drafts the
length k that brings the most tokens per unit of pass cost: (1 + p + ... + p^k) / (1 + PASS_COST_PER_TOKEN k).
Long drafts while the answer copies the text, one-token drafts where it does not. The tokens do not depend on
it: they are the model's own either way.

It drafts only while its generate call is the client's only one (`Calls`; a call that starts beside others
does not even take transformers' assisted loop, client/model.py). With several sessions of one client at once
the nodes' passes already carry a row per session, and drafts lengthen them for everyone: through 3 CPU
nodes (bench-perf's random prompts, 32 tokens each), 4 sessions all drafting made 0.85-0.87x the tokens/s of 4
without, 8 sessions 0.76-1.01x; with these rules 0.95x for 4 (3 rounds) and 0.97x for 8 (6 rounds), while a
lone session kept its 1.05-1.24x on those prompts."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

PASS_COST_PER_TOKEN = 0.08  # a pass's extra cost per draft token, as a share of a one-token pass
DECAY = 0.5                 # weight of the earlier drafts in the estimate, per draft


def best_length(p: float, most: int) -> int:
    """The draft length in 1..most with the most expected tokens per unit of pass cost."""
    best, best_value, expected, term = 1, 0.0, 1.0, 1.0
    for k in range(1, most + 1):
        term *= p
        expected += term
        value = expected / (1 + PASS_COST_PER_TOKEN * k)
        if value > best_value:
            best, best_value = k, value
    return best


class Calls:
    """How many generate calls of one client model run now."""

    def __init__(self):
        self._lock = threading.Lock()
        self.running = 0

    @contextmanager
    def call(self) -> Iterator[None]:
        with self._lock:
            self.running += 1
        try:
            yield
        finally:
            with self._lock:
                self.running -= 1

    def alone(self) -> bool:
        return self.running <= 1


class AdaptiveDraft:
    """Wraps a transformers candidate generator that drafts up to `num_output_tokens` (prompt lookup); drafts
    nothing while `alone()` says other sessions share the nodes' passes."""

    def __init__(self, inner, most: int, alone: Callable[[], bool] = lambda: True):
        self.inner = inner
        self.most = most
        self.alone = alone
        self.accepted = 1.0  # decayed counts behind the estimate of p (it starts at 1: full drafts)
        self.cut_short = 0.0
        self.length = most   # the next draft's length at most
        self.drafted = 0     # the last draft's length
        self.lengths: list[int] = []  # every draft's length (for tests and benchmarks)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)  # requires_model_outputs and the rest of the interface

    @property
    def p(self) -> float:
        return self.accepted / (self.accepted + self.cut_short)

    def get_candidates(self, input_ids: torch.LongTensor, *args, **kwargs):
        if not self.alone():  # a plain step (its statistics untouched)
            self.drafted = 0
            return input_ids, None
        self.inner.num_output_tokens = self.length
        candidates, logits = self.inner.get_candidates(input_ids, *args, **kwargs)
        self.drafted = candidates.shape[1] - input_ids.shape[1]
        if self.drafted:
            self.lengths.append(self.drafted)
        return candidates, logits

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int) -> None:
        self.inner.update_candidate_strategy(input_ids, scores, num_matches)
        if not self.drafted:
            return  # nothing was found to draft: says nothing about how good drafts are
        matches = min(int(num_matches), self.drafted)
        self.accepted = DECAY * self.accepted + matches
        self.cut_short = DECAY * self.cut_short + (matches < self.drafted)
        self.length = best_length(self.p, self.most)


class StopAwareDraft:
    """Ends each draft before a token that would complete one of `stops` (transformers' StopStringCriteria).

    transformers checks stopping criteria once per pass, on the sequence after its last accepted token (only EOS
    and max_length are looked for inside a pass), so a stop string completed by a drafted token in the middle of
    a pass is missed and generation runs on. With drafts cut so, a stop string can only be completed by a pass's
    last token, the model's own, where it is seen: the output is the one without drafts."""

    def __init__(self, inner, stops: tuple):
        self.inner = inner
        self.stops = stops

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def get_candidates(self, input_ids: torch.LongTensor, *args, **kwargs):
        candidates, logits = self.inner.get_candidates(input_ids, *args, **kwargs)
        start = input_ids.shape[1]
        for end in range(start + 1, candidates.shape[1] + 1):
            if any(bool(stop(candidates[:, :end], None).any()) for stop in self.stops):
                keep = end - 1  # the drafts before the one that completes a stop string
                return candidates[:, :keep], logits[:, : keep - start] if logits is not None else None
        return candidates, logits

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int) -> None:
        self.inner.update_candidate_strategy(input_ids, scores, num_matches)
