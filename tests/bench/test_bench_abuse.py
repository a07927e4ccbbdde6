"""`potluck bench-abuse` at a small size: the honest client's answers stay exact while strangers attack, and the
attackers get no more than the nodes' per-peer limits allow."""

from __future__ import annotations

from node.bench.abuse import render, run_abuse_bench


def test_bench_abuse_keeps_the_honest_answer_and_bounds_the_attackers(smollm_dir):
    phases, tally, machine = run_abuse_bench(smollm_dir, rounds=1, new_tokens=3, hogs=1, flood=40, junk=20,
                                             threads=1)
    assert [p.label for p in phases] == ["no attackers", "with attackers"]
    assert all(all(p.exact) and len(p.exact) == 1 for p in phases)
    assert tally.hogs_opened == 3  # opened (they reserve nothing until they step), one per node
    assert 0 < tally.flood_opened < 3 * 40 and tally.refused > 0  # the per-peer session quota refused the rest
    assert tally.junk_routable == 0  # junk records are never passed on
    text = render(phases, tally, machine, "potluck bench-abuse ...", 3, 1, 40, 20)
    assert "| with attackers |" in text and "1/1 |" in text
