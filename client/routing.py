"""Pure routing: which peers, over which layers, in what order. No I/O here.

The route is the cheapest chain covering the layers, where a hop costs its measured
round-trip time plus its compute time (layers x per-layer time from the node's published
throughput), inflated for loaded nodes, plus a penalty for each strike against the node
(clients' signed reports that it returned wrong activations, common/swarm/strikes.py)."""

from __future__ import annotations

import random
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
    quant: str = "none"      # weight quantisation of the node's span: none | int8 | nf4 (node/model/quant.py)
    max_length: int = 0
    free_cache_tokens: int = 0
    node_id: str = ""
    throughput: float = 0.0  # decode tokens/s through the node's whole span (0 = unknown)
    prefill_throughput: float = 0.0  # prefill tokens/s through the whole span (0 = unknown)
    load: float = 0.0        # open sessions
    state: str = "ONLINE"
    started_at: float = 0.0  # when the node started (0 = unknown)
    adapters: tuple[str, ...] = ()  # LoRA adapters the node serves (node/model/lora.py)
    memory: tuple[tuple[str, int], ...] = ()  # bytes by part: weights, kv_cache, baseline, resident, peak

    @property
    def layer_seconds(self) -> float | None:
        """Seconds per token per layer, from the published throughput."""
        if self.throughput <= 0:
            return None
        return 1.0 / (self.throughput * (self.end - self.start))


# Which nodes' weight quantisation a client accepts (ClientConfig.accept_quant), from strictest to loosest.
ACCEPT_QUANT = {"none": ("none",), "int8": ("none", "int8"), "any": None}


def accepts_quant(quant: str, accept: str) -> bool:
    """Whether a node quantised as `quant` may serve a client that accepts `accept` (none | int8 | any)."""
    allowed = ACCEPT_QUANT[accept]
    return allowed is None or (quant or "none") in allowed


@dataclass(frozen=True)
class RouteCosts:
    default_rtt: float = 0.002          # seconds, for peers whose RTT was not measured
    default_layer_seconds: float = 0.002  # per layer per token, for peers of unknown throughput
    load_penalty: float = 0.25          # compute cost grows by this fraction per open session
    jitter: float = 0.05                # random spread (fraction) so clients share equal replicas
    strike_penalty: float = 1.0         # seconds added to a hop per strike against its node (distinct reporters)


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


def hop_cost(peer: PeerInfo, start: int, end: int, rtt: float | None, costs: RouteCosts, strikes: int = 0) -> float:
    layer_seconds = peer.layer_seconds or costs.default_layer_seconds
    compute = (end - start) * layer_seconds * (1.0 + costs.load_penalty * max(peer.load, 0.0))
    return (costs.default_rtt if rtt is None else rtt) + compute + costs.strike_penalty * max(strikes, 0)


def plan_route(
    peers: list[PeerInfo],
    num_layers: int,
    start: int = 0,
    end: int | None = None,
    rtts: dict[str, float] | None = None,
    costs: RouteCosts = RouteCosts(),
    rng: random.Random | None = None,
    strikes: dict[str, int] | None = None,
) -> list[Hop]:
    """The cheapest chain of hops covering `[start, end)` exactly.

    Hops change peers only at span boundaries (with per-layer costs constant within a peer,
    an optimal switch point is always one). Equal costs prefer fewer hops, then longer first
    hops. `rng` adds a little noise to each peer's cost, so clients spread over replicas. `strikes`
    (node id -> reporters) makes struck nodes dearer: used only when avoiding them costs more."""
    end = num_layers if end is None else end
    gaps = [(a, b) for a, b in missing_spans(peers, num_layers) if a < end and b > start]
    if gaps:
        raise MissingLayersError([(max(a, start), min(b, end)) for a, b in gaps], num_layers)
    rtts = rtts or {}
    strikes = strikes or {}
    noise = {p.address: 1.0 + (rng.random() * costs.jitter if rng else 0.0) for p in peers}
    cuts = sorted({start, end} | {b for p in peers for b in (p.start, p.end) if start < b < end})
    # best[x] = (cost, hops, -first hop end, hop) of the cheapest chain from cut x to `end`
    best: dict[int, tuple[float, int, int, Hop | None]] = {end: (0.0, 0, 0, None)}
    for a in reversed(cuts[:-1]):
        options = []
        for peer in peers:
            if not peer.start <= a < peer.end:
                continue
            for b in cuts:
                if a < b <= min(peer.end, end) and b in best:
                    rest = best[b]
                    struck = strikes.get(peer.node_id, 0) if peer.node_id else 0
                    cost = hop_cost(peer, a, b, rtts.get(peer.address), costs, struck) * noise[peer.address] + rest[0]
                    options.append((round(cost, 12), rest[1] + 1, -b, Hop(peer, a, b)))
        if options:
            best[a] = min(options, key=lambda option: option[:3])
    hops, layer = [], start
    while layer < end:
        hop = best[layer][3]
        hops.append(hop)
        layer = hop.end
    return hops
