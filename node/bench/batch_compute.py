"""What batching gives when only the computation takes time.

N sessions stepping together cost each node one pass of N rows instead of N passes of one, and the client
one head product of N rows. If nothing but those computations took time, a round of one token for every
session would last nodes x pass(N rows) + head(N rows), against nodes x pass(1 row) + head(1 row) for one
session alone, so N sessions would give

    N x (nodes x pass(1) + head(1)) / (nodes x pass(N) + head(N))

times one session's tokens/s. A real chain also spends time outside the computation (transport, event
loops, Python): what of it each round pays once (latency) raises the ratio toward N, what each session
pays lowers it. So this is the ratio a chain tends to as it gets faster, the more so the less it spends
per session. Timed here in one process (alternating rounds, medians) on a node's span as it serves it
(lean runtime, exact compact weights where they hold, a decode pass's threads) and on the client's head as
the client runs it (its exact copy where one holds); `exact=False` times both dense."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

CACHE_PAST = 32  # tokens each session's cache holds before the timed step (a prompt and a few tokens)


@dataclass(frozen=True)
class BatchCompute:
    rows: int            # sessions stepping together
    nodes: int
    pass_one_ms: float   # a node's pass over one session's one-token step
    pass_many_ms: float  # over `rows` sessions' steps at once
    head_one_ms: float
    head_many_ms: float

    @property
    def round_one_ms(self) -> float:
        return self.nodes * self.pass_one_ms + self.head_one_ms

    @property
    def round_many_ms(self) -> float:
        return self.nodes * self.pass_many_ms + self.head_many_ms

    @property
    def ratio(self) -> float:
        """What `rows` sessions give over one session's tokens/s when only the computation takes time."""
        return self.rows * self.round_one_ms / self.round_many_ms


def batch_compute(model: Path, nodes: int, rows: int = 8, rounds: int = 30, exact: bool = True) -> BatchCompute:
    """Time the first node's span (1/nodes of the layers) and the head at 1 and `rows` rows."""
    from common.weights.client_parts import load_client_parts
    from common.weights.exact import ExactWeight, pass_threads, shared_kernels
    from common.weights.files import ModelFiles
    from node.model.compact import exact_span, span_kernels
    from node.model.lean import Row
    from node.model.loader import load_span

    files = ModelFiles.open(str(model))
    layers = files.config().num_hidden_layers
    end = max(1, layers // nodes)
    span, _ = load_span(files, 0, end, torch.device("cpu"), torch.float32)
    if span.make_lean() is not None:
        raise ValueError("timing the batch computation needs a family with a lean runtime")
    if exact:
        exact_span(span)
    weight = load_client_parts(files, torch.device("cpu"), torch.float32).lm_head.weight.detach()
    kernels = shared_kernels() if exact else None
    held = ExactWeight.of(weight, kernels) if kernels is not None else None

    def head(x: torch.Tensor) -> torch.Tensor:
        return held.product(x) if held is not None else F.linear(x, weight)

    lean, hidden, pass_kernels = span.lean, span.config.hidden_size, span_kernels(span)

    def sessions(count: int) -> list[Row]:
        made = []
        for i in range(count):
            cache = lean.new_cache(0, end, 1, CACHE_PAST + 8)
            cache.length = CACHE_PAST
            made.append(Row(torch.randn(1, 1, hidden), torch.tensor([[CACHE_PAST]]), CACHE_PAST, cache, None, None,
                            None))
        return made

    steps = {1: sessions(1), rows: sessions(rows)}
    inputs = {1: torch.randn(1, hidden), rows: torch.randn(rows, hidden)}
    passes: dict[int, list[float]] = {1: [], rows: []}
    heads: dict[int, list[float]] = {1: [], rows: []}
    with torch.inference_mode():
        for round_ in range(rounds + 1):
            for count in (1, rows):
                started = time.perf_counter()
                with pass_threads(pass_kernels, count):
                    lean.run(steps[count], 0, end)
                middle = time.perf_counter()
                head(inputs[count])
                if round_:  # the first round warms up
                    passes[count].append(middle - started)
                    heads[count].append(time.perf_counter() - middle)
    ms = {key: {count: 1000 * statistics.median(values) for count, values in table.items()}
          for key, table in (("pass", passes), ("head", heads))}
    return BatchCompute(rows, nodes, ms["pass"][1], ms["pass"][rows], ms["head"][1], ms["head"][rows])
