"""`potluck bench-recovery` end to end on a tiny random LLaMA: real node processes, one SIGKILL."""

from __future__ import annotations

import argparse
import io

import pytest
from rich.console import Console

from node.bench.recovery import (
    MARK_END,
    MARK_START,
    RecoverySettings,
    add_recovery_bench_parser,
    render_markdown,
    run_recovery_bench,
    write_section,
)
from node.bench.swarm import build_tiny_llama


@pytest.mark.timeout(60)
def test_one_kill_is_timed_and_the_output_is_unchanged(tmp_path):
    tiny = build_tiny_llama(tmp_path / "tiny-llama")  # 6 layers: chain 0:2, 2:4, 4:6, spare 2:4
    out = tmp_path / "benchmarks.md"
    out.write_text(f"# Benchmarks\n\nkept above\n\n{MARK_START}\nold numbers\n{MARK_END}\n\nkept below\n")
    settings = RecoverySettings(model=tiny, kills=(4,), repeats=1, extra_tokens=4, threads=1, out=out)

    result = run_recovery_bench(settings, Console(file=io.StringIO()))
    write_section(out, render_markdown(result))

    assert result.spans == [(0, 2), (2, 4), (4, 6)] and result.victim == (2, 4)
    [trial] = result.trials
    assert trial.error == "" and trial.events == 1
    assert trial.identical and len(trial.tokens) == 8
    assert trial.stall_s is not None and trial.stall_s > 0
    assert trial.event.replayed_tokens == result.prompt_tokens + 3  # token 4 is the input of the failed step
    assert (trial.event.start, trial.event.end) == (2, 4)
    text = out.read_text()
    assert "| kill after k tokens |" in text and "\n| 4 | 23 |" in text
    assert "next token within 2 s of a SIGKILL, every time: " in text
    assert "old numbers" not in text and "kept above" in text and "kept below" in text
    assert text.count(MARK_START) == 1 and text.count(MARK_END) == 1


def test_settings_and_command_line(tmp_path):
    with pytest.raises(ValueError, match="--kills"):
        RecoverySettings(model=tmp_path, kills=(0, 8))
    with pytest.raises(ValueError, match="--repeats"):
        RecoverySettings(model=tmp_path, repeats=0)
    parser = argparse.ArgumentParser()
    add_recovery_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench-recovery", "--model", str(tmp_path), "--kills", "4,16", "--repeats", "2"])
    assert args.kills == (4, 16) and args.repeats == 2 and args.extra_tokens == 8
    with pytest.raises(SystemExit):
        parser.parse_args(["bench-recovery", "--model", str(tmp_path), "--kills", "four"])
