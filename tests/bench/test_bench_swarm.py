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
    write_section,
)


@pytest.mark.timeout(60)
async def test_gossip_discovery_in_process(tmp_path):
    tiny = await asyncio.to_thread(build_tiny_llama, tmp_path / "tiny")
    trials = await _discovery(tiny, "gossip", existing=2, trials=1, folder=tmp_path)
    assert len(trials) == 1
    trial = trials[0]
    assert 0 <= trial.all_listed <= trial.all_online < 5 and trial.start_node_s < 5 and trial.all_gone < 5


def _fake_result() -> SwarmBenchResult:
    join = JoinResult("tiny LLaMA", (0, 6), [JoinRun(3.0, 3.1, 3.5, 3.5)],
                      {"interpreter start": 0.02, "imports (torch, transformers, grpc)": 2.5,
                       "open model + load span": 0.1, "throughput measurement (first join only)": 0.3})
    trial = DiscoveryTrial(1.2, 0.5, 0.1, 0.02)
    machine = {"cpu": "cpu", "os": "os", "python": "3", "torch": "t", "transformers": "tf", "load": "0.1"}
    return SwarmBenchResult(SwarmBenchSettings(), [join], {"mdns": [trial], "gossip": [trial]}, 1e-4, machine)


def test_section_replaces_only_its_own_block(tmp_path):
    out = tmp_path / "benchmarks.md"
    foundation = f"{FOUNDATION_START}\nfoundation numbers\n{FOUNDATION_END}"
    out.write_text(
        f"# Benchmarks\n\nkept above\n\n{foundation}\n\n{MARK_START}\nold swarm numbers\n{MARK_END}\n\nkept below\n"
    )
    write_section(out, render_markdown(_fake_result()))
    text = out.read_text()
    assert "old swarm numbers" not in text
    assert "kept above" in text and "kept below" in text and foundation in text
    assert text.count(MARK_START) == 1 and text.count(MARK_END) == 1
    assert "### Gossip traffic" in text and "bench-swarm --nodes N --json" in text and "| mDNS only |" in text


def test_section_is_appended_when_missing(tmp_path):
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
