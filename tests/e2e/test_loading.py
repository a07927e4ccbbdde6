"""A node holds and reads only its span; a client holds no decoder layer; hub ids resolve offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, T5Config

from common.weights.client_parts import load_client_parts
from common.weights.errors import ModelLoadError
from common.weights.files import ModelFiles
from node.model.loader import load_span

CPU = torch.device("cpu")


def test_node_holds_and_reads_only_its_layers(smollm_dir, smollm_reference):
    span, stats = load_span(ModelFiles.open(str(smollm_dir)), 10, 20, CPU, torch.float32)
    state = span.state_dict()
    layer_ids = {int(key.split(".")[1]) for key in state if key.startswith("layers.")}
    assert layer_ids == set(range(10))  # local indices 0..9 = global 10..19
    assert all(key.startswith(("layers.", "rotary_emb.")) for key in state)
    # the very same tensors as transformers' layers 10..19, nothing more
    expected = {
        f"layers.{i - 10}.{k}": v
        for i in range(10, 20)
        for k, v in smollm_reference.model.layers[i].state_dict().items()
    }
    params = {k: v for k, v in state.items() if k.startswith("layers.")}
    assert params.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(params[key], value), key
    span_bytes = sum(v.numel() * v.element_size() for v in params.values())
    assert stats.bytes_read == span_bytes
    assert stats.bytes_read < 0.3 * (smollm_dir / "model.safetensors").stat().st_size
    assert [layer.self_attn.layer_idx for layer in span.layers] == list(range(10, 20))


def test_client_holds_no_decoder_layer(smollm_dir):
    parts = load_client_parts(ModelFiles.open(str(smollm_dir)), CPU, torch.float32)
    modules = {"embed": parts.embed_tokens, "norm": parts.norm, "head": parts.lm_head}
    names = [f"{k}.{n}" for k, m in modules.items() for n, _ in m.named_parameters()]
    assert names == ["embed.weight", "norm.weight", "head.weight"]
    assert parts.lm_head.weight is parts.embed_tokens.weight  # tied, as in the checkpoint
    hidden = parts.config.hidden_size
    assert parts.stats.bytes_read == (parts.config.vocab_size * hidden + hidden) * 4


def test_sharded_checkpoint_opens_only_the_needed_shards(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    all_shards = set(weight_map.values())
    assert len(all_shards) > 3
    span, stats = load_span(ModelFiles.open(str(tmp_path)), 4, 6, CPU, torch.float32)
    needed = {shard for key, shard in weight_map.items() if key.startswith(("model.layers.4.", "model.layers.5."))}
    assert stats.shards == needed and needed < all_shards
    for i, layer in enumerate(span.layers):
        for key, value in layer.state_dict().items():
            assert torch.equal(value, model.model.layers[4 + i].state_dict()[key])


def _fake_hub_cache(source: Path, cache: Path, repo: str, keep_shards: set[str]) -> None:
    """Lay `source` out as huggingface_hub's cache of `repo`, with only `keep_shards` of the weights."""
    commit = "0" * 40
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for path in source.iterdir():
        if path.suffix != ".safetensors" or path.name in keep_shards:
            (snapshot / path.name).write_bytes(path.read_bytes())


def test_hub_id_loads_offline_with_only_the_span_shards(tiny_model_dir, tmp_path):
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).save_pretrained(sharded, max_shard_size="100KB")
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {s for k, s in weight_map.items() if k.startswith(("model.layers.2.", "model.layers.3."))}
    cache = tmp_path / "hub"
    _fake_hub_cache(sharded, cache, "potluck-test/tiny-llama", needed)
    script = (
        "import torch; from node.model.loader import ModelFiles, load_span\n"
        "files = ModelFiles.open('potluck-test/tiny-llama')\n"
        "span, stats = load_span(files, 2, 4, torch.device('cpu'), torch.float32)\n"
        "print(files.repo_id, sorted(stats.shards), sum(p.numel() for p in span.parameters()))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    repo, shards = done.stdout.strip().split(" ", 1)
    assert repo == "potluck-test/tiny-llama"
    assert shards.startswith(str(sorted(needed)))  # read only the shards of layers 2..3, all from the cache


def test_unsupported_architecture_is_named(tmp_path):
    T5Config(vocab_size=64, d_model=16, num_layers=2).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="unsupported architecture.*t5|T5"):
        load_span(ModelFiles.open(str(tmp_path)), 0, 1, CPU, torch.float32)


@pytest.mark.parametrize("blocks", [(0, 7), (6, 6), (5, 3)])
def test_span_outside_the_model_is_refused(tiny_model_dir, blocks):
    with pytest.raises(ModelLoadError, match="not within the model's 6 layers"):
        load_span(ModelFiles.open(str(tiny_model_dir("llama"))), *blocks, CPU, torch.float32)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        ModelFiles.open(str(tmp_path))
    with pytest.raises(ModelLoadError, match="neither a model folder nor a hub id"):
        ModelFiles.open(str(tmp_path / "missing" / "deeper"))


def test_own_memory_copies_small_tensors_out_of_the_shard_mapping(tiny_model_dir):
    import torch

    from common.weights.files import ModelFiles
    from node.model.loader import load_span, own_memory

    span, _ = load_span(ModelFiles.open(str(tiny_model_dir("llama"))), 0, 2, torch.device("cpu"), torch.float32)
    norm = span.layers[0].input_layernorm.weight
    before_ptr, before = norm.untyped_storage().data_ptr(), norm.detach().clone()
    copied = own_memory(span, max_bytes=1024)  # only the small ones: norms (64 floats), not the projections
    tensors = [*span.parameters(), *span.buffers()]
    assert copied == sum(t.numel() * t.element_size() for t in tensors if t.numel() * t.element_size() <= 1024) > 0
    assert norm.untyped_storage().data_ptr() != before_ptr  # its own memory now
    assert torch.equal(norm, before)
