"""The placement simulation (node/bench/placement_sim.py): a join wave, stale views, rebalancing rounds."""

import random

from common.swarm.placement import Server, candidate_spans, choose_span, plan_move
from node.bench.placement_sim import SimConfig, herd_max_over_ideal, replicas, simulate

SMALL = dict(num_layers=12, length=4, joiners=30, horizon_s=300.0)
WAVE = dict(joiners=100, horizon_s=600.0)  # the targets: 100 joins within 1 s, 30 layers, 8 per node


def test_herd_metric():
    assert replicas([(0, 2), (1, 3)], 4) == [1, 2, 1, 0]
    assert herd_max_over_ideal([(0, 2), (1, 3)], 4) == 2 / 1.0
    assert herd_max_over_ideal([(0, 2), (2, 4)], 4) == 1.0


def test_a_wave_into_an_empty_swarm_spreads_and_covers():
    result = simulate(SimConfig(**WAVE))
    assert result.herd_max_over_ideal <= 1.5
    assert result.reloads_per_node <= 1.0
    assert result.covered_s <= 120


def test_a_wave_into_a_balanced_swarm_spreads():
    result = simulate(SimConfig(existing=100, **WAVE))
    assert result.covered_s == 0.0  # the old nodes never stopped serving every layer
    assert result.herd_max_over_ideal <= 1.5
    assert result.peak_herd_max_over_ideal <= 1.6
    assert result.reloads_per_node <= 1.0


def test_the_single_best_window_herds():
    # what placement did before: every joiner of the wave takes the same window
    result = simulate(SimConfig(spread=False, **dict(SMALL, horizon_s=10.0)))
    assert result.peak_herd_max_over_ideal == 12 / 4


def test_a_balanced_swarm_stays_put():
    servers = []
    for i in range(40):
        span = choose_span(servers, 12, 4)
        servers.append(Server(f"n{i}", span.start, span.end, 1.0))
    rng = random.Random(0)
    assert all(plan_move(servers, s.node_id, 12, rng=rng) is None for s in servers)


def test_a_herd_moves_off_its_window():
    # 30 nodes on 0:4, one each on 4:8 and 8:12: the herd's members move; the lone ones stay
    servers = [Server(f"h{i}", 0, 4, 1.0) for i in range(30)] + [Server("a", 4, 8, 1.0), Server("b", 8, 12, 1.0)]
    rng = random.Random(0)
    assert plan_move(servers, "h0", 12, rng=rng) is not None
    assert plan_move(servers, "a", 12, rng=rng) is None and plan_move(servers, "b", 12, rng=rng) is None


def test_candidates_of_an_empty_swarm_are_every_window_that_leaves_no_sliver():
    spans = candidate_spans([], 12, 4)
    assert [s.start for s, _ in spans] == [0, 4, 8]  # 1:5 would leave 0:1, which no 4-layer node could fill
    assert [s.start for s, _ in candidate_spans([], 30, 8)] == [0, 8, 9, 10, 11, 12, 13, 14, 22]
    assert abs(sum(w for _, w in spans) - 1.0) < 1e-9


def test_nodes_that_exactly_fit_the_model_cover_it_whatever_the_random_picks():
    """Three 10-layer nodes joining a 30-layer model one after the other (a LAN's `potluck join` x3): every
    random near-best pick leaves a swarm that serves every layer. Picking any window with the most uncovered
    layers used to put the first node on 2:12, leaving 0:2 to nobody, forever (moves never uncover a layer)."""
    import random

    from common.swarm.placement import Server, choose_span, layer_throughput

    for seed in range(200):
        rng, servers = random.Random(seed), []
        for index in range(3):
            span = choose_span(servers, 30, 10, rng)
            servers.append(Server(f"n{index}", span.start, span.end, 10.0))
        assert min(layer_throughput(servers, 30)) > 0, (seed, servers)
