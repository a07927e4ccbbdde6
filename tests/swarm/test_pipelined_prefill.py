"""Pipelined prefill: a long prompt goes down the chain in chunks (node i+1 computes chunk c while node i
computes chunk c+1). In-process nodes of a tiny LLaMA; every result compared with plain transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import ClientConfig, DistributedModelForCausalLM

CHUNK = 8
PROMPT = 40  # 5 chunks


@pytest.fixture(scope="module")
def folder(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def reference(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def chain(bg_loop, folder):
    nodes = [bg_loop.start_node(folder, a, b, metrics_port=0, throughput=50.0) for a, b in ((0, 2), (2, 4), (4, 6))]
    yield nodes
    for node in nodes:
        if node in bg_loop.running:
            bg_loop.stop_node(node)


def prefill_steps(node) -> float:
    return node.metrics.registry.get_sample_value("potluck_steps_total", {"kind": "prefill"}) or 0.0


def prompt(reference, batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, reference.config.vocab_size, (batch, PROMPT), generator=generator)


def test_chunks_are_pushed_down_the_chain_and_the_answer_is_exact(folder, reference, chain):
    model = DistributedModelForCausalLM.from_pretrained(
        str(folder), config=ClientConfig(peers=tuple(n.address for n in chain), prefill_chunk=CHUNK))
    try:
        ids = prompt(reference)
        before = [prefill_steps(n) for n in chain]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        assert torch.equal(out, expected)
        chunks = PROMPT // CHUNK
        assert [prefill_steps(n) - b for n, b in zip(chain, before)] == [chunks] * 3  # every node ran 5 chunks
        assert model.last_session.pushed_steps == chunks + 3 and not model.last_session.events
    finally:
        model.close()


def test_left_padded_batch(folder, reference, chain):
    model = DistributedModelForCausalLM.from_pretrained(
        str(folder), config=ClientConfig(peers=tuple(n.address for n in chain), prefill_chunk=CHUNK))
    try:
        ids = prompt(reference, batch=2, seed=1)
        mask = torch.ones_like(ids)
        mask[1, :13] = 0  # the second row is a shorter, left-padded prompt
        ids[1, :13] = reference.config.pad_token_id or 0
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        expected = reference.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        assert torch.equal(out, expected)
    finally:
        model.close()


def test_a_chunk_not_handed_on_is_finished_by_the_client(folder, reference, chain):
    pusher = chain[0].servicer.pusher
    original = pusher.forward
    calls = []

    async def flaky(hidden, step, convoy=None, started=None):  # the third chunk cannot reach the next node
        calls.append(step.step_id)
        if len(calls) == 3:
            return "push to the next node failed [UNAVAILABLE]: injected by the test"
        return await original(hidden, step, convoy, started)

    pusher.forward = flaky
    model = DistributedModelForCausalLM.from_pretrained(
        str(folder), config=ClientConfig(peers=tuple(n.address for n in chain), prefill_chunk=CHUNK))
    try:
        ids = prompt(reference, seed=2)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        assert torch.equal(out, expected)
        assert len(calls) >= 3 and not model.last_session.events  # recovered without a failover
        assert model.last_session.pushed_steps < PROMPT // CHUNK + 2  # the prefill was finished by hand
    finally:
        pusher.forward = original
        model.close()


def test_middle_node_gone_before_a_pipelined_step(bg_loop, folder, reference, chain):
    spare = bg_loop.start_node(folder, 2, 4, throughput=5.0)  # slower: routes prefer chain[1] until it is gone
    model = DistributedModelForCausalLM.from_pretrained(
        str(folder), config=ClientConfig(peers=tuple(n.address for n in chain) + (spare.address,),
                                         prefill_chunk=CHUNK, missing_wait=10.0))
    try:
        ids = prompt(reference, seed=3)
        embeds = model.embed_tokens(ids).detach()
        with model.inference_session(max_length=64) as session:
            first = session.step(embeds[:, :1])
            assert [h.peer.address for h in session.route][1] == chain[1].address
            bg_loop.stop_node(chain[1])
            rest = session.step(embeds[:, 1:])
            hidden = torch.cat([first, rest], dim=1)
            assert len(session.events) == 1 and session.events[0].address == chain[1].address
        logits = model.lm_head(model.norm(hidden))
        expected = reference(ids).logits
        assert torch.allclose(logits, expected, atol=1e-4, rtol=1e-4)
    finally:
        model.close()
        bg_loop.stop_node(spare)
