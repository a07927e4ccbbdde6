"""`potluck bench-compile`: torch.compile of a span's decode step against the eager lean runtime."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from node.bench.basic import write_section
from node.bench.compile import MARK_END, MARK_START, CompileSettings, render_markdown, run_benchmark
from node.cli.main import main


@pytest.mark.timeout(300)
def test_compiled_decode_step_matches_the_eager_runtime(tiny_model_dir, tmp_path):
    # aot_eager: dynamo and AOT autograd trace the step with a dynamic cache length, as for inductor, but no
    # C++ is generated (inductor's own code generation is torch's to test, and costs ~25 s here)
    settings = CompileSettings(model=tiny_model_dir("llama"), start=0, end=2, prompt_tokens=8, steps=3, threads=1,
                               backend="aot_eager")
    result = run_benchmark(settings, Console(file=io.StringIO()))
    # the traced step is the lean runtime's arithmetic: same outputs up to float rounding, every step
    assert result.max_abs_diff < 1e-4
    assert len(result.eager_ms) == len(result.compiled_ms) == 3
    assert result.compile_s > 0 and all(ms > 0 for ms in result.compiled_ms)
    out = tmp_path / "benchmarks.md"
    out.write_text(f"kept\n{MARK_START}\nold\n{MARK_END}\n")
    write_section(out, render_markdown(result), MARK_START, MARK_END)
    text = out.read_text()
    assert "torch.compile" in text and "old" not in text and "kept" in text


def test_bench_compile_refuses_a_span_outside_the_model(tiny_model_dir, capsys):
    assert main(["bench-compile", "--model", str(tiny_model_dir("llama")), "--blocks", "0:99"]) != 0
    assert "not within the model's 6 layers" in capsys.readouterr().err
