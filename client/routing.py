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
    numerics: str = "exact"  # exact | fast: its products in llama.cpp's numerics (common/weights/kernels/fast.c)
    max_length: int = 0
    free_cache_tokens: int = 0
    node_id: str = ""
    throughput: float = 0.0  # decode tokens/s through the node's whole span (0 = unknown)
    prefill_throughput: float = 0.0  # prefill tokens/s through the whole span (0 = unknown)
    load: float = 0.0        # open sessions
    state: str = "ONLINE"
    started_at: float = 0.0  # when the node started (0 = unknown)
    adapters: tuple[str, ...] = ()  # LoRA adapters the node serves (node/model/lora.py)
    exact: tuple[tuple[str, int], ...] = ()  # (form, matrices) held in exact narrow forms (common/weights/exact.py)
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


def accepts_numerics(numerics: str, accept: str) -> bool:
    """Whether a node computing in `numerics` (exact | fast) may serve a client that accepts `accept` (any | exact)."""
    return accept == "any" or (numerics or "exact") == "exact"


def weights_kind(peer: PeerInfo) -> str:
    """What a node's outputs differ from exact ones by, for verification: its quantisation (none | int8 | nf4), or
    "fast" for unquantised weights multiplied in llama.cpp's numerics."""
    quant = peer.quant or "none"
    return "fast" if quant == "none" and peer.numerics == "fast" else quant


@dataclass(frozen=True)
class RouteCosts:
    default_rtt: float = 0.002          # seconds, for peers whose RTT was not measured
    default_layer_seconds: float = 0.002  # per layer per token, for peers of unknown throughput
    load_penalty: float = 0.25          # compute cost grows by this fraction per open session
    jitter: float = 0.05                # random spread (fraction) so clients share equal replicas
    strike_penalty: float = 1.0         # seconds added to a hop per strike against its node (distinct reporters)
    unproven_layer_seconds: float = 0.002  # the fastest a node is believed per layer per token until measured


@dataclass(frozen=True)
class Hop:
    """One step of the chain: `peer` runs layers `[start, end)` (a sub-span of what it serves)."""

    peer: PeerInfo
    start: int
    end: int


def missing_spans(peers: list[PeerInfo], num_layers: int) -> list[tuple[int, int]]:
    """Half-open spans of layers no peer covers (a difference array: O(peers + layers))."""
    delta = [0] * (num_layers + 1)
    for peer in peers:
        a, b = max(peer.start, 0), min(peer.end, num_layers)
        if a < b:
            delta[a] += 1
            delta[b] -= 1
    gaps, start, depth = [], None, 0
    for layer in range(num_layers + 1):
        depth += delta[layer] if layer < num_layers else 0
        ok = layer == num_layers or depth > 0
        if not ok and start is None:
            start = layer
        elif ok and start is not None:
            gaps.append((start, layer))
            start = None
    return gaps


def layer_seconds(peer: PeerInfo, costs: RouteCosts, measured: dict[str, float] | None = None) -> float:
    """Seconds per token per layer that routing believes of `peer`.

    `measured` (address -> seconds per layer, what this client saw) wins; without it, the node's own
    claim is believed as is when `measured` is None (plain data, as in tests), and otherwise only down
    to `costs.unproven_layer_seconds`: an unmeasured stranger cannot buy traffic by advertising speed."""
    if measured is not None and peer.address in measured:
        return measured[peer.address]
    claimed = peer.layer_seconds or costs.default_layer_seconds
    return claimed if measured is None else max(claimed, costs.unproven_layer_seconds)


MEASURE_WEIGHT = 0.3  # weight of the newest sample in a peer's measured seconds per layer (an EWMA)


def smoothed(previous: float | None, sample: float, weight: float = MEASURE_WEIGHT) -> float:
    """The EWMA of measured seconds per layer after `sample` (the first sample is taken as is)."""
    return sample if previous is None else (1.0 - weight) * previous + weight * sample


def hop_cost(peer: PeerInfo, start: int, end: int, rtt: float | None, costs: RouteCosts, strikes: int = 0,
             measured: dict[str, float] | None = None) -> float:
    compute = (end - start) * layer_seconds(peer, costs, measured) * (1.0 + costs.load_penalty * max(peer.load, 0.0))
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
    measured: dict[str, float] | None = None,
) -> list[Hop]:
    """The cheapest chain of hops covering `[start, end)` exactly.

    Hops change peers only at span boundaries (with per-layer costs constant within a peer,
    an optimal switch point is always one). Equal costs prefer fewer hops, then longer first
    hops. `rng` adds a little noise to each peer's cost, so clients spread over replicas. `strikes`
    (node id -> reporters) makes struck nodes dearer: used only when avoiding them costs more.
    `measured` (address -> seconds per layer seen by this client): see `layer_seconds`.

    A hop on peer p from cut a to cut b costs C_p + (b - a) r_p (a fixed part: RTT and strikes; a
    per-layer part). Among peers of one span only those no other beats on both parts can be on a
    cheapest chain (a Pareto front), and a backward pass over the cuts keeps, per peer, the best
    `b r_p + best[b]` seen so far: O(peers + spans x cuts in span), no cuts x peers x cuts loop."""
    end = num_layers if end is None else end
    if end <= start:
        return []
    gaps = [(a, b) for a, b in missing_spans(peers, num_layers) if a < end and b > start]
    if gaps:
        raise MissingLayersError([(max(a, start), min(b, end)) for a, b in gaps], num_layers)
    rtts = rtts or {}
    strikes = strikes or {}
    cuts = sorted({start, end} | {b for p in peers for b in (p.start, p.end) if start < b < end})
    index = {cut: i for i, cut in enumerate(cuts)}
    fronts: dict[tuple[int, int], list[tuple[float, float, PeerInfo]]] = {}
    default_rtt, load_penalty, strike_penalty = costs.default_rtt, costs.load_penalty, costs.strike_penalty
    default_layer, unproven, jitter = costs.default_layer_seconds, costs.unproven_layer_seconds, costs.jitter
    noise = 1.0
    for peer in peers:  # the one loop over every peer: kept lean (hop_cost and layer_seconds, unrolled)
        a, b = peer.start, peer.end
        a, b = (start if start > a else a), (end if b > end else b)  # max(peer.start, start), min(peer.end, end)
        if a >= b:
            continue
        if rng:
            noise = 1.0 + rng.random() * jitter
        struck = strikes.get(peer.node_id, 0) if strikes and peer.node_id else 0
        address = peer.address
        fixed = (rtts.get(address, default_rtt) + strike_penalty * (0 if 0 > struck else struck)) * noise
        if measured is not None and address in measured:
            seconds = measured[address]
        else:
            throughput = peer.throughput
            seconds = (None if throughput <= 0 else 1.0 / (throughput * (peer.end - peer.start))) or default_layer
            if measured is not None:
                seconds = unproven if unproven > seconds else seconds
        load = peer.load
        rate = seconds * (1.0 + load_penalty * (0.0 if 0.0 > load else load)) * noise
        key = (index[a], index[b])
        group = fronts.get(key)
        if group is None:
            fronts[key] = [(fixed, rate, peer)]
        else:
            group.append((fixed, rate, peer))
    # entries, one per peer of a front: [fixed, rate, peer, first cut index, kept: the cut index of the best end of
    # a hop on this peer seen so far (None: none yet), its value (cut x rate + best cost from there), the cut,
    # the best cost from there, the hops from there, fixed + value]
    starting: dict[int, list[list]] = {}  # cut index -> entries whose span ends there (they join the pass)
    leaving: dict[int, list[list]] = {}   # cut index -> entries whose span starts there (they leave it)
    for (i0, i1), group in fronts.items():
        group.sort(key=lambda item: (item[0], item[1]))
        lowest = float("inf")
        for fixed, rate, peer in group:
            if rate < lowest:  # not beaten on both parts by a peer of the same span
                lowest = rate
                entry = [fixed, rate, peer, i0, None, 0.0, 0, 0.0, 0, 0.0]
                starting.setdefault(i1, []).append(entry)
                leaving.setdefault(i0, []).append(entry)
    last = len(cuts) - 1
    # best[i] = (cost, hops, -first hop end, first hop's end index, peer) of the cheapest chain from cuts[i] to `end`.
    # Costs are compared rounded to 12 decimals (ties between float sums of equal costs). Two costs further apart
    # than TIE differ after rounding too, so only the candidates within TIE of the least are rounded and compared
    # as keys; the rest is plain float arithmetic.
    best: list[tuple | None] = [None] * len(cuts)
    best[last] = (0.0, 0, 0, last, None)
    active: dict[int, list] = {}  # id -> entry of the peers whose span holds the current cut, in order of joining
    for i in range(last - 1, -1, -1):
        for entry in starting.get(i + 1, ()):
            active[id(entry)] = entry
        for entry in leaving.get(i + 1, ()):
            del active[id(entry)]
        after = best[i + 1]
        if after is not None:  # b = cuts[i + 1] becomes reachable for every active peer
            after_cost, after_hops, cut = after[0], after[1], cuts[i + 1]
            for entry in active.values():
                value = cut * entry[1] + after_cost
                if entry[4] is not None:
                    if value > entry[5] - TIE:
                        if value > entry[5] + TIE or not (round(value, 12), after_hops, -cut, i + 1) < (
                                round(entry[5], 12), entry[8], -entry[6], entry[4]):
                            continue
                entry[4:] = i + 1, value, cut, after_cost, after_hops, entry[0] + value
        here = cuts[i]
        options = [(entry[9] - here * entry[1], entry) for entry in active.values() if entry[4] is not None]
        if options:
            least = min(options, key=_first)[0] + 2 * TIE
            best[i] = min(((round(entry[0] + (entry[6] - here) * entry[1] + entry[7], 12), entry[8] + 1, -entry[6],
                            entry[4], entry[2]) for cost, entry in options if not cost > least), key=_key)
    hops, i = [], 0
    while i < last:
        _, _, _, j, peer = best[i]
        hops.append(Hop(peer, cuts[i], cuts[j]))
        i = j
    return hops


TIE = 1e-9  # costs further apart than this differ after rounding to 12 decimals


def _first(option: tuple) -> float:
    return option[0]


def _key(option: tuple) -> tuple:
    return option[:3]
