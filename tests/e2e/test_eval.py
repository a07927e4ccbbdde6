"""Perplexity through the swarm (`potluck eval`), against plain transformers on the same weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from client.eval import perplexity, window_starts
from common.wire import codec
from node.cli.main import main
from tests.support.swarm_fixtures import node_info

TEXT = Path(__file__).resolve().parents[2] / "node" / "bench" / "eval-text.txt"


@pytest.mark.parametrize(
    "length,window,stride",
    [(2, 2, 1), (10, 4, 2), (100, 32, 31), (100, 32, 7), (33, 32, 1), (496, 512, 256), (1000, 512, 256)],
)
def test_windows_score_every_token_once(length, window, stride):
    spans = window_starts(length, window, stride)
    scored = [p for _, end, first in spans for p in range(first, end)]
    assert scored == list(range(1, length))  # each token after the first, once, in order
    assert all(end - begin <= window and begin < first and (begin == 0 or first - begin >= window - stride)
               for begin, end, first in spans)


def test_bad_windows_are_refused():
    with pytest.raises(ValueError, match="stride"):
        window_starts(100, 16, 16)


@pytest.fixture(scope="module")
def text_ids(tokenizer):
    return tokenizer(TEXT.read_text(), return_tensors="pt").input_ids[0][:160]


def test_one_window_equals_transformers_loss(smollm_reference, text_ids):
    """With one window the sliding-window NLL is transformers' own mean LM loss."""
    ids = text_ids[:64]
    with torch.no_grad():
        expected = smollm_reference(ids[None], labels=ids[None]).loss.item()
    got = perplexity(smollm_reference, ids, window=512, stride=256)
    assert got.tokens == 63 and got.windows == 1
    assert got.nll == pytest.approx(expected, rel=1e-5)


def test_swarm_perplexity_equals_local(remote, smollm_reference, text_ids):
    local = perplexity(smollm_reference, text_ids, window=64, stride=48)
    swarm = perplexity(remote, text_ids, window=64, stride=48)
    assert swarm.windows == local.windows == 3 and swarm.tokens == 159
    assert 1 < local.perplexity < 100  # a real model on real English
    assert swarm.perplexity == pytest.approx(local.perplexity, rel=1e-4)


def test_eval_cli_json(smollm_dir, smollm_chain, smollm_reference, text_ids, capsys):
    peers = ",".join(node.address for node in smollm_chain)
    code = main(["eval", "--model", str(smollm_dir), "--text", str(TEXT), "--peers", peers, "--no-mdns",
                 "--window", "64", "--stride", "32", "--max-tokens", "128", "--accept-quant", "none", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["swarm"]
    expected = perplexity(smollm_reference, text_ids[:128], window=64, stride=32)
    assert result["tokens"] == 127 and result["windows"] == 3
    assert result["perplexity"] == pytest.approx(expected.perplexity, rel=1e-4)
    assert math.isclose(math.exp(result["nll"]), result["perplexity"])


def test_eval_cli_errors(smollm_dir, tmp_path, capsys):
    assert (
        main(["eval", "--model", str(smollm_dir), "--text", str(tmp_path / "missing.txt"), "--peers", "127.0.0.1:1"])
        == 2
    )
    assert "missing.txt" in capsys.readouterr().err
    (tmp_path / "short.txt").write_text("Hello world, this is a text.")
    assert main(["eval", "--model", str(smollm_dir), "--text", str(tmp_path / "short.txt"), "--peers", "127.0.0.1:1",
                 "--window", "8", "--stride", "16"]) == 2
    assert "stride" in capsys.readouterr().err


def test_eval_cli_reports_fast_numerics_against_exact(capsys):
    """Nodes run with `--numerics fast` on the demo's own Q4_1 GGUF: `potluck eval --local` scores them against
    transformers (exact) and reports the greedy agreement; llama.cpp's numerics cost well under a few percent."""
    from common.weights.embedded import gguf_path
    from node.launcher import start_chain

    model = gguf_path()
    nodes = start_chain(model, 30, 2, threads=1, extra_args=("--numerics", "fast", "--no-mdns"))
    try:
        assert [codec.unpack_metadata(node_info(n.address).metadata)["numerics"] for n in nodes] == ["fast"] * 2
        code = main(["eval", "--model", str(model), "--text", str(TEXT), "--peers", ",".join(n.address for n in nodes),
                     "--no-mdns", "--window", "128", "--stride", "64", "--max-tokens", "320", "--local", "--json"])
        assert code == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    finally:
        codes = [node.stop() for node in nodes]
    assert codes == [0, 0]
    swarm, local, comparison = report["swarm"], report["local"], report["comparison"]
    assert swarm["tokens"] == local["tokens"] == comparison["tokens"] == 319
    assert swarm["perplexity"] != local["perplexity"]  # not exact
    assert abs(comparison["perplexity_ratio"] - 1) < 0.03  # measured: +0.4 % over the whole text
    assert comparison["greedy_agreement"] > 0.9  # measured: 0.98
