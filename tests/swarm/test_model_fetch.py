"""A client with nothing but a node's address: the model's client files come from the nodes (rpc ModelFile),
checked against the weights fingerprint, and cached (client/fetch.py)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from client import DistributedModelForCausalLM
from client.config import ClientConfig
from client.fetch import fetch_model
from common.weights.errors import ModelLoadError
from common.weights.files import ModelFiles
from node.rpc.model_files import ModelFileServer
from tests.support.families import tiny_config

PROMPT = torch.tensor([[5, 17, 42, 99, 3, 64]])


def tiny_folder(tmp_path_factory, seed: int):
    torch.manual_seed(seed)
    folder = tmp_path_factory.mktemp(f"fetched-{seed}")
    AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_folder(tmp_path_factory, 11), tiny_folder(tmp_path_factory, 12)


def test_from_pretrained_with_only_an_address(bg_loop, folders, tmp_path):
    node = bg_loop.start_node(folders[0], 0, 6)
    try:
        config = ClientConfig(bootstrap=(node.address,), mdns=False, model_cache=str(tmp_path))
        model = DistributedModelForCausalLM.from_pretrained(node.record.model_id, config=config)
        try:
            reference = AutoModelForCausalLM.from_pretrained(str(folders[0]), dtype=torch.float32).eval()
            expected = reference.generate(PROMPT, max_new_tokens=6, do_sample=False)
            assert torch.equal(model.generate(PROMPT, max_new_tokens=6, do_sample=False), expected)
        finally:
            model.close()
        cached = tmp_path / node.record.weights
        assert (cached / "config.json").is_file() and (cached / "model.safetensors").is_file()
        assert (cached / "generation_config.json").is_file()
        # only the client parts travelled: no decoder layer in the cached file
        assert not [k for k in ModelFiles.open(str(cached)).weight_map() if ".layers." in k]
    finally:
        bg_loop.stop_node(node)


def test_a_node_serving_other_client_parts_is_refused(bg_loop, folders, tmp_path):
    liar = bg_loop.start_node(folders[0], 0, 6)
    honest = bg_loop.start_node(folders[0], 0, 6)
    try:
        liar.servicer.model_files = ModelFileServer(ModelFiles.open(str(folders[1])))  # same config, other weights
        model_id = liar.record.model_id
        with pytest.raises(ModelLoadError, match="weights fingerprint"):
            asyncio.run(fetch_model(model_id, [liar.record], cache=tmp_path))
        assert not list(tmp_path.iterdir())  # nothing of the liar's was kept
        folder = asyncio.run(fetch_model(model_id, [liar.record, honest.record], cache=tmp_path))
        assert folder == tmp_path / honest.record.weights
        reference = AutoModelForCausalLM.from_pretrained(str(folders[0]), dtype=torch.float32)
        fetched = load_file(folder / "model.safetensors")
        assert torch.equal(fetched["model.embed_tokens.weight"], reference.model.embed_tokens.weight)
    finally:
        bg_loop.stop_node(honest)
        bg_loop.stop_node(liar)


def test_the_api_with_nothing_but_an_address_serves_the_swarms_model(bg_loop, smollm_dir, tmp_path):
    """`potluck api --bootstrap HOST:PORT` with no --model and no --models-dir: /v1/models lists the swarm's model,
    its tokenizer and client parts come from the node (verified, cached), and a completion equals transformers'."""
    import shutil

    from transformers import AutoTokenizer, LlamaConfig

    from client.api.app import create_app
    from client.api.catalog import SwarmCatalog
    from tests.e2e.test_api import ApiServer

    folder = tmp_path / "tiny-chat"
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # SmolLM2's tokenizer
        if (smollm_dir / name).exists():
            shutil.copy(smollm_dir / name, folder / name)
    nodes = [bg_loop.start_node(folder, 0, 2), bg_loop.start_node(folder, 2, 4)]
    cache = tmp_path / "cache"
    bootstrap = tuple(node.address for node in nodes)
    catalog = SwarmCatalog(ClientConfig(bootstrap=bootstrap, mdns=False, model_cache=str(cache)))
    api = ApiServer(create_app({}, {}, catalog=catalog))
    try:
        client = api.client()
        assert [m.id for m in client.models.list().data] == ["tiny-chat"]
        # the dashboard shows (and its chat menu offers) what /v1/models lists, before any request loads it
        import httpx

        view = httpx.get(f"{api.url}/swarm", timeout=30).json()["models"]
        assert [(m["name"], m["status"], len(m["nodes"])) for m in view] == [("tiny-chat", "ready", 2)]
        prompt = [5, 17, 99, 1024]
        got = client.completions.create(model="tiny-chat", prompt=prompt, temperature=0, max_tokens=6)
        reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        ids = torch.tensor([prompt])
        expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        assert got.choices[0].text == AutoTokenizer.from_pretrained(folder).decode(expected[0, 4:])
        cached = cache / nodes[0].record.weights
        assert (cached / "tokenizer.json").is_file() and (cached / "model.safetensors").is_file()
    finally:
        api.stop()
        for node in nodes:
            bg_loop.stop_node(node)
