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
