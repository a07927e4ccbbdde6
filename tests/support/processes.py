"""Real node processes for e2e tests: a tiny LLaMA folder of their own, and a launcher that stops them all."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from node.launcher import NodeProcess


def tiny_llama_folder(folder: Path, layers: int, vocab: int, seed: int) -> Path:
    """A random tiny LLaMA saved in `folder` (its config hash is the caller's alone when `layers`/`seed` are)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@contextlib.contextmanager
def node_processes(tmp_path: Path, node_args: tuple[str, ...],
                   after_stop: Callable[[NodeProcess], None] | None = None) -> Iterator[Callable[..., NodeProcess]]:
    """`start(model, *args, span=(a, b) or None)` starts a node process (an identity of its own, `node_args` then
    `args`); at the end all get SIGTERM at once, then each is stopped (SIGKILL after 15 s) and `after_stop`ped."""
    started: list[NodeProcess] = []

    def start(model, *args: str, span: tuple[int, int] | None = None) -> NodeProcess:
        identity = ("--identity", str(tmp_path / f"node-{len(started)}.pem"))
        node = NodeProcess(model, *(span or ()), extra_args=(*node_args, *identity, *args))
        started.append(node)
        return node.start()

    try:
        yield start
    finally:
        for node in started:
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in started:
            node.stop(15)  # a second SIGTERM: skip what is left of the drain; SIGKILL after 15 s
            if after_stop is not None:
                after_stop(node)
