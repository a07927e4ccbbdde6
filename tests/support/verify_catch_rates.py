"""How many lies a faulty node tells before verification catches it, per spot fraction (docs/reliability.md).

Run: .venv/bin/python -m tests.support.verify_catch_rates [TRIALS]. In-process nodes of a tiny random LLaMA (the
same set-up as tests/test_verify.py): honest A [0:3), B [3:6), C [0:6), and for each trial a fresh lying
node for [0:3) that the route prefers and that lies from its 4th step on. Prints a markdown table."""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from client import ClientConfig, DistributedModelForCausalLM
from tests.support.families import tiny_config
from tests.support.faulty_node import make_liar
from tests.support.swarm_fixtures import BackgroundLoop

NEW_TOKENS = 24


def main(trials: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="potluck-verify-rates-")) / "tiny-llama"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32).save_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.tensor([[1, 17, 230, 45, 99, 7, 311, 64, 12, 400, 5, 88]])
    expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0,
                                  max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)[0].tolist()
    loop = BackgroundLoop()
    honest = [loop.start_node(folder, a, b, throughput=1.0) for a, b in [(0, 3), (3, 6), (0, 6)]]
    rows = []
    for mode, fraction in [("spot", 0.1), ("spot", 0.25), ("spot", 0.5), ("full", 1.0)]:
        lies, exact = [], 0
        for trial in range(trials):
            node = loop.start_node(folder, 0, 3, throughput=1e5)
            lying = make_liar(node, honest_steps=3)
            config = ClientConfig(
                peers=tuple(n.address for n in [*honest, node]), verify=mode, verify_fraction=fraction
            )
            model = DistributedModelForCausalLM.from_pretrained(str(folder), config=config)
            try:
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0,
                                     max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)[0].tolist()
                exact += out == expected
                lies.append(lying.lies)
                assert node.address in model.swarm.liars, "the liar was not caught"
            finally:
                model.close()
                loop.stop_node(node)
        bound = 1 if mode == "full" else round(2 / fraction) - 1
        rows.append(f"| {mode} | {fraction if mode == 'spot' else '-'} | {bound} | {statistics.mean(lies):.1f} | "
                    f"{max(lies)} | {trials}/{trials} | {exact}/{trials} |")
        print(rows[-1], file=sys.stderr, flush=True)
    for node in honest:
        loop.stop_node(node)
    loop.close()
    print("| mode | fraction | bound (lies) | lies before caught, mean | max | caught | answers exact |")
    print("|---|---|---:|---:|---:|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
