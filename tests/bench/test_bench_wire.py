"""`potluck bench-wire` end to end on a tiny random LLaMA: real node processes, every wire format."""

from __future__ import annotations

import argparse
import io

import pytest
from rich.console import Console

from node.bench.swarm import build_tiny_llama
from node.bench.wire import (
    MARK_END,
    MARK_START,
    WireSettings,
    add_wire_bench_parser,
    render_markdown,
    run_wire_bench,
    write_section,
)


@pytest.mark.timeout(120)
def test_every_format_is_measured_and_the_section_written(tmp_path):
    tiny = build_tiny_llama(tmp_path / "tiny-llama")  # 6 layers, hidden size 64: one int8 block a token
    out = tmp_path / "benchmarks.md"
    out.write_text(f"# Benchmarks\n\nkept above\n\n{MARK_START}\nold numbers\n{MARK_END}\n\nkept below\n")
    settings = WireSettings(model=tiny, chat_prompts=("a", "b"), text_prompts=("c",), new_tokens=4, decode_steps=2,
                            prefill_tokens=16, threads=1, out=out)

    result = run_wire_bench(settings, Console(file=io.StringIO()))
    write_section(out, render_markdown(result))

    assert result.spans == [(0, 2), (2, 4), (4, 6)] and result.hidden_size == 64
    assert [f.wire for f in result.formats] == ["float32", "bfloat16", "float16", "int8"]
    f32, bf16, f16, int8 = result.formats
    # a one-token hidden state is 64 values: 256 bytes in float32, 128 in 16 bits, 64 + one 2-byte scale in int8
    assert 256 < f32.decode_in < 256 + 64 and f32.decode_out > 256
    assert 128 < bf16.decode_in < 128 + 64 and 66 < int8.decode_in < 66 + 64
    assert int8.decode_per_token < bf16.decode_per_token < f32.decode_per_token
    assert f16.decode_per_token <= bf16.decode_per_token
    assert 16 * 4 * 64 < f32.prefill_in < 16 * 4 * 64 + 64  # the prefill: 16 tokens, overhead amortised
    assert int8.prefill_in < 0.3 * f32.prefill_in
    assert f32.max_error == 0.0
    assert 0 < bf16.max_error < 0.1 * result.max_hidden and 0 < int8.max_error < 0.1 * result.max_hidden
    assert f16.max_error < bf16.max_error  # 11 bits of mantissa against 8, on small values
    assert result.measured_positions == 6 + 2  # the text prompt's 6 random ids, then 2 decode steps
    assert all(len(tokens) == 4 for tokens in result.reference)
    assert result.identical(f32) == 2  # the float32 wire is exact

    text = out.read_text()
    assert "| wire format |" in text and "| int8 |" in text and "| float32 |" in text
    assert f"| **{int8.decode_per_token:,}** |" in text
    assert "old numbers" not in text and "kept above" in text and "kept below" in text
    assert text.count(MARK_START) == 1 and text.count(MARK_END) == 1


def test_settings_and_command_line(tmp_path):
    with pytest.raises(ValueError, match="--formats"):
        WireSettings(model=tmp_path, formats=("int4",))
    with pytest.raises(ValueError, match="--new-tokens"):
        WireSettings(model=tmp_path, new_tokens=0)
    assert WireSettings(model=tmp_path, formats=("int8",)).all_formats == ("float32", "int8")
    parser = argparse.ArgumentParser()
    add_wire_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench-wire", "--model", str(tmp_path), "--formats", "bfloat16,int8"])
    assert args.formats == ("bfloat16", "int8") and args.new_tokens == 32
    with pytest.raises(SystemExit):
        parser.parse_args(["bench-wire", "--model", str(tmp_path), "--formats", "int4"])
