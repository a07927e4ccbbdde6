"""`potluck bench-perf` end to end, small: real node processes, a latency proxy, concurrent sessions."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from node.bench.basic import write_section
from node.bench.perf import MARK_END, MARK_START, run_benchmark
from node.bench.perf_report import render_markdown, write_plot
from node.bench.perf_results import PerfSettings


@pytest.mark.timeout(240)
def test_bench_perf_writes_every_table(tiny_model_dir, tmp_path):
    out, plot = tmp_path / "benchmarks.md", tmp_path / "perf.png"
    out.write_text(f"# Benchmarks\n\nkept\n\n{MARK_START}\nold numbers\n{MARK_END}\n")
    settings = PerfSettings(model=tiny_model_dir("llama"), prompt_tokens=8, new_tokens=4, prefill_tokens=24, repeats=1,
                            node_counts=(2,), delays_ms=(20.0,), wan_tokens=3, concurrency=(1, 3), concurrency_tokens=3,
                            threads=1, out=out)

    result = run_benchmark(settings, Console(file=io.StringIO()))
    assert write_plot(result, plot) and plot.stat().st_size > 1000
    write_section(out, render_markdown(result, plot.name), MARK_START, MARK_END)

    labels = [s.label for s in result.swarms]
    assert labels == ["swarm, 2 nodes, push", "swarm, 2 nodes, no push",
                      "swarm, 2 nodes, push, transformers' layers (--no-lean)"]
    for speed in result.swarms:  # greedy tokens through the swarm equal plain transformers'
        assert speed.tokens == result.local.tokens, speed.label
    # 20 ms per trip: push makes 3 trips a token, no push 4; neither can beat its limit by much
    push, no_push = (next(w for w in result.wan if w.push is p) for p in (True, False))
    assert push.limit_tps > no_push.limit_tps
    assert 0 < push.share < 1.2 and 0 < no_push.share < 1.2
    # the limit through proxies that add no delay: that compute plus 3 trips of 20 ms (how it compares with the limit
    # without proxies is timing, left to the benchmark: on a busy machine either can come out ahead)
    assert 0 < push.limit_proxied_tps < 1 / (3 * 0.020) and 0 < push.share_proxied < 1.5
    assert push.decode_tps < 1 / (3 * 0.020)
    assert [c[0] for c in result.concurrency] == [1, 3] and all(c[1] > 0 for c in result.concurrency)
    assert result.concurrency[0][2] == 1.0  # one session: one step per pass
    # tokens/s while every session decodes (3 tokens each: sessions that prefilled apart may never all decode at
    # once, which reads 0 and shows as n/a)
    assert result.concurrency[0][3] > 0 and all(c[3] >= 0 for c in result.concurrency)
    assert [(c.rows, c.nodes) for c in result.batch_compute] == [(3, 2), (3, 2)]  # exact, then dense
    assert all(0 < c.pass_one_ms and 0 < c.head_one_ms and 0 < c.ratio <= 3 * 1.5 for c in result.batch_compute)
    assert all(c[2] >= 1.0 for c in result.concurrency)
    assert {n: len(runs) for n, runs in result.concurrency_runs.items()} == {1: 1, 3: 1}  # one round per repeat
    # the same prompts as one session with a batch of N rows: each row equals transformers' tokens for its prompt alone
    assert {n: len(runs) for n, runs in result.batched.items()} == {1: 1, 3: 1}
    assert result.batched_exact == {1: True, 3: True}
    assert all(aggregate > 0 for runs in result.batched.values() for aggregate, _ in runs)
    assert len(result.settle_s) == 1 and 0 <= result.settle_s[0] < 31  # before the one-session round
    assert result.prefill_local_s > 0 and result.prefill_swarm_s > 0
    assert 0 < result.rss_node_mb and 0 < result.rss_whole_mb
    text = out.read_text()
    assert "| 3 | " in text.split("one generate call over a batch of N rows")[1]
    for heading in ("### 1. Decode", "### 2. Simulated WAN", "### 3. Concurrent sessions", "### 4. Prefill",
                    "### 5. Memory", "### 6. Bytes per token per hop"):
        assert heading in text
    assert "old numbers" not in text and "kept" in text and "(perf.png)" in text


def test_bench_perf_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="--new-tokens"):
        PerfSettings(model=tmp_path, new_tokens=1)
    with pytest.raises(ValueError, match="--concurrency"):
        PerfSettings(model=tmp_path, concurrency=(0,))
    with pytest.raises(ValueError, match="--llama-cpp needs a GGUF file"):
        PerfSettings(model=tmp_path, llama_cpp=tmp_path)


def test_settle_alone_waits_until_the_weights_are_back_in_the_one_row_layout(tiny_swarm, tiny_model_dir):
    """After sessions that shared passes the nodes hold their weights packed for several rows; one session alone
    brings them back to the plain layout before a one-session measurement."""
    from client import ClientConfig, DistributedModelForCausalLM
    from common.weights.fast_linear import mkl_packing_available
    from common.weights.files import ModelFiles
    from node.bench.perf import concurrent_speed, node_metadata, settle_alone

    if not mkl_packing_available():
        pytest.skip("this torch build has no MKL packing: weights are never packed")
    nodes = tiny_swarm("llama")
    addresses = [node.address for node in nodes]
    folder = tiny_model_dir("llama")
    client = DistributedModelForCausalLM.from_pretrained(str(folder), config=ClientConfig(peers=tuple(addresses)))
    config = ModelFiles.open(str(folder)).config()
    try:
        for seed in range(10):  # sessions sharing passes: the nodes pack
            concurrent_speed(client, config, 4, 8, seed)
            if any(node_metadata(a)["packed"] > 0 for a in addresses):
                break
        assert any(node_metadata(a)["packed"] > 0 for a in addresses), "no node packed its weights"
        seconds = settle_alone(client, config, addresses, 0)
        assert 0 < seconds < 31
        assert all(node_metadata(a)["packed"] == 0 for a in addresses)
    finally:
        client.close()


def test_steady_decode_counts_the_tokens_of_the_window_where_all_generations_decode():
    from node.bench.perf import steady_decode

    # one generation: its decode speed (tokens after its first one, over the time from first to last)
    assert steady_decode([[(1.0, 1), (1.5, 1), (2.0, 1)]]) == pytest.approx(2 / 1.0)
    # the second starts decoding at 2.0 (its prompt ran while the first decoded) and the first ends at 3.5: only
    # (2.0, 3.5] counts, and a draft of 3 tokens accepted at once counts 3
    first = [(1.0, 1), (1.5, 1), (2.0, 1), (2.5, 1), (3.0, 1), (3.5, 1)]
    second = [(2.0, 1), (2.5, 3), (3.0, 1), (4.0, 1)]
    assert steady_decode([first, second]) == pytest.approx((3 + 4) / 1.5)
    assert steady_decode([[(1.0, 1), (2.0, 1)], [(3.0, 1), (4.0, 1)]]) == 0.0  # never both decoding


def test_batch_computation_of_the_real_model(smollm_dir):
    """On SmolLM2 (exact q4 weights) a pass over 8 sessions' tokens costs more than one session's pass but less
    than eight of them, and the ratio is that of the rounds' costs."""
    from node.bench.batch_compute import batch_compute

    timed = batch_compute(smollm_dir, nodes=3, rows=8, rounds=5)
    # only what holds on a loaded machine too (a CI run once timed the 8-row pass at 9.6x the one-row pass while
    # another process held a core): eight rows cost more than one, and the ratio is that of the rounds' costs;
    # how much more is for `potluck bench-perf`, not a timed test
    assert timed.pass_one_ms < timed.pass_many_ms and timed.head_one_ms < timed.head_many_ms
    expected = 8 * (3 * timed.pass_one_ms + timed.head_one_ms) / (3 * timed.pass_many_ms + timed.head_many_ms)
    assert timed.ratio == pytest.approx(expected) and timed.ratio > 0
