"""The real SmolLM2-135M-Instruct through three node processes started with the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from client.textgen import encode_prompt, generate_text
from common.wire import codec
from tests.support.swarm_fixtures import node_info

CHAT_PROMPT = "What is the capital of France?"  # the demo's prompt
PROMPTS = [
    (CHAT_PROMPT, True),
    ("Write a haiku about sharing food with neighbours.", True),
    ("The three primary colours are", False),
    ("def fibonacci(n):", False),
]


pytestmark = pytest.mark.usefixtures("chain_cache_freed")  # after every test here the nodes' caches are free


def local_generate(reference, input_ids, **kwargs):
    return reference.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)[
        0, input_ids.shape[1] :
    ].tolist()


@pytest.mark.parametrize("prompt, chat", PROMPTS)
def test_greedy_tokens_identical_to_transformers(prompt, chat, remote, smollm_reference, tokenizer):
    input_ids = encode_prompt(tokenizer, prompt, chat)
    expected = local_generate(smollm_reference, input_ids, max_new_tokens=24, do_sample=False)
    result = generate_text(remote, tokenizer, prompt, chat=chat, max_new_tokens=24)
    assert result.token_ids == expected
    if prompt == CHAT_PROMPT:
        assert result.text.strip() == "The capital of France is Paris."


def test_route_is_three_nodes_of_ten_layers(remote, smollm_chain):
    route = remote.swarm.route()
    assert [(h.start, h.end) for h in route] == [(0, 10), (10, 20), (20, 30)]
    assert [h.peer.address for h in route] == [n.address for n in smollm_chain]


def test_eos_ends_generation_like_transformers(remote, smollm_reference, tokenizer):
    input_ids = encode_prompt(tokenizer, CHAT_PROMPT, True)
    expected = local_generate(smollm_reference, input_ids, max_new_tokens=40, do_sample=False)
    result = generate_text(remote, tokenizer, CHAT_PROMPT, chat=True, max_new_tokens=40)
    assert result.token_ids == expected
    assert result.token_ids[-1] == tokenizer.eos_token_id and len(result.token_ids) < 40


def test_max_new_tokens_is_respected(remote, tokenizer):
    result = generate_text(remote, tokenizer, "Once upon a time", max_new_tokens=5)
    assert len(result.token_ids) == 5


def test_stop_strings_are_respected(remote, tokenizer):
    full = generate_text(remote, tokenizer, CHAT_PROMPT, chat=True, max_new_tokens=20)
    stopped = generate_text(remote, tokenizer, CHAT_PROMPT, chat=True, max_new_tokens=20, stop=["France"])
    assert "France" in full.text and full.text.index("France") + len("France") < len(full.text.rstrip())
    assert stopped.text.endswith("France")
    assert stopped.token_ids == full.token_ids[: len(stopped.token_ids)]


def test_seeded_sampling_is_reproducible_and_matches_transformers(remote, smollm_reference, tokenizer):
    prompt = "Tell me a story about a dragon."
    kwargs = dict(chat=True, max_new_tokens=20, temperature=0.9, top_p=0.95)
    first = generate_text(remote, tokenizer, prompt, seed=1234, **kwargs)
    second = generate_text(remote, tokenizer, prompt, seed=1234, **kwargs)
    other = generate_text(remote, tokenizer, prompt, seed=99, **kwargs)
    assert first.token_ids == second.token_ids
    assert first.token_ids != other.token_ids
    torch.manual_seed(1234)
    input_ids = encode_prompt(tokenizer, prompt, True)
    expected = local_generate(smollm_reference, input_ids, max_new_tokens=20, do_sample=True, temperature=0.9,
                              top_p=0.95, top_k=0)
    assert first.token_ids == expected


def test_cli_generate_json(smollm_dir, smollm_chain, smollm_reference, tokenizer, capsys):
    """`potluck generate` in this process (the script's own `main`; test_cli checks the script itself)."""
    from node.cli.main import main

    peers = ",".join(n.address for n in smollm_chain)
    code = main(["generate", "--model", str(smollm_dir), "--peers", peers, "--prompt", CHAT_PROMPT, "--chat",
                 "--max-new-tokens", "16", "--json"])
    done = capsys.readouterr()
    assert code == 0, done.err
    out = json.loads(done.out.strip().splitlines()[-1])
    expected = local_generate(
        smollm_reference, encode_prompt(tokenizer, CHAT_PROMPT, True), max_new_tokens=16, do_sample=False
    )
    assert out["token_ids"] == expected
    assert out["text"].strip() == "The capital of France is Paris."


def test_cli_generate_streams_text(smollm_dir, smollm_chain, capsys):
    from node.cli.main import main

    peers = ",".join(n.address for n in smollm_chain)
    code = main(["generate", "--model", str(smollm_dir), "--peers", peers, "--prompt", CHAT_PROMPT, "--chat",
                 "--max-new-tokens", "16"])
    done = capsys.readouterr()
    assert code == 0, done.err
    assert done.out.strip() == "The capital of France is Paris."
    assert "tokens/s" in done.err


def test_nodes_hold_the_gguf_blocks_as_they_are(remote, smollm_chain):
    """SmolLM2's matrices came from Q4_1 blocks and its head from Q8_0 ones: the nodes hold those blocks (bit for
    bit the float32 values) and the client's head its 8-bit copy, so the token checks above run through them."""
    for node in smollm_chain:
        assert codec.unpack_metadata(node_info(node.address).metadata)["exact"] == {"q4": 40}
    assert remote.head_calls.fn.exact_weight().format == "q8"
