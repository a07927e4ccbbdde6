"""`potluck bench-speculate` end to end, small: real node processes behind latency proxies, the four systems."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from node.bench.basic import write_section
from node.bench.speculate import SYSTEMS, Task, marks, render_markdown, run_speculate_bench


@pytest.mark.timeout(240)
def test_bench_speculate_checks_every_answer_and_writes_its_section(tiny_model_dir, tmp_path):
    tasks = (Task("random ids", None, False),)
    results, sessions = run_speculate_bench(
        tiny_model_dir("llama"),
        lookup=4,
        new_tokens=12,
        rounds=1,
        threads=1,
        tasks=tasks,
        delay_ms=2.0,
        sessions=(3,),
        console=Console(file=io.StringIO()),
    )
    [result] = results
    [together] = sessions
    assert together.sessions == 3 and together.equal  # 3 at once, with and without lookup: transformers' tokens
    assert all(len(tps) == 1 and tps[0] > 0 for tps in together.tps.values())
    assert result.equal  # every system's greedy tokens are plain transformers'
    assert all(len(result.runs[name]) == 1 for name in SYSTEMS)
    assert all(run.passes is None for run in result.runs["transformers"])
    swarm, lookup = result.runs["swarm"], result.runs["swarm, prompt lookup"]
    assert all(run.passes == 1 + len(run.tokens) - run.first_tokens for run in swarm)  # a pass a token
    assert all(run.passes <= len(run.tokens) for run in lookup)
    assert result.tokens_per_pass >= 1

    out = tmp_path / "benchmarks.md"
    start, end = marks(2.0)
    out.write_text(f"# Benchmarks\n\n{start}\nold\n{end}\n")
    write_section(out, render_markdown(results, 4, 12, 1, 1, "potluck bench-speculate ...", "machine", 2.0, sessions),
                  start, end)
    text = out.read_text()
    assert "old" not in text and "2 ms per hop" in text and "| random ids | 32 |" in text
    assert "| 3 |" in text and "Several sessions of one client" in text
    assert marks(0) != marks(2.0)
