"""`potluck bench` end to end on a tiny random LLaMA: two real node processes, a few tokens."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
from transformers import LlamaConfig, LlamaForCausalLM

from node.bench.basic import MARK_END, MARK_START, BenchSettings, render_markdown, run_benchmark, write_section


@pytest.fixture
def tiny_llama(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    folder = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


@pytest.mark.timeout(60)
def test_bench_writes_table_and_matches_local(tiny_llama, tmp_path):
    out = tmp_path / "benchmarks.md"
    out.write_text(f"# Benchmarks\n\nkept above\n\n{MARK_START}\nold numbers\n{MARK_END}\n\nkept below\n")
    settings = BenchSettings(model=tiny_llama, nodes=2, prompt_tokens=8, new_tokens=4, repeats=1, threads=1, out=out)

    result = run_benchmark(settings, Console(file=io.StringIO()))
    write_section(out, render_markdown(result))

    assert result.identical, (result.local.tokens, result.swarm.tokens)
    assert result.spans == [(0, 3), (3, 6)]
    text = out.read_text()
    assert "| system | prefill tok/s | decode tok/s |" in text
    assert "| local transformers |" in text and "| swarm, 2 nodes |" in text
    assert "Tokens identical (swarm vs local, every run): **yes**" in text
    assert "hop 2: layers 3:6 compute" in text
    assert "old numbers" not in text and "kept above" in text and "kept below" in text
    assert text.count(MARK_START) == 1 and text.count(MARK_END) == 1


def test_bench_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="--new-tokens"):
        BenchSettings(model=tmp_path, new_tokens=1)
    with pytest.raises(ValueError, match="does not exist"):
        BenchSettings(model=tmp_path, out=tmp_path / "missing" / "b.md")
