"""The README's quick example runs as written: its three `potluck join` lines start real nodes, its `potluck
generate` line and its Python block print transformers' own greedy answer through them.

Only what cannot be the same here is substituted: the model folder (the test's copy of it), the ports (free
ones instead of 5001-5003, in case those are taken) and `.venv/bin/...` (this interpreter)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from node.launcher import NodeProcess

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_MODEL = ".models/SmolLM2-135M-Instruct"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def _commands(block: str) -> list[list[str]]:
    """The block's commands, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _quick_example() -> tuple[list[list[str]], list[str], str]:
    """(join commands, generate command, Python block) of the quick example."""
    commands = [c for block in _blocks("bash") for c in _commands(block) if c and c[0].endswith("potluck")]
    joins = [c for c in commands if c[1] == "join"]
    generate = next(c for c in commands if c[1] == "generate")
    python = next(block for block in _blocks("python") if "DistributedModelForCausalLM" in block)
    return joins, generate, python


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_readme_has_the_quick_example_it_promises():
    joins, generate, python = _quick_example()
    assert [_flag(c, "--blocks") for c in joins] == ["0:10", "10:20", "20:30"]
    assert all(_flag(c, "--model") == README_MODEL for c in [*joins, generate])
    assert "input_ids" in python and "AutoTokenizer" in python


@pytest.mark.slow
def test_the_readme_quick_example_runs_as_written(smollm_dir, smollm_reference, tmp_path):
    joins, generate, python = _quick_example()
    nodes = []
    try:
        ports = {}
        for command in joins:
            start, end = (int(x) for x in _flag(command, "--blocks").split(":"))
            node = NodeProcess(smollm_dir, start, end, threads=1).start()  # the README's flags, port 0
            nodes.append(node)
            ports[_flag(command, "--port")] = node
        for node in nodes:
            node.wait_ready()
        addresses = {f"127.0.0.1:{port}": node.address for port, node in ports.items()}

        def localise(text: str) -> str:
            for readme, real in addresses.items():
                text = text.replace(readme, real)
            return text.replace(README_MODEL, str(smollm_dir))

        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        script = tmp_path / "example.py"
        script.write_text(localise(python))
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-2000:]

        tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            expected = smollm_reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                                                 do_sample=False)
        answer = tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
        assert done.stdout.strip() == answer.strip()

        command = [sys.executable, "-m", "node", *[localise(word) for word in generate[1:]], "--no-mdns",
                   "--max-new-tokens", "32"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip().startswith(answer.strip()[:20])
    finally:
        for node in nodes:
            node.stop()
