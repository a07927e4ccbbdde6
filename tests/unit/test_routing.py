"""plan_route is pure: plain data in, hops out."""

import itertools
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.routing import (
    Hop,
    MissingLayersError,
    PeerInfo,
    RouteCosts,
    hop_cost,
    layer_seconds,
    missing_spans,
    plan_route,
)


def peer(name, start, end):
    return PeerInfo(address=name, start=start, end=end)


def spans(route):
    return [(hop.peer.address, hop.start, hop.end) for hop in route]


def test_disjoint_chain_in_order():
    peers = [peer("c", 20, 30), peer("a", 0, 10), peer("b", 10, 20)]
    assert spans(plan_route(peers, 30)) == [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)]


def test_overlapping_spans_start_where_the_previous_hop_ended():
    peers = [peer("a", 0, 12), peer("b", 8, 22), peer("c", 18, 30)]
    assert spans(plan_route(peers, 30)) == [("a", 0, 12), ("b", 12, 22), ("c", 22, 30)]


def test_fewest_hops_prefers_the_longest_reach():
    peers = [peer("a", 0, 10), peer("b", 0, 30), peer("c", 10, 30)]
    assert spans(plan_route(peers, 30)) == [("b", 0, 30)]


def test_gap_names_the_missing_layers():
    peers = [peer("a", 0, 10), peer("c", 20, 30), peer("d", 25, 28)]
    with pytest.raises(MissingLayersError) as caught:
        plan_route(peers, 30)
    assert caught.value.missing == [(10, 20)]
    assert "layers 10:20" in str(caught.value)


def test_missing_tail_and_several_gaps():
    assert missing_spans([peer("a", 2, 5), peer("b", 7, 9)], 12) == [(0, 2), (5, 7), (9, 12)]
    with pytest.raises(MissingLayersError, match="0:2, 5:7, 9:12"):
        plan_route([peer("a", 2, 5), peer("b", 7, 9)], 12)


def test_sub_range_route():
    peers = [peer("a", 0, 10), peer("b", 10, 20)]
    assert spans(plan_route(peers, 30, start=5, end=15)) == [("a", 5, 10), ("b", 10, 15)]


# --- cost-based choices on synthetic swarms ------------------------------------------------------


def fast(name, start, end, throughput, load=0.0):
    return PeerInfo(address=name, start=start, end=end, throughput=throughput, load=load)


def route_cost(route, rtts=None, costs=RouteCosts()):
    rtts = rtts or {}
    return sum(hop_cost(h.peer, h.start, h.end, rtts.get(h.peer.address), costs) for h in route)


def test_layer_seconds_from_throughput():
    assert fast("a", 0, 10, 100.0).layer_seconds == pytest.approx(1 / 1000)
    assert fast("a", 0, 10, 0.0).layer_seconds is None
    assert fast("a", 0, 10, -3.0).layer_seconds is None


def test_hop_cost_is_rtt_plus_compute_inflated_by_load():
    costs = RouteCosts(default_rtt=0.5, default_layer_seconds=0.25, load_penalty=0.5)
    assert hop_cost(peer("a", 0, 10), 0, 4, None, costs) == pytest.approx(0.5 + 4 * 0.25)
    assert hop_cost(peer("a", 0, 10), 0, 4, 0.1, costs) == pytest.approx(0.1 + 4 * 0.25)
    assert hop_cost(fast("a", 0, 10, 10.0), 2, 7, 0.0, costs) == pytest.approx(5 * 0.01)
    assert hop_cost(fast("a", 0, 10, 10.0, load=2), 2, 7, 0.0, costs) == pytest.approx(5 * 0.01 * 2.0)
    assert hop_cost(fast("a", 0, 10, 10.0, load=-4), 2, 7, 0.0, costs) == pytest.approx(5 * 0.01)


def test_one_fast_node_beats_three_slow_ones():
    peers = [fast("s1", 0, 10, 10.0), fast("s2", 10, 20, 10.0), fast("s3", 20, 30, 10.0), fast("f", 0, 30, 100.0)]
    assert spans(plan_route(peers, 30)) == [("f", 0, 30)]
    assert spans(plan_route(peers[::-1], 30)) == [("f", 0, 30)]


def test_a_fast_node_far_away_loses_to_slow_nodes_nearby():
    peers = [fast("s1", 0, 10, 10.0), fast("s2", 10, 20, 10.0), fast("s3", 20, 30, 10.0), fast("f", 0, 30, 100.0)]
    rtts = {"f": 1.0, "s1": 0.001, "s2": 0.001, "s3": 0.001}
    assert spans(plan_route(peers, 30, rtts=rtts)) == [("s1", 0, 10), ("s2", 10, 20), ("s3", 20, 30)]


@pytest.mark.parametrize("order", [1, -1])
def test_equal_replicas_the_one_with_high_rtt_is_avoided(order):
    peers = [fast("near", 0, 30, 50.0), fast("far", 0, 30, 50.0)][::order]
    assert spans(plan_route(peers, 30, rtts={"near": 0.01, "far": 0.3})) == [("near", 0, 30)]
    assert spans(plan_route(peers, 30, rtts={"near": 0.3, "far": 0.01})) == [("far", 0, 30)]


def test_unmeasured_rtt_uses_the_default():
    peers = [fast("a", 0, 30, 50.0), fast("b", 0, 30, 50.0)]
    costs = RouteCosts(default_rtt=0.05)
    assert spans(plan_route(peers, 30, rtts={"a": 0.1}, costs=costs)) == [("b", 0, 30)]
    assert spans(plan_route(peers, 30, rtts={"a": 0.01}, costs=costs)) == [("a", 0, 30)]


def test_overlap_switches_at_the_end_of_the_faster_peer():
    peers = [fast("a", 0, 20, 1000.0), fast("b", 10, 30, 10.0)]
    assert spans(plan_route(peers, 30)) == [("a", 0, 20), ("b", 20, 30)]


def test_overlap_switches_at_the_start_of_the_faster_peer():
    peers = [fast("a", 0, 20, 10.0), fast("b", 10, 30, 1000.0)]
    assert spans(plan_route(peers, 30)) == [("a", 0, 10), ("b", 10, 30)]


def test_detour_through_a_fast_middle_node_when_it_pays():
    # c is fast on 10:20; a and b are slow but cover everything between them
    peers = [fast("a", 0, 20, 2.0), fast("b", 10, 30, 2.0), fast("c", 8, 22, 10000.0)]
    assert spans(plan_route(peers, 30)) == [("a", 0, 8), ("c", 8, 22), ("b", 22, 30)]
    # with a large rtt to c the extra hop no longer pays
    assert len(plan_route(peers, 30, rtts={"c": 10.0})) == 2


@pytest.mark.parametrize("order", [1, -1])
def test_loaded_replica_is_avoided(order):
    peers = [fast("busy", 0, 30, 50.0, load=4), fast("idle", 0, 30, 50.0)][::order]
    assert spans(plan_route(peers, 30)) == [("idle", 0, 30)]
    assert spans(plan_route(peers, 30, costs=RouteCosts(load_penalty=0.0)))[0][0] == peers[0].address


def test_jitter_spreads_clients_over_equal_replicas():
    peers = [fast("a", 0, 30, 50.0), fast("b", 0, 30, 50.0)]
    chosen = Counter(plan_route(peers, 30, rng=random.Random(seed))[0].peer.address for seed in range(200))
    assert set(chosen) == {"a", "b"}
    assert min(chosen.values()) >= 50
    # without rng the choice is deterministic
    assert {plan_route(peers, 30)[0].peer.address for _ in range(5)} == {"a"}


def test_jitter_does_not_override_a_clear_difference():
    peers = [fast("a", 0, 30, 50.0), fast("b", 0, 30, 50.0, load=4)]
    assert {plan_route(peers, 30, rng=random.Random(seed))[0].peer.address for seed in range(100)} == {"a"}


def test_route_is_a_sub_span_of_each_peer():
    peers = [fast("a", 0, 20, 1000.0), fast("b", 10, 30, 10.0)]
    route = plan_route(peers, 30)
    assert all(isinstance(h, Hop) and h.peer.start <= h.start < h.end <= h.peer.end for h in route)


def test_empty_range_needs_no_hops():
    assert plan_route([peer("a", 0, 10)], 10, start=4, end=4) == []


def test_no_peers_at_all():
    with pytest.raises(MissingLayersError) as caught:
        plan_route([], 5)
    assert caught.value.missing == [(0, 5)] and caught.value.num_layers == 5


def test_gaps_outside_the_requested_range_do_not_matter():
    peers = [peer("a", 0, 10), peer("c", 20, 30)]
    assert spans(plan_route(peers, 30, start=0, end=10)) == [("a", 0, 10)]
    with pytest.raises(MissingLayersError) as caught:
        plan_route(peers, 30, start=5, end=25)
    assert caught.value.missing == [(10, 20)]
    with pytest.raises(MissingLayersError) as caught:
        plan_route([peer("a", 0, 10)], 30, start=5, end=15)
    assert caught.value.missing == [(10, 15)]


# --- optimality: brute force over every chain ----------------------------------------------------


def all_chains(peers, start, end):
    """Every chain of hops covering [start, end), switching peers at any layer."""
    if start == end:
        yield []
        return
    for p in peers:
        if p.start <= start < p.end:
            for b in range(start + 1, min(p.end, end) + 1):
                for rest in all_chains(peers, b, end):
                    yield [Hop(p, start, b)] + rest


def cheapest_chain_cost(peers, num_layers, rtts, costs):
    """The minimum over all chains (switch at any layer), by exhaustive recursion with memo."""
    best = {num_layers: 0.0}
    for a in range(num_layers - 1, -1, -1):
        options = [
            hop_cost(p, a, b, rtts.get(p.address), costs) + best[b]
            for p in peers
            if p.start <= a < p.end
            for b in range(a + 1, min(p.end, num_layers) + 1)
            if b in best
        ]
        if options:
            best[a] = min(options)
    return best.get(0)


def random_swarm(rng, max_peers, max_layers):
    num_layers = rng.randint(1, max_layers)
    peers = []
    for i in range(rng.randint(1, max_peers)):
        a = rng.randrange(num_layers)
        b = rng.randint(a + 1, num_layers)
        peers.append(PeerInfo(
            address=f"p{i}", start=a, end=b,
            throughput=rng.choice([0.0, rng.uniform(1.0, 500.0)]),
            load=rng.choice([0.0, 0.0, float(rng.randint(1, 5))]),
        ))
    rtts = {p.address: rng.uniform(0.0, 0.05) for p in peers if rng.random() < 0.7}
    return peers, num_layers, rtts


def test_route_cost_matches_exhaustive_enumeration_on_tiny_swarms():
    rng = random.Random(1234)
    costs = RouteCosts(default_rtt=0.01)
    checked = 0
    while checked < 150:
        peers, num_layers, rtts = random_swarm(rng, 4, 5)
        if missing_spans(peers, num_layers):
            continue
        chains = list(all_chains(peers, 0, num_layers))
        best = min(route_cost(chain, rtts, costs) for chain in chains)
        route = plan_route(peers, num_layers, rtts=rtts, costs=costs)
        assert route_cost(route, rtts, costs) == pytest.approx(best, rel=1e-9, abs=1e-12)
        checked += 1


def test_route_cost_matches_brute_force_minimum():
    rng = random.Random(99)
    checked = 0
    while checked < 400:
        peers, num_layers, rtts = random_swarm(rng, 6, 8)
        costs = RouteCosts(default_rtt=rng.choice([0.0, 0.002, 0.02]), load_penalty=rng.choice([0.0, 0.25, 1.0]))
        if missing_spans(peers, num_layers):
            continue
        route = plan_route(peers, num_layers, rtts=rtts, costs=costs)
        best = cheapest_chain_cost(peers, num_layers, rtts, costs)
        assert route_cost(route, rtts, costs) == pytest.approx(best, rel=1e-9, abs=1e-12)
        checked += 1


def test_fast_plan_equals_the_brute_force_plan_with_jitter_strikes_loads_and_sub_ranges():
    """The same hops as the cheapest of every chain (switching at any layer), each peer's cost drawn as
    plan_route draws it: jitter in peer order, strikes, measured and unproven speeds, a sub-range."""
    rng = random.Random(2024)
    costs = RouteCosts()
    checked = 0
    while checked < 300:
        peers, num_layers, rtts = random_swarm(rng, 6, 8)
        peers = [PeerInfo(address=p.address, start=p.start, end=p.end, node_id=f"n{i}", throughput=p.throughput,
                          load=p.load) for i, p in enumerate(peers)]
        start = rng.randrange(num_layers)
        end = rng.randint(start + 1, num_layers)
        if any(a < end and b > start for a, b in missing_spans(peers, num_layers)):
            continue
        strikes = {p.node_id: rng.randint(1, 2) for p in peers if rng.random() < 0.2}
        measured = rng.choice([None, {}, {p.address: rng.uniform(1e-4, 1e-2) for p in peers[:2]}])
        seed = rng.random()
        route = plan_route(peers, num_layers, start, end, rtts=rtts, rng=random.Random(seed), strikes=strikes,
                           measured=measured)
        draws, noise = random.Random(seed), {}
        for p in peers:  # plan_route draws one jitter per peer overlapping the range, in order
            if max(p.start, start) < min(p.end, end):
                noise[p.address] = 1.0 + draws.random() * costs.jitter

        def cost(chain):
            return sum(
                (rtts.get(h.peer.address, costs.default_rtt) + costs.strike_penalty * strikes.get(h.peer.node_id, 0)
                 + (h.end - h.start) * layer_seconds(h.peer, costs, measured) * (1 + costs.load_penalty * h.peer.load))
                * noise[h.peer.address] for h in chain)

        chains = list(all_chains(peers, start, end))
        best = min(chains, key=lambda chain: (round(cost(chain), 12), len(chain), -chain[0].end))
        assert spans(route) == spans(best)
        checked += 1


def test_brute_force_helpers_agree():
    rng = random.Random(7)
    for _ in range(50):
        peers, num_layers, rtts = random_swarm(rng, 3, 4)
        if missing_spans(peers, num_layers):
            continue
        costs = RouteCosts()
        chains = list(all_chains(peers, 0, num_layers))
        assert len(chains) == len({tuple((h.peer.address, h.start, h.end) for h in c) for c in chains})
        assert min(route_cost(c, rtts, costs) for c in chains) == pytest.approx(
            cheapest_chain_cost(peers, num_layers, rtts, costs))


# --- properties ----------------------------------------------------------------------------------


@st.composite
def swarms(draw):
    num_layers = draw(st.integers(1, 12))
    peers = []
    for i in range(draw(st.integers(0, 7))):
        a = draw(st.integers(0, num_layers - 1))
        b = draw(st.integers(a + 1, num_layers))
        peers.append(PeerInfo(
            address=f"p{i}", start=a, end=b,
            throughput=draw(st.sampled_from([0.0, 1.0, 10.0, 123.4, 1000.0])),
            load=draw(st.sampled_from([0.0, 1.0, 3.0])),
        ))
    rtts = draw(st.dictionaries(st.sampled_from([p.address for p in peers] or ["none"]),
                                st.floats(0.0, 1.0, allow_nan=False)))
    seed = draw(st.none() | st.integers(0, 2**16))
    return peers, num_layers, rtts, seed


def assert_exact_cover(route, start, end):
    assert route, "a non-empty range needs at least one hop"
    assert route[0].start == start and route[-1].end == end
    for hop in route:
        assert hop.start < hop.end
        assert hop.peer.start <= hop.start and hop.end <= hop.peer.end
    for before, after in zip(route, route[1:]):
        assert before.end == after.start


@settings(max_examples=200, deadline=None)
@given(swarms())
def test_route_covers_all_layers_or_names_the_gap(swarm):
    peers, num_layers, rtts, seed = swarm
    rng = None if seed is None else random.Random(seed)
    gaps = missing_spans(peers, num_layers)
    if gaps:
        with pytest.raises(MissingLayersError) as caught:
            plan_route(peers, num_layers, rtts=rtts, rng=rng)
        assert caught.value.missing == gaps
    else:
        assert_exact_cover(plan_route(peers, num_layers, rtts=rtts, rng=rng), 0, num_layers)


@settings(max_examples=200, deadline=None)
@given(swarms(), st.data())
def test_sub_range_route_covers_exactly_that_range(swarm, data):
    peers, num_layers, rtts, seed = swarm
    start = data.draw(st.integers(0, num_layers - 1))
    end = data.draw(st.integers(start + 1, num_layers))
    gaps = [(max(a, start), min(b, end)) for a, b in missing_spans(peers, num_layers) if a < end and b > start]
    if gaps:
        with pytest.raises(MissingLayersError) as caught:
            plan_route(peers, num_layers, start=start, end=end, rtts=rtts)
        assert caught.value.missing == gaps
    else:
        assert_exact_cover(plan_route(peers, num_layers, start=start, end=end, rtts=rtts), start, end)


@settings(max_examples=200, deadline=None)
@given(swarms())
def test_missing_spans_are_exactly_the_uncovered_layers(swarm):
    peers, num_layers, _, _ = swarm
    gaps = missing_spans(peers, num_layers)
    uncovered = {layer for layer in range(num_layers) if not any(p.start <= layer < p.end for p in peers)}
    assert {layer for a, b in gaps for layer in range(a, b)} == uncovered
    assert all(a < b for a, b in gaps)
    assert all(b1 < a2 for (_, b1), (a2, _) in itertools.pairwise(gaps))  # maximal, sorted, disjoint


def test_a_nodes_reported_memory_is_kept_only_as_known_whole_byte_counts():
    """Info's "memory" is untrusted: known parts with numbers in range are kept (as ints), anything else dropped;
    `potluck status` shows them as MiB."""
    from client.status import memory_cell
    from client.transport import memory_parts

    reported = {"weights": 25 * 2**20, "kv_cache": 2**20, "baseline": 478 * 2**20, "resident": 505 * 2**20,
                "peak": 510.5 * 2**20, "extra": 1}
    assert dict(memory_parts(reported)) == {"weights": 25 * 2**20, "kv_cache": 2**20, "baseline": 478 * 2**20,
                                            "resident": 505 * 2**20, "peak": int(510.5 * 2**20)}
    assert memory_parts({"weights": -1, "kv_cache": "1", "baseline": True, "peak": 2**70}) == ()
    assert memory_parts(["weights", 1]) == () and memory_parts(None) == ()
    cell = memory_cell(dict(memory_parts(reported)))
    assert cell == "505 MiB (peak 510): 25 weights + 1 cache + 478 runtime"
    assert memory_cell({}) == "-"
