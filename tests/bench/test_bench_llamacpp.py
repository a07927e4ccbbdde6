"""`potluck bench-perf --llama-cpp`: finding a llama.cpp build, reading llama-bench's output, the report.

Running llama.cpp itself needs a build (deploy/llamacpp.sh, ~11 minutes on 2 cores), which the suite does not
make; these tests cover what runs around it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.bench.llamacpp import BatchedRun, LlamaCpp, LlamaSide, batched_runs, decode_samples
from node.bench.perf_report import render_markdown
from node.bench.perf_results import PerfResult, PerfSettings, Speed


def _record(n_prompt: int, n_gen: int, samples: list[float]) -> str:
    """One line of `llama-bench -o jsonl` (the fields it prints that matter here, plus a few it also prints)."""
    return json.dumps({"build_commit": "0c1e570", "model_type": "llama 256M all F32", "n_threads": 2,
                       "n_prompt": n_prompt, "n_gen": n_gen, "avg_ts": sum(samples) / len(samples),
                       "stddev_ts": 0.5, "samples_ts": samples})


def test_decode_samples_reads_the_decode_tests_only():
    text = "\n".join(["some log line", _record(512, 0, [312.9, 330.1]), _record(0, 48, [29.6, 30.8, 31.1]), ""])
    assert decode_samples(text) == [29.6, 30.8, 31.1]
    with pytest.raises(RuntimeError, match="no decode result"):
        decode_samples(_record(512, 0, [300.0]))


def test_batched_runs_read_llama_batched_bench_per_sequence_count():
    line = ('{"n_kv_max": 1024, "n_batch": 2048, "n_ubatch": 512, "flash_attn": 0, "is_pp_shared": 0, '
            '"n_gpu_layers": 0, "n_threads": 2, "n_threads_batch": 2, "pp": 16, "tg": 24, "pl": %d, "n_kv": 320, '
            '"t_pp": %f, "speed_pp": 1.0, "t_tg": %f, "speed_tg": 1.0, "t": 1.0, "speed": 1.0}')
    runs = batched_runs("main: log line\n" + line % (1, 0.1, 0.2) + "\n" + line % (8, 0.4, 1.2) + "\n")
    assert sorted(runs) == [1, 8]
    assert runs[8] == BatchedRun(8, 16, 24, 0.4, 1.2)
    assert runs[8].aggregate_tps == pytest.approx(8 * 24 / 1.6) and runs[8].decode_tps == pytest.approx(8 * 24 / 1.2)
    with pytest.raises(RuntimeError, match="no result"):
        batched_runs("nothing")


def test_find_names_what_is_missing(tmp_path):
    gguf = tmp_path / "model-f32.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="no llama-bench and ggml-rpc-server or rpc-server"):
        LlamaCpp.find(tmp_path, gguf)
    (tmp_path / "bin").mkdir()
    for name in ("llama-bench", "rpc-server"):  # an older build's names, in bin/
        (tmp_path / "bin" / name).write_text("")
    with pytest.raises(ValueError, match="--llama-gguf .*nope.gguf: no such file"):
        LlamaCpp.find(tmp_path, tmp_path / "nope.gguf")
    found = LlamaCpp.find(tmp_path, gguf)
    assert found.bench == tmp_path / "bin" / "llama-bench" and found.rpc_server == tmp_path / "bin" / "rpc-server"


def test_the_report_compares_the_swarm_with_llama_cpp_on_the_file_it_serves_first(tmp_path):
    served, f32 = Path("SmolLM2-135M-Instruct.Q4_1.gguf"), Path("m-f32.gguf")
    settings = PerfSettings(model=tmp_path, repeats=2, llama_cpp=tmp_path, llama_gguf=(served, f32),
                            llama_served=served)
    machine = {"cpu": "cpu", "os": "os", "python": "3.11", "torch": "2", "transformers": "5", "load": "0",
               "threads": "2"}
    result = PerfResult(settings, machine, Speed("local transformers", [16.0, 16.0], [1, 2]))
    result.llama = [
        LlamaSide(3, [15.0, 14.0], [120.0, 130.0], [70.0, 80.0], served.name, "Q4_1", served=True),
        LlamaSide(3, [15.0, 14.0], [30.0, 29.0], [14.0, 15.0], f32.name, "F32"),
    ]
    text = render_markdown(result)
    assert "#### llama.cpp side by side" in text
    q4 = text.index("| llama.cpp Q4_1 (the file the swarm serves), one process | `SmolLM2-135M-Instruct.Q4_1.gguf` "
                    "| 125.00 | 8.0 | 0.12x |")
    assert "| llama.cpp Q4_1 (the file the swarm serves) over RPC, 3 servers | `SmolLM2-135M-Instruct.Q4_1.gguf` " \
           "| 75.00 | 13.3 | 0.19x |" in text
    assert q4 < text.index("| llama.cpp F32, one process | `m-f32.gguf` | 29.50 | 33.9 | 0.49x |")
    assert "| llama.cpp F32 over RPC, 3 servers | `m-f32.gguf` | 14.50 | 69.0 | 1.00x |" in text
    assert "llama-batched-bench" not in text  # no batched runs, no table
    assert "| swarm, 3 nodes, push vs llama.cpp over RPC, 3 servers | 0.19x |" in text  # the served file only
    assert "m-f32.gguf` | 14.50" in text and "vs llama.cpp over RPC, 3 servers | 1.00x" not in text
    result.llama += [  # one node of each numerics, and the chain in fast numerics: turns of their own
        LlamaSide(1, [60.0, 62.0], [120.0, 124.0], [100.0, 100.0], served.name, "Q4_1", True,
                  "swarm, 1 node, push, --numerics fast"),
        LlamaSide(3, [90.0, 80.0], [120.0, 130.0], [70.0, 80.0], served.name, "Q4_1", True,
                  "swarm, 3 nodes, push, --numerics fast"),
    ]
    text = render_markdown(result)
    assert "| swarm, 1 node, push, --numerics fast | | 61.00 | 16.4 | |" in text
    assert "| swarm, 1 node, push, --numerics fast vs llama.cpp in one process | 0.50x |" in text
    assert "| swarm, 3 nodes, push, --numerics fast vs llama.cpp over RPC, 3 servers | 1.13x |" in text
    result.concurrency = [(1, 40.0, 1.0, 45.0), (8, 120.0, 6.0, 150.0)]
    result.llama_batched = {1: [BatchedRun(1, 16, 24, 0.1, 0.5), BatchedRun(1, 16, 24, 0.1, 0.3)],
                            8: [BatchedRun(8, 16, 24, 0.3, 1.3)]}
    result.batched = {1: [(40.0, 45.0)], 8: [(170.0, 230.0), (180.0, 236.0), (190.0, 250.0)]}
    result.batched_exact = {1: True, 8: False}
    text = render_markdown(result)
    # sessions, a batch of N in one session, llama.cpp: aggregate, then decode
    assert "| 1 | 40.0 | 40.0 | 50.0 | **0.80x** | **0.80x** | 45.0 | 45.0 | 64.0 | 0.70x | 0.70x |" in text
    assert "| 8 | 120.0 | 180.0 | 120.0 | **1.00x** | **1.50x** | 150.0 | 236.0 | 147.7 | 1.02x | 1.60x |" in text
    assert "| 8 | 180.0 | 1.50x | 236.0 | **no** |" in text  # the batch's own table: medians, vs sessions, the check


def test_llama_cpp_runs_the_file_the_model_folder_was_made_from(smollm_dir, tmp_path):
    """bench-perf's default GGUF for llama.cpp is the demo's own Q4_1 file (the nodes hold its values bit for
    bit), not a conversion; any other folder has none."""
    from common.weights.embedded import gguf_path, source_gguf
    from node.bench.llamacpp import gguf_kind

    assert source_gguf(smollm_dir) == gguf_path()
    assert gguf_kind(gguf_path()) == "Q4_1"
    (tmp_path / "config.json").write_text('{"_model_name_or_path": "another model"}')
    assert source_gguf(tmp_path) is None
