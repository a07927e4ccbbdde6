"""Pure placement: which contiguous span should a node serve, and when should it move?

Petals' idea: a layer's capacity is the summed throughput of the nodes serving it; a
joining node takes the window holding the weakest layers, so the swarm's weakest
coverage rises as much as it can. No I/O here: plain data in, spans out."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Server:
    """What placement needs to know of a node: its span and its throughput (tokens/s)."""

    node_id: str
    start: int
    end: int
    throughput: float


def layer_throughput(servers: list[Server], num_layers: int) -> list[float]:
    """Per layer: the summed throughput of the servers covering it."""
    totals = [0.0] * num_layers
    for server in servers:
        for layer in range(max(0, server.start), min(num_layers, server.end)):
            totals[layer] += max(server.throughput, 1e-9)  # a node of unknown speed still covers its layers
    return totals


def _slivers_after(totals: list[float], start: int, length: int) -> int:
    """Uncovered runs next to the window [start, start + length) that would be left shorter than `length`: holes no
    later node of the same length can fill without overlapping (2:12 of an empty 30-layer model leaves 0:2)."""
    def run(layers) -> int:
        count = 0
        for layer in layers:
            if totals[layer] > 0:
                break
            count += 1
        return count

    left, right = run(range(start - 1, -1, -1)), run(range(start + length, len(totals)))
    return sum(1 for size in (left, right) if 0 < size < length)


def candidate_spans(servers: list[Server], num_layers: int, length: int,
                    tolerance: float = 0.15) -> list[tuple[Span, float]]:
    """The near-best windows of `length` layers, each with the weight of a random pick among them.

    Near-best: holding as many uncovered layers as the best window does; when none is uncovered, a
    weakest layer within `tolerance` of the swarm's weakest. Equal weights: many nodes choosing from
    one stale view spread over every such window instead of all taking the same one (no weighting
    makes every layer equally likely when `length` does not divide the model; rebalancing evens out
    what chance leaves: see `plan_move`)."""
    length = max(1, min(length, num_layers))
    totals = layer_throughput(servers, num_layers)
    starts = range(num_layers - length + 1)
    uncovered = [sum(1 for t in totals[s : s + length] if t <= 0) for s in starts]
    most = max(uncovered)
    if most > 0:
        near = [s for s in starts if uncovered[s] == most]
        # of those, the ones that leave no sliver (`_slivers_after`), where any do: a sliver stays a hole, as moves
        # never uncover a layer; the rest still spread a wave of joiners over several windows
        clean = [s for s in near if _slivers_after(totals, s, length) == 0]
        near = clean or near
    else:
        weakest = [min(totals[s : s + length]) for s in starts]
        floor = min(weakest) * (1.0 + tolerance)
        near = [s for s in starts if weakest[s] <= floor]
    weight = 1.0 / len(near)
    return [(Span(s, s + length), weight) for s in near]


def choose_span(servers: list[Server], num_layers: int, length: int, rng: random.Random | None = None,
                tolerance: float = 0.15) -> Span:
    """Where a node of `length` layers goes.

    Without `rng`: the window whose throughputs, sorted, are lexicographically smallest (the one
    holding the least-served layers, uncovered ones first; ties to the lowest start), as Petals does.
    With `rng`: a weighted random pick among the near-best windows (`candidate_spans`), so nodes that
    join at once, each seeing the same swarm, do not all pile onto the same layers."""
    length = max(1, min(length, num_layers))
    if rng is not None:
        spans, weights = zip(*candidate_spans(servers, num_layers, length, tolerance))
        return rng.choices(spans, weights)[0]
    best = _best_start(layer_throughput(servers, num_layers), length)
    return Span(best, best + length)


def _best_start(totals: list[float], length: int) -> int:
    """The start `choose_span` picks without `rng` (only the windows sharing the weakest layer get sorted)."""
    starts = range(len(totals) - length + 1)
    weakest = [min(totals[start : start + length]) for start in starts]
    low = min(weakest)
    tied = [start for start in starts if weakest[start] == low]
    if len(tied) == 1:
        return tied[0]
    return min(tied, key=lambda start: (sorted(totals[start : start + length]), start))


def rebalanced_minimum(servers: list[Server], num_layers: int, rounds: int = 5, seed: int = 0) -> float:
    """The weakest layer's throughput after every server, in turn (shuffled), moved to its best window,
    repeated until nobody moves (at most `rounds` passes): what re-placing the whole swarm could reach."""
    spans = tuple(sorted((max(0, s.start), min(num_layers, s.end), max(s.throughput, 1e-9)) for s in servers))
    return _rebalanced_minimum(spans, num_layers, rounds, seed)


@functools.lru_cache(maxsize=64)  # pure: many nodes ask about the same view
def _rebalanced_minimum(spans: tuple[tuple[int, int, float], ...], num_layers: int, rounds: int, seed: int) -> float:
    if not spans:
        return 0.0
    totals = layer_throughput([Server("", *span) for span in spans], num_layers)
    eps = 1e-3 * max(totals)
    placed = [list(span) for span in spans if span[1] > span[0]]
    shuffler = random.Random(seed)
    for _ in range(rounds):
        shuffler.shuffle(placed)
        moved = False
        for span in placed:
            start, end, speed = span
            length = end - start
            for layer in range(start, end):
                totals[layer] -= speed * (1 + eps)  # (1 + eps): staying wins ties
            new = _best_start(totals, length)
            for layer in range(start, end):
                totals[layer] += speed * eps
            if new != start:
                span[:2] = [new, new + length]
                moved = True
            for layer in range(new, new + length):
                totals[layer] += speed
        if not moved:
            break
    return min(totals)


def layers_for_memory(memory_bytes: int, bytes_per_layer: int, num_layers: int, cache_fraction: float = 0.2,
                      fixed_bytes: int = 0) -> int:
    """How many layers fit in `memory_bytes`, leaving `cache_fraction` of it for KV caches, after `fixed_bytes`
    (what the node needs besides its layers at its peak: the runtime and what loading holds for a moment)."""
    if bytes_per_layer <= 0:
        raise ValueError("bytes_per_layer must be positive")
    usable = int(memory_bytes * (1.0 - cache_fraction)) - fixed_bytes
    return max(0, min(num_layers, usable // bytes_per_layer))


def plan_move(servers: list[Server], me: str, num_layers: int, balance_quality: float = 0.75,
              rng: random.Random | None = None) -> Span | None:
    """A better span for node `me`, or None to stay (Petals' `should_choose_other_blocks`, with hysteresis).

    Stay if `me` already holds its best window (the swarm without `me`, ties to staying). Otherwise move
    if (a) the weakest layer now is below `balance_quality` of what re-placing the whole swarm reaches
    (simulated), or (b) every layer `me` serves keeps at least the mean layer throughput without it (a
    surplus: a herd) and the target's weakest layer stays at most that mean with it (a deficit, not
    overshot), or (c) the weakest layer is below `balance_quality` of the mean and the move levels it: the
    layers `me` leaves keep at least what the target's weakest reaches, and no target layer reaches the swarm's
    peak (moves that one-at-a-time re-placing, blind to anything but the minimum, cannot find). A balanced swarm
    stays put.
    Never a move that leaves a layer covered now uncovered. The target is `choose_span`'s (a random
    near-best window with `rng`)."""
    mine = next((s for s in servers if s.node_id == me), None)
    if mine is None:
        return None
    length = mine.end - mine.start
    others = [s for s in servers if s.node_id != me]
    now = layer_throughput(servers, num_layers)
    eps = 1e-3 * max(now) if now else 0.0
    without = list(now)
    window = range(max(0, mine.start), min(num_layers, mine.end))
    for layer in window:
        without[layer] -= max(mine.throughput, 1e-9) * (1 + eps)
    if _best_start(without, length) == mine.start:
        return None  # already where it helps most
    mean = sum(now) / num_layers
    target = choose_span(others, num_layers, length, rng)
    if (target.start, target.end) == (mine.start, mine.end):
        return None
    speed = max(mine.throughput, 1e-9)
    kept = min(without[layer] for layer in window)  # my layers' weakest once I leave (ties to staying)
    reached = min(without[target.start : target.end]) + speed  # the target's weakest once I arrive
    crowded = kept >= mean >= reached  # a surplus moves to a deficit it does not overshoot
    if not crowded:
        if min(now) >= balance_quality * mean:
            return None  # nothing re-placing can reach (at most the mean) is worth a reload
        # a weakest layer this far below the mean and a move that levels it (my layers keep at least what the
        # target's weakest reaches, and no target layer reaches the swarm's peak): made even when no single move
        # raises the swarm's minimum, which re-placing one node at a time cannot see (13 nodes of 4 layers on 24
        # layers: some layer can stay single until a chain of shifts; meanwhile a herd of 4 stayed put beside 3
        # single layers)
        peak = max(without[target.start : target.end]) + speed
        if kept + speed * eps < reached * (1 - 1e-9) or peak >= max(now) * (1 - 1e-9):
            reachable = rebalanced_minimum(servers, num_layers)
            if reachable <= min(now) or min(now) >= balance_quality * reachable:
                return None  # balanced enough: moving costs a reload and buys too little
    after = layer_throughput(others + [Server(me, target.start, target.end, mine.throughput)], num_layers)
    if any(before > 0 and later <= 0 for before, later in zip(now, after)):
        return None  # would leave a covered layer uncovered
    return target
