"""Placement is pure: servers in, spans out."""

import pytest

from common.swarm.placement import Server, Span, choose_span, layer_throughput, layers_for_memory, plan_move


def spans_of(servers):
    return {s.node_id: (s.start, s.end) for s in servers}


# --- layer_throughput ----------------------------------------------------------------------------


def test_layer_throughput_sums_overlaps():
    servers = [Server("a", 0, 4, 2.0), Server("b", 2, 6, 3.0)]
    assert layer_throughput(servers, 6) == [2.0, 2.0, 5.0, 5.0, 3.0, 3.0]


def test_layer_throughput_clamps_spans_to_the_model():
    assert layer_throughput([Server("a", -3, 2, 1.0), Server("b", 4, 99, 1.0)], 5) == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_a_node_of_unknown_speed_still_covers_its_layers():
    totals = layer_throughput([Server("a", 0, 2, 0.0), Server("b", 2, 3, -5.0)], 4)
    assert all(t > 0 for t in totals[:3]) and totals[3] == 0.0


def test_empty_swarm_has_no_throughput():
    assert layer_throughput([], 3) == [0.0, 0.0, 0.0]


# --- choose_span ---------------------------------------------------------------------------------


def test_empty_swarm_takes_the_first_window():
    assert choose_span([], 30, 10) == Span(0, 10)
    assert choose_span([], 30, 30) == Span(0, 30)


def test_span_length_is_clamped_to_the_model():
    assert choose_span([], 8, 100) == Span(0, 8)
    assert choose_span([], 8, 0).length == 1


def test_successive_joiners_tile_the_model():
    servers: list[Server] = []
    for i, expected in enumerate([Span(0, 10), Span(10, 20), Span(20, 30)]):
        span = choose_span(servers, 30, 10)
        assert span == expected
        servers.append(Server(f"n{i}", span.start, span.end, 10.0))


def test_fourth_joiner_reinforces_the_slowest_node():
    servers = [Server("a", 0, 10, 10.0), Server("b", 10, 20, 2.0), Server("c", 20, 30, 10.0)]
    assert choose_span(servers, 30, 10) == Span(10, 20)
    servers = [Server("a", 0, 10, 10.0), Server("b", 10, 20, 10.0), Server("c", 20, 30, 3.0)]
    assert choose_span(servers, 30, 10) == Span(20, 30)


def test_fourth_joiner_with_equal_nodes_takes_the_lowest_start():
    servers = [Server("a", 0, 10, 5.0), Server("b", 10, 20, 5.0), Server("c", 20, 30, 5.0)]
    assert choose_span(servers, 30, 10) == Span(0, 10)


def test_uncovered_layers_beat_any_slow_coverage():
    # 0:10 is barely served, but 25:30 is not served at all
    servers = [Server("a", 0, 10, 0.001), Server("b", 10, 25, 100.0)]
    span = choose_span(servers, 30, 10)
    assert span == Span(20, 30)


def test_more_uncovered_layers_win():
    # holes 10:12 (2 layers) and 20:25 (5 layers); a window of 5 can hold the larger one whole
    servers = [Server("a", 0, 10, 1.0), Server("b", 12, 20, 1.0), Server("c", 25, 30, 1.0)]
    assert choose_span(servers, 30, 5) == Span(20, 25)


def test_window_is_a_valid_span():
    servers = [Server("a", 3, 7, 1.0)]
    for length in range(1, 12):
        span = choose_span(servers, 11, length)
        assert 0 <= span.start < span.end <= 11 and span.length == length


# --- layers_for_memory ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "memory, per_layer, num_layers, fraction, expected",
    [
        (10_000, 1_000, 30, 0.2, 8),    # 8000 usable
        (10_000, 1_000, 30, 0.0, 10),
        (10_000, 1_000, 5, 0.0, 5),     # never more than the model has
        (999, 1_000, 30, 0.0, 0),       # not even one
        (0, 1_000, 30, 0.2, 0),
        (10_000, 3_000, 30, 0.2, 2),    # 8000 // 3000
        (10_000, 1_000, 30, 0.5, 5),
        (10_000, 1_000, 30, 1.0, 0),    # everything for the cache
    ],
)
def test_layers_for_memory(memory, per_layer, num_layers, fraction, expected):
    assert layers_for_memory(memory, per_layer, num_layers, cache_fraction=fraction) == expected


def test_layers_for_memory_default_leaves_a_fifth_for_caches():
    assert layers_for_memory(100 * 2**30, 2**30, 200) == 80


@pytest.mark.parametrize("per_layer", [0, -1])
def test_layers_for_memory_rejects_nonpositive_layer_size(per_layer):
    with pytest.raises(ValueError):
        layers_for_memory(1000, per_layer, 10)


# --- plan_move -----------------------------------------------------------------------------------


def test_unknown_node_stays():
    assert plan_move([Server("a", 0, 10, 1.0)], "zzz", 10) is None


def test_balanced_swarm_stays():
    servers = [Server("a", 0, 10, 1.0), Server("b", 10, 20, 1.0), Server("c", 20, 30, 1.0)]
    for me in "abc":
        assert plan_move(servers, me, 30) is None


def test_a_duplicate_fills_the_hole():
    servers = [Server("a", 0, 10, 1.0), Server("b", 0, 10, 1.0), Server("c", 20, 30, 1.0)]
    assert plan_move(servers, "a", 30) == Span(10, 20)
    assert plan_move(servers, "b", 30) == Span(10, 20)
    assert plan_move(servers, "c", 30) is None  # c alone serves 20:30


def test_never_uncovers_a_layer_to_cover_another():
    # holes 5:20 and (after a leaves) 25:30; moving a (20:30) to 5:15 would cover 10 layers but
    # uncover 25:30, which only a serves
    servers = [Server("b", 0, 5, 1.0), Server("d", 20, 25, 1.0), Server("a", 20, 30, 1.0)]
    assert choose_span([s for s in servers if s.node_id != "a"], 30, 10) == Span(5, 15)
    assert plan_move(servers, "a", 30) is None


def test_sole_server_of_its_span_stays_even_with_a_hole():
    servers = [Server("a", 0, 10, 1.0), Server("c", 20, 30, 1.0)]
    assert plan_move(servers, "a", 30) is None
    assert plan_move(servers, "c", 30) is None


def test_moves_when_the_weakest_layer_is_far_below_what_rebalancing_reaches():
    # now: 0:10 at 20 tokens/s, 10:20 at 1; re-placing reaches 10 and 11: now is 0.1 of that
    servers = [Server("a", 0, 10, 10.0), Server("b", 10, 20, 1.0), Server("c", 0, 10, 10.0)]
    assert plan_move(servers, "c", 20) == Span(10, 20)
    assert plan_move(servers, "c", 20, balance_quality=0.11) == Span(10, 20)
    assert plan_move(servers, "c", 20, balance_quality=0.09) is None


def test_balance_quality_is_the_hysteresis():
    # now: 0:10 at 4, 10:20 at 2 (weakest 2); after c moves: 3 and 3 (weakest 3): now is 2/3 of reachable
    servers = [Server("a", 0, 10, 3.0), Server("b", 10, 20, 2.0), Server("c", 0, 10, 1.0)]
    assert plan_move(servers, "c", 20, balance_quality=0.7) == Span(10, 20)
    assert plan_move(servers, "c", 20, balance_quality=0.6) is None
    assert plan_move(servers, "c", 20, balance_quality=2 / 3) is None  # must be strictly below


def test_a_move_that_does_not_raise_the_weakest_layer_is_not_made():
    # moving c from 0:10 to 10:20 only shifts the weakness to 0:10
    servers = [Server("a", 0, 10, 1.0), Server("b", 10, 20, 1.0), Server("c", 0, 10, 1.0)]
    assert plan_move(servers, "c", 20, balance_quality=1.0) is None


def test_a_move_keeps_the_span_length():
    servers = [Server("a", 0, 6, 1.0), Server("b", 0, 6, 1.0), Server("c", 10, 20, 1.0)]
    span = plan_move(servers, "a", 20)
    assert span is not None and span.length == 6 and span.start >= 4 and span.end <= 12


def test_following_plan_move_converges_to_full_coverage():
    servers = [Server(f"n{i}", 0, 10, 1.0) for i in range(3)]
    for _ in range(10):
        moved = False
        for server in list(servers):
            span = plan_move(servers, server.node_id, 30)
            if span is not None:
                servers = [s for s in servers if s.node_id != server.node_id]
                servers.append(Server(server.node_id, span.start, span.end, server.throughput))
                moved = True
        if not moved:
            break
    assert all(t > 0 for t in layer_throughput(servers, 30))
    assert sorted(spans_of(servers).values()) == [(0, 10), (10, 20), (20, 30)]


def test_layers_for_memory_counts_the_fixed_part_of_the_peak_first():
    """The runtime and what loading holds for a moment come out of the budget before layers are counted."""
    assert layers_for_memory(100 * 2**30, 2**30, 200, fixed_bytes=10 * 2**30) == 70
    assert layers_for_memory(10 * 2**30, 2**30, 200, fixed_bytes=9 * 2**30) == 0


def test_a_herd_beside_single_layers_levels_even_when_the_minimum_cannot_rise():
    # 13 nodes of 4 layers on 24 (a join wave's real outcome): layer 4 served 4 times, 8:11 once; no single move
    # raises the minimum (0 and 23 stay single until a chain of shifts), but the herd still moves onto 8:11
    spans = [(0, 4), (1, 5), (3, 7), (4, 8), (4, 8), (7, 11), (11, 15), (11, 15), (15, 19), (15, 19), (19, 23),
             (19, 23), (20, 24)]
    servers = [Server(f"n{i}", a, b, 100.0) for i, (a, b) in enumerate(spans)]
    assert plan_move(servers, "n2", 24) == Span(8, 12)  # 3:7 levels 8:11 up to 2; layer 4 drops to 3
    assert all(plan_move(servers, f"n{i}", 24) is None for i in (0, 1, 5, 6, 8, 10, 12))
