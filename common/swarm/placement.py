"""Pure placement: which contiguous span should a node serve, and when should it move?

Petals' idea: a layer's capacity is the summed throughput of the nodes serving it; a
joining node takes the window holding the weakest layers, so the swarm's weakest
coverage rises as much as it can. No I/O here: plain data in, spans out."""

from __future__ import annotations

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


def choose_span(servers: list[Server], num_layers: int, length: int) -> Span:
    """The window of `length` layers whose throughputs, sorted, are lexicographically smallest.

    That is the window holding the least-served layers (uncovered ones first, then the most of
    them); ties go to the lowest start."""
    length = max(1, min(length, num_layers))
    totals = layer_throughput(servers, num_layers)
    best = min(range(num_layers - length + 1), key=lambda start: (sorted(totals[start : start + length]), start))
    return Span(best, best + length)


def layers_for_memory(memory_bytes: int, bytes_per_layer: int, num_layers: int, cache_fraction: float = 0.2,
                      fixed_bytes: int = 0) -> int:
    """How many layers fit in `memory_bytes`, leaving `cache_fraction` of it for KV caches, after `fixed_bytes`
    (what the node needs besides its layers at its peak: the runtime and what loading holds for a moment)."""
    if bytes_per_layer <= 0:
        raise ValueError("bytes_per_layer must be positive")
    usable = int(memory_bytes * (1.0 - cache_fraction)) - fixed_bytes
    return max(0, min(num_layers, usable // bytes_per_layer))


def plan_move(servers: list[Server], me: str, num_layers: int, min_gain: float = 1.5) -> Span | None:
    """A better span for node `me`, or None to stay.

    Move only if (a) every layer covered now stays covered, and (b) the move covers a layer
    nobody serves, or raises the weakest layer's throughput by `min_gain` times."""
    mine = next((s for s in servers if s.node_id == me), None)
    if mine is None:
        return None
    others = [s for s in servers if s.node_id != me]
    now = layer_throughput(servers, num_layers)
    target = choose_span(others, num_layers, mine.end - mine.start)
    if (target.start, target.end) == (mine.start, mine.end):
        return None
    after = layer_throughput(others + [Server(me, target.start, target.end, mine.throughput)], num_layers)
    if any(before > 0 and later <= 0 for before, later in zip(now, after)):
        return None  # would leave a covered layer uncovered
    uncovered_now = sum(1 for t in now if t <= 0)
    uncovered_after = sum(1 for t in after if t <= 0)
    if uncovered_after < uncovered_now:
        return target
    if uncovered_now == 0 and min(after) > min(now) * min_gain:
        return target
    return None
