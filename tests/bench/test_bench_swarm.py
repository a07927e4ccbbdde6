"""`potluck bench-swarm`: the gossip simulation, the report and its section of the markdown file."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from node.bench.basic import MARK_END as FOUNDATION_END
from node.bench.basic import MARK_START as FOUNDATION_START
from node.bench.swarm import (
    MARK_END,
    MARK_START,
    DiscoveryTrial,
    JoinResult,
    JoinRun,
    SwarmBenchResult,
    SwarmBenchSettings,
    _discovery,
    add_swarm_bench_parser,
    build_tiny_llama,
    render_markdown,
    simulate_gossip,
    write_section,
)


@pytest.fixture(scope="module")
def sim50():
    return simulate_gossip(50, heartbeat=5.0, fanout=3, seed=1)


@pytest.mark.timeout(30)
def test_fifty_node_simulation_converges_and_costs_bytes(sim50):
    assert sim50.converged and sim50.warmup_rounds <= 10
    assert sim50.live_counts == [50] * 50  # every registry lists every node
    assert sim50.median_bytes > 0 and min(sim50.bytes_per_node) > 0
    # a message carries every record (a few hundred bytes each), so traffic per node is of the order
    # of messages per minute x 2 directions x 50 records
    assert 300 * 50 < sim50.message_bytes < 1000 * 50
    assert sim50.bootstrap_bytes < 1.5 * sim50.median_bytes  # no hot spot: bootstrap only while few peers are known
    assert sim50.spread_rounds is not None and sim50.spread_rounds <= 5


@pytest.mark.timeout(30)
def test_traffic_per_node_grows_with_the_swarm(sim50):
    small = simulate_gossip(10, seed=1)
    assert small.converged and small.live_counts == [10] * 10
    assert 3 < sim50.median_bytes / small.median_bytes < 8  # linear in the number of records
    slow = simulate_gossip(10, heartbeat=10.0, seed=1)
    assert slow.median_bytes < 0.7 * small.median_bytes  # half as many heartbeats a minute


@pytest.mark.timeout(60)
async def test_gossip_discovery_in_process(tmp_path):
    tiny = await asyncio.to_thread(build_tiny_llama, tmp_path / "tiny")
    trials = await _discovery(tiny, "gossip", existing=2, trials=1, folder=tmp_path)
    assert len(trials) == 1
    trial = trials[0]
    assert 0 <= trial.all_listed <= trial.all_online < 5 and trial.start_node_s < 5 and trial.all_gone < 5


def _fake_result(sims) -> SwarmBenchResult:
    join = JoinResult("tiny LLaMA", (0, 6), [JoinRun(3.0, 3.1, 3.5, 3.5)],
                      {"interpreter start": 0.02, "imports (torch, transformers, grpc)": 2.5,
                       "open model + load span": 0.1, "throughput measurement (first join only)": 0.3})
    trial = DiscoveryTrial(1.2, 0.5, 0.1, 0.02)
    machine = {"cpu": "cpu", "os": "os", "python": "3", "torch": "t", "transformers": "tf", "load": "0.1"}
    return SwarmBenchResult(SwarmBenchSettings(), [join], {"mdns": [trial], "gossip": [trial]}, sims, 1e-4, machine)


def test_section_replaces_only_its_own_block(tmp_path, sim50):
    out = tmp_path / "benchmarks.md"
    foundation = f"{FOUNDATION_START}\nfoundation numbers\n{FOUNDATION_END}"
    out.write_text(
        f"# Benchmarks\n\nkept above\n\n{foundation}\n\n{MARK_START}\nold swarm numbers\n{MARK_END}\n\nkept below\n"
    )
    write_section(out, render_markdown(_fake_result([sim50])))
    text = out.read_text()
    assert "old swarm numbers" not in text
    assert "kept above" in text and "kept below" in text and foundation in text
    assert text.count(MARK_START) == 1 and text.count(MARK_END) == 1
    assert "| 50 | yes (" in text and "### Gossip traffic" in text and "| mDNS only |" in text


def test_section_is_appended_when_missing(tmp_path, sim50):
    out = tmp_path / "benchmarks.md"
    out.write_text(f"# Benchmarks\n\n{FOUNDATION_START}\nfoundation numbers\n{FOUNDATION_END}\n")
    write_section(out, "swarm numbers")
    text = out.read_text()
    assert text.index(FOUNDATION_END) < text.index(MARK_START) < text.index("swarm numbers") < text.index(MARK_END)
    write_section(out, "newer swarm numbers")
    assert "newer swarm numbers" in out.read_text() and out.read_text().count(MARK_START) == 1


def test_parser_and_settings(tmp_path):
    parser = argparse.ArgumentParser()
    add_swarm_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench-swarm", "--nodes", "4", "--out", str(tmp_path / "b.md")])
    assert args.nodes == 4 and args.runs == 3 and args.model is None
    with pytest.raises(ValueError, match="at least 1"):
        SwarmBenchSettings(nodes=0)
    with pytest.raises(ValueError, match="existing folder"):
        SwarmBenchSettings(out=tmp_path / "missing" / "b.md")
