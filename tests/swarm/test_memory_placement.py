"""Placement counts a node's peak: layers as held (bf16 exact forms at 2 bytes a weight), the runtime, one layer as
read while loading; a node refuses, before loading, an explicit span whose peak does not fit in --memory."""

from __future__ import annotations

import pytest
import torch

from common.weights.files import ModelFiles
from node.bench.memory import llama_config, write_checkpoint
from node.metrics import process_memory
from node.model.loader import bytes_per_layer, loading_bytes, stored_dtype


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    config = llama_config(hidden=512, layers=6, intermediate=1536, heads=8, kv_heads=4, vocab=1024)
    return write_checkpoint(tmp_path_factory.mktemp("bf16"), config, shards=3)


def test_a_bf16_layer_counts_at_its_stored_size_when_held_exactly(bf16_folder):
    config = ModelFiles.open(str(bf16_folder)).config()
    assert stored_dtype(config) == torch.bfloat16
    dense = bytes_per_layer(config, torch.float32)
    held = bytes_per_layer(config, torch.float32, "none", torch.bfloat16, exact=True)
    norms = 2 * 512 * 4
    assert held - norms == (dense - norms) // 2  # projections: 2 bytes a weight instead of 4
    assert loading_bytes(config, torch.bfloat16) == (dense - norms) // 2 + norms // 2


def test_a_node_refuses_a_span_whose_peak_exceeds_memory_before_loading(bg_loop, bf16_folder, monkeypatch):
    import node.server

    config = ModelFiles.open(str(bf16_folder)).config()
    need = 6 * bytes_per_layer(config, torch.float32, "none", torch.bfloat16, exact=True) + \
        loading_bytes(config, torch.bfloat16)
    loads = []
    real = node.server.load_span
    monkeypatch.setattr(node.server, "load_span", lambda *args, **kwargs: loads.append(args) or real(*args, **kwargs))
    runtime = process_memory()[0]
    too_small = int((runtime + need // 2) / 0.8)
    with monkeypatch.context() as held, pytest.raises(MemoryError) as refused:
        # the runtime as the check reads it is pinned: a heap given back by another test's node in this process
        # between here and the check must not move the line this test draws at half the peak
        held.setattr(node.server, "process_memory", lambda pid="self": (runtime, runtime))
        bg_loop.start_node(bf16_folder, 0, 6, memory_bytes=too_small)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("layers 0:6 of ") and "at peak" in message
    assert "--memory" in message and "serve at most" in message
    assert loads == []  # refused before anything was read
    enough = int((process_memory()[0] + 2 * need + 64 * 2**20) / 0.8)
    running = bg_loop.start_node(bf16_folder, 0, 6, memory_bytes=enough, throughput=10.0)
    try:
        assert len(loads) == 1 and running.executor.span.end == 6
    finally:
        bg_loop.stop_node(running)
