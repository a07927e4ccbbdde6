"""plan_route is pure: plain data in, hops out."""

import pytest

from client.routing import MissingLayersError, PeerInfo, missing_spans, plan_route


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
