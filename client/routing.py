"""Pure routing: which peers, over which layers, in what order. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass


class MissingLayersError(RuntimeError):
    """No known peer serves some layers of the model."""

    def __init__(self, missing: list[tuple[int, int]], num_layers: int):
        self.missing = missing
        self.num_layers = num_layers
        spans = ", ".join(f"{start}:{end}" for start, end in missing)
        super().__init__(f"no peer serves layers {spans} of the model's {num_layers} layers")


@dataclass(frozen=True)
class PeerInfo:
    """What a peer told us about itself (its Info reply)."""

    address: str
    start: int
    end: int
    model_id: str = ""
    config_hash: str = ""
    num_layers: int = 0
    hidden_size: int = 0
    dtype: str = ""
    device: str = ""
    max_length: int = 0
    free_cache_tokens: int = 0


@dataclass(frozen=True)
class Hop:
    """One step of the chain: `peer` runs layers `[start, end)` (a sub-span of what it serves)."""

    peer: PeerInfo
    start: int
    end: int


def missing_spans(peers: list[PeerInfo], num_layers: int) -> list[tuple[int, int]]:
    """Half-open spans of layers no peer covers."""
    covered = [False] * num_layers
    for peer in peers:
        for layer in range(max(peer.start, 0), min(peer.end, num_layers)):
            covered[layer] = True
    gaps, start = [], None
    for layer, ok in enumerate(covered + [True]):
        if not ok and start is None:
            start = layer
        elif ok and start is not None:
            gaps.append((start, layer))
            start = None
    return gaps


def plan_route(peers: list[PeerInfo], num_layers: int, start: int = 0, end: int | None = None) -> list[Hop]:
    """Fewest hops covering `[start, end)`: from the current layer, take the peer that reaches furthest.

    Spans may overlap; each hop starts where the previous one ended. Ties keep the given order."""
    end = num_layers if end is None else end
    gaps = [(a, b) for a, b in missing_spans(peers, num_layers) if a < end and b > start]
    if gaps:
        raise MissingLayersError([(max(a, start), min(b, end)) for a, b in gaps], num_layers)
    hops, layer = [], start
    while layer < end:
        candidates = [p for p in peers if p.start <= layer < p.end]
        best = max(candidates, key=lambda p: p.end)  # never empty: there are no gaps
        hop_end = min(best.end, end)
        hops.append(Hop(best, layer, hop_end))
        layer = hop_end
    return hops
