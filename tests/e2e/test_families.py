"""Every supported family, through three real gRPC nodes, against plain transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import DistributedModelForCausalLM
from tests.support.families import FAMILIES

PREFILL, DECODE = 12, 20


@pytest.fixture(scope="module")
def family_pair(tiny_model_dir, tiny_swarm):
    """family -> (local transformers model, distributed model over 3 nodes)."""
    made = {}

    def get(family):
        if family not in made:
            folder = tiny_model_dir(family)
            local = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            remote = DistributedModelForCausalLM.from_pretrained(
                str(folder), peers=[n.address for n in tiny_swarm(family)]
            )
            made[family] = (local, remote)
        return made[family]

    yield get
    for _, remote in made.values():
        remote.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_match_transformers(family, family_pair):
    local, remote = family_pair(family)
    assert [h.end - h.start for h in remote.swarm.route()] == [2, 2, 2]
    torch.manual_seed(1)
    ids = torch.randint(3, local.config.vocab_size, (1, PREFILL + DECODE))
    with torch.no_grad():
        expected = local(ids, output_hidden_states=True).hidden_states[-1]  # after the final norm
    with remote.inference_session(max_length=PREFILL + DECODE) as session, torch.no_grad():
        outputs = [session.step(remote.embed_tokens(ids[:, :PREFILL]))]
        for t in range(PREFILL, PREFILL + DECODE):
            outputs.append(session.step(remote.embed_tokens(ids[:, t : t + 1])))
        assert session.position == PREFILL + DECODE
    got = remote.norm(torch.cat(outputs, dim=1))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_transformers(family, family_pair):
    local, remote = family_pair(family)
    torch.manual_seed(2)
    ids = torch.randint(3, local.config.vocab_size, (2, 7))
    kwargs = dict(max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(ids), eos_token_id=None)
    expected = local.generate(ids, **kwargs)
    got = remote.generate(ids, **kwargs)
    assert got.tolist() == expected.tolist()


def test_left_padded_batch_matches_transformers(family_pair):
    local, remote = family_pair("llama")
    torch.manual_seed(3)
    ids = torch.randint(3, 512, (3, 9))
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0
    ids[2, :1], mask[2, :1] = 0, 0
    kwargs = dict(max_new_tokens=12, do_sample=False, attention_mask=mask, eos_token_id=None, pad_token_id=0)
    assert remote.generate(ids, **kwargs).tolist() == local.generate(ids, **kwargs).tolist()


def test_stateless_forward_matches_transformers(family_pair):
    local, remote = family_pair("qwen2")
    ids = torch.randint(3, 512, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(remote(ids).logits, local(ids).logits, rtol=1e-5, atol=1e-5)
