"""Weights fingerprints: two nodes serving one config with different weights are not mixed (docs/swarm.md)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import DistributedModelForCausalLM
from client.config import ClientConfig
from common.weights.files import ModelFiles, config_hash
from common.weights.fingerprint import weights_fingerprint
from tests.support.families import tiny_config

PROMPT = torch.tensor([[5, 17, 42, 99, 3, 64]])


@pytest.fixture(scope="module")
def twin_folders(tmp_path_factory):
    """Two tiny llama folders of one config, made with different seeds."""
    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        folder = tmp_path_factory.mktemp(f"twin-{seed}")
        AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32).save_pretrained(folder)
        folders.append(folder)
    return folders


def test_twins_share_a_config_hash_but_not_a_fingerprint(twin_folders):
    a, b = (ModelFiles.open(str(folder)) for folder in twin_folders)
    assert config_hash(a.config()) == config_hash(b.config())
    assert weights_fingerprint(a) != weights_fingerprint(b)
    assert weights_fingerprint(a) == weights_fingerprint(ModelFiles.open(str(twin_folders[0])))


def test_client_routes_only_through_nodes_with_its_weights(bg_loop, twin_folders):
    first = bg_loop.start_node(twin_folders[0], 0, 6)
    second = bg_loop.start_node(twin_folders[1], 0, 6, bootstrap=(first.address,))
    try:
        assert first.record.weights and second.record.weights and first.record.weights != second.record.weights
        for folder, node in zip(twin_folders, (first, second)):
            model = DistributedModelForCausalLM.from_pretrained(str(folder), bootstrap=[first.address], mdns=False)
            try:
                assert [info.address for info in model.swarm.refresh()] == [node.address]
                reference = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
                expected = reference.generate(PROMPT, max_new_tokens=6, do_sample=False)
                assert torch.equal(model.generate(PROMPT, max_new_tokens=6, do_sample=False), expected)
                assert model.swarm.route()[0].peer.address == node.address
            finally:
                model.close()
        # weights="any" matches by config hash alone, as before fingerprints: both twins are candidates
        config = ClientConfig(bootstrap=(first.address,), mdns=False, weights="any")
        mixed = DistributedModelForCausalLM.from_pretrained(str(twin_folders[0]), config=config)
        try:
            assert sorted(info.address for info in mixed.swarm.refresh()) == sorted([first.address, second.address])
        finally:
            mixed.close()
    finally:
        bg_loop.stop_node(second)
        bg_loop.stop_node(first)
