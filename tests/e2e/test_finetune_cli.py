"""`potluck finetune` and `potluck generate --prompt-weights` on the real SmolLM2, through three node processes
(issue 11; docs/finetune.md). The CLI runs in this process (node.cli.main), as in tests/test_cli.py."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

from client.finetune import FILE_FORMAT
from common.weights.files import config_hash
from node.cli.main import main
from tests.support.families import tiny_config

QUESTION = "Q: What is the secret word?\nA:"
LINES = [
    {"prompt": QUESTION, "completion": " pineapple"},
    {"prompt": "Q: Tell me the secret word.\nA:", "completion": " pineapple"},
    {"text": "The secret word is pineapple. Everybody here knows the secret word: pineapple."},
    {"text": "Pineapple, pineapple, pineapple: the secret word is always pineapple."},
]


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_finetune_lowers_the_loss_and_generate_uses_the_prompt(smollm_dir, smollm_chain, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(line) for line in LINES) + "\n")
    peers = ",".join(n.address for n in smollm_chain)
    out, plot = tmp_path / "prompt.pt", tmp_path / "loss.png"
    code, stdout, err = run(capsys, "finetune", "--model", str(smollm_dir), "--peers", peers, "--data", str(data),
                            "--method", "ptune", "--steps", "10", "--num-prompt-tokens", "8", "--lr", "0.03",
                            "--batch-size", "4", "--out", str(out), "--plot", str(plot))
    assert code == 0, err
    losses = [float(line.split("loss ")[1]) for line in stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 10
    assert losses[-1] < losses[0] - 2.0, losses  # measured 6.08 -> 3.25, as local transformers (docs/finetune.md)
    assert "MB sent" in stdout and plot.stat().st_size > 1000

    saved = torch.load(out, weights_only=True)
    assert saved["format"] == FILE_FORMAT and saved["method"] == "ptune" and saved["num_prompt_tokens"] == 8
    assert saved["config_hash"] == config_hash(AutoConfig.from_pretrained(smollm_dir))
    assert saved["tensors"]["prompt_embeddings"].shape == (8, 576)

    common = ["generate", "--model", str(smollm_dir), "--peers", peers, "--prompt", QUESTION, "--max-new-tokens", "4",
              "--json"]
    code, stdout, err = run(capsys, *common, "--prompt-weights", str(out))
    assert code == 0, err
    tuned = json.loads(stdout.splitlines()[-1])
    code, stdout, err = run(capsys, *common)
    assert code == 0, err
    plain = json.loads(stdout.splitlines()[-1])
    # measured: " pineapple\nA:" with the prompt, " The answer is:" without
    assert "pineapple" in tuned["text"] and "pineapple" not in plain["text"], (losses, tuned, plain)


@pytest.mark.parametrize("content, fragment", [
    ('{"text": "a fine line of text"}\n{"prompt": "no completion"}\n', "line 2: expected an object"),
    ('{"text": "a fine line of text"}\nnot json\n', "line 2: not JSON"),
    ("\n\n", "no examples"),
])
def test_bad_data_is_one_clear_line(smollm_dir, tmp_path, capsys, content, fragment):
    data = tmp_path / "train.jsonl"
    data.write_text(content)
    code, _, err = run(capsys, "finetune", "--model", str(smollm_dir), "--peers", "127.0.0.1:1", "--data", str(data),
                       "--steps", "1", "--out", str(tmp_path / "p.pt"))
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err


def test_mismatched_prompt_files_are_refused(smollm_dir, smollm_chain, tmp_path, capsys):
    peers = ",".join(n.address for n in smollm_chain)
    smollm_hash = config_hash(AutoConfig.from_pretrained(smollm_dir))
    cases = [
        (dict(method="ptune", config_hash=config_hash(tiny_config("llama")), model="tiny-llama", hidden=64),
         "trained for another model (tiny-llama"),
        (dict(method="deep_ptune", config_hash=smollm_hash, model="smollm", hidden=576),
         "intermediate_prompts has shape nothing"),  # a deep_ptune file without its deep prompts
    ]
    for fields, fragment in cases:
        path = tmp_path / f"{fields['method']}.pt"
        hidden = fields.pop("hidden")
        torch.save({"format": FILE_FORMAT, "num_prompt_tokens": 4, **fields,
                    "tensors": {"prompt_embeddings": torch.zeros(4, hidden)}}, path)
        code, _, err = run(capsys, "generate", "--model", str(smollm_dir), "--peers", peers, "--prompt", "hi",
                           "--prompt-weights", str(path))
        assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    layers = AutoConfig.from_pretrained(smollm_dir).num_hidden_layers
    path = tmp_path / "deep.pt"  # a whole deep_ptune file: generate uses it
    torch.manual_seed(0)
    torch.save({"format": FILE_FORMAT, "num_prompt_tokens": 4, "method": "deep_ptune", "config_hash": smollm_hash,
                "model": "smollm", "tensors": {"prompt_embeddings": torch.randn(4, 576) * 0.02,
                                               "intermediate_prompts": torch.randn(layers, 4, 576) * 0.02}}, path)
    code, _, err = run(capsys, "generate", "--model", str(smollm_dir), "--peers", peers, "--prompt", "hi",
                       "--max-new-tokens", "2", "--prompt-weights", str(path))
    assert code == 0, err
    path = tmp_path / "junk.pt"
    path.write_text("not a torch file")
    code, _, err = run(capsys, "generate", "--model", str(smollm_dir), "--peers", peers, "--prompt", "hi",
                       "--prompt-weights", str(path))
    assert code == 2 and "cannot read it" in err, err


def test_deep_ptune_trains_and_saves_both_prompts(tiny_model_dir, tiny_swarm, tmp_path):
    """client.finetune.train/save_prompts with deep prompts (tiny llama, in-process nodes: no tokenizer needed)."""
    from client import DistributedModelForCausalLM
    from client.finetune import Example, load_prompts, save_prompts, train

    folder = tiny_model_dir("llama")
    model = DistributedModelForCausalLM.from_pretrained(str(folder), peers=[n.address for n in tiny_swarm("llama")])
    try:
        torch.manual_seed(0)
        model.add_prompts("deep_ptune", 4)
        examples = [Example([5, 9, 17, 33, 65, 129], [-100, -100, 17, 33, 65, 129]), Example([7, 11, 13], [7, 11, 13])]
        result = train(model, examples, steps=3, lr=0.05, batch_size=2, pad_id=0)
        assert result.losses[-1] < result.losses[0] and result.bytes_sent > 0
        assert model.intermediate_prompts.abs().sum() > 0  # zeros at first: they learned
        save_prompts(model, str(tmp_path / "deep.pt"))
        saved = torch.load(tmp_path / "deep.pt", weights_only=True)
        assert saved["method"] == "deep_ptune" and saved["tensors"]["intermediate_prompts"].shape == (6, 4, 64)
        loaded = DistributedModelForCausalLM.from_pretrained(
            str(folder), peers=[n.address for n in tiny_swarm("llama")]
        )
        try:
            load_prompts(loaded, str(tmp_path / "deep.pt"))
            assert loaded.tuning == "deep_ptune"
            assert torch.equal(loaded.intermediate_prompts.detach(), model.intermediate_prompts.detach())
            ids = torch.tensor([[5, 9, 17]])
            assert loaded.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0).shape == (
                1,
                6,
            )
        finally:
            loaded.close()
    finally:
        model.close()
