"""Nodes die (SIGKILL) or drain (SIGTERM) mid-generation; the answer comes out the same."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from client import ClientConfig, DistributedModelForCausalLM, MissingLayersError
from node.launcher import NodeProcess
from tests.support.swarm_fixtures import node_info, wait_for_full_cache

NEW_TOKENS = 64
FAST = ("--heartbeat", "1", "--ttl", "4", "--threads", "2", "--no-mdns")


@pytest.fixture(scope="module")
def prompt_ids(smollm_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    return tokenizer("The history of the Roman Empire begins", return_tensors="pt")["input_ids"]


@pytest.fixture(scope="module")
def expected(smollm_reference, prompt_ids):
    """Greedy tokens of plain transformers, never stopping early."""
    out = smollm_reference.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                                    max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    return out[0].tolist()


@pytest.fixture()
def nodes(smollm_dir, tmp_path):
    """Start SmolLM2 node processes (in parallel); all are stopped after the test."""
    started: list[NodeProcess] = []

    def start(*spans, extra=()) -> list[NodeProcess]:
        batch = []
        for start_layer, end_layer in spans:
            identity = ("--identity", str(tmp_path / f"node-{len(started)}.pem"))
            node = NodeProcess(smollm_dir, start_layer, end_layer, extra_args=(*FAST, *identity, *extra)).start()
            started.append(node)
            batch.append(node)
        for node in batch:
            node.wait_ready(180)
        return batch

    yield start
    alive = [node for node in started if node.address and node.process.poll() is None]
    try:
        for node in alive:  # the cache accounting of every survivor is back to its full budget
            wait_for_full_cache(node.address)
    finally:
        for node in started:
            node.kill()


class AtToken(BaseStreamer):
    """Calls `action(n)` after the n-th new token, for each n in `when` (between two decode steps)."""

    def __init__(self, when, action):
        self.when, self.action, self.count, self.prompt_seen = set(when), action, 0, False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.count += 1
        if self.count in self.when:
            self.action(self.count)

    def end(self):
        pass


def node_on(model, start: int, processes) -> NodeProcess:
    """The process serving the hop that starts at layer `start` in the session's current route."""
    [hop] = [h for h in model.last_session.route if h.start == start]
    [process] = [p for p in processes if p.address == hop.peer.address]
    return process


def run(model, prompt_ids, streamer=None):
    out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                         max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, streamer=streamer)
    return out[0].tolist()


def client(smollm_dir, processes, **overrides) -> DistributedModelForCausalLM:
    config = ClientConfig(peers=tuple(p.address for p in processes), **overrides)
    return DistributedModelForCausalLM.from_pretrained(str(smollm_dir), config=config)


def test_sigkill_of_the_middle_node_with_a_replacement(smollm_dir, nodes, prompt_ids, expected):
    chain = nodes((0, 10), (10, 20), (20, 30), (10, 20))
    model = client(smollm_dir, chain)
    killed = []
    try:
        def kill(_):
            victim = node_on(model, 10, chain)
            victim.kill()
            killed.append(victim)

        assert run(model, prompt_ids, AtToken({20}, kill)) == expected
        [event] = model.last_session.events
        assert event.address == killed[0].address and (event.start, event.end) == (10, 20)
        [(address, start, end)] = event.replacement
        assert (start, end) == (10, 20) and address != killed[0].address
        assert event.detect_s + event.reroute_s + event.replay_s < 2.0
    finally:
        model.close()


def test_sigkill_during_prompt_lookup_replays_only_the_tokens_kept(smollm_dir, nodes, prompt_ids, expected):
    """Speculative decoding rewinds the session after each rejected draft; the replacement node gets the
    history as cut by those rewinds, and the answer is still plain transformers' greedy one."""
    chain = nodes((0, 10), (10, 20), (20, 30), (10, 20))
    model = client(smollm_dir, chain)
    try:
        def kill(_):
            node_on(model, 10, chain).kill()

        out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, prompt_lookup_num_tokens=6,
                             streamer=AtToken({12}, kill))
        assert out[0].tolist() == expected
        session = model.last_session
        [event] = session.events
        assert (event.start, event.end) == (10, 20)
        assert session.steps < NEW_TOKENS  # drafts were accepted: fewer passes than tokens
        assert len(model.last_draft.lengths) > 0 and session.position == prompt_ids.shape[1] + NEW_TOKENS - 1
    finally:
        model.close()


def test_replacement_made_of_two_half_spans(smollm_dir, nodes, prompt_ids, expected):
    chain = nodes((0, 10), (10, 20), (20, 30), (10, 15), (15, 20))
    model = client(smollm_dir, chain)
    try:
        assert [(h.start, h.end) for h in model.swarm.route()] == [(0, 10), (10, 20), (20, 30)]
        assert run(model, prompt_ids, AtToken({30}, lambda _: node_on(model, 10, chain).kill())) == expected
        [event] = model.last_session.events
        assert [(s, e) for _, s, e in event.replacement] == [(10, 15), (15, 20)]
        assert event.replayed_tokens == prompt_ids.shape[1] + 29
    finally:
        model.close()


def test_no_replacement_raises_missing_layers_in_time(smollm_dir, nodes, prompt_ids):
    chain = nodes((0, 10), (10, 20), (20, 30))
    model = client(smollm_dir, chain, missing_wait=2.0)
    killed_at = []
    try:
        def kill(_):
            node_on(model, 10, chain).kill()
            killed_at.append(time.monotonic())

        with pytest.raises(MissingLayersError) as caught:
            run(model, prompt_ids, AtToken({5}, kill))
        waited = time.monotonic() - killed_at[0]
        assert caught.value.missing == [(10, 20)]
        assert "no peer serves layers 10:20" in str(caught.value)
        assert 2.0 <= waited < 6.0
    finally:
        model.close()


def test_graceful_drain_during_generation(smollm_dir, nodes, prompt_ids, expected):
    chain = nodes((0, 10), (10, 20), (20, 30), (10, 20))
    model = client(smollm_dir, chain)
    drained = []
    try:
        def drain(_):
            node = node_on(model, 10, chain)
            node.process.send_signal(signal.SIGTERM)
            drained.append(node)

        assert run(model, prompt_ids, AtToken({16}, drain)) == expected
        assert drained[0].process.wait(30) == 0
        [event] = model.last_session.events
        assert event.address == drained[0].address
        assert "draining" in event.reason and event.detect_s < 1.0  # told at once, not found out by a deadline
    finally:
        model.close()


def test_chaos_ten_kills_in_one_long_generation(smollm_dir, nodes, prompt_ids, smollm_reference):
    first = nodes((0, 10))[0]
    boot = ("--bootstrap", first.address)
    processes = [first] + nodes((10, 20), (20, 30), (0, 10), (10, 20), (20, 30), extra=boot)
    config = ClientConfig(bootstrap=tuple(p.address for p in processes), mdns=False, missing_wait=90.0)
    model = DistributedModelForCausalLM.from_pretrained(str(smollm_dir), config=config)
    rng = random.Random(1234)
    new_tokens = 120
    kill_steps = sorted(rng.sample(range(4, new_tokens - 4, 11), 10))  # 10 distinct steps, >= 11 tokens apart
    expected = smollm_reference.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                                         max_new_tokens=new_tokens, min_new_tokens=new_tokens)[0].tolist()
    spare = []
    try:
        def chaos(_):
            hop = rng.choice(model.last_session.route)
            [victim] = [p for p in processes if p.address == hop.peer.address]
            victim.kill()
            alive = ",".join(p.address for p in processes if p.address and p.process.poll() is None)
            span = (victim.start_layer, victim.end_layer)  # its replacement joins through the live nodes
            spare.append(NodeProcess(smollm_dir, *span, extra_args=(*FAST, "--bootstrap", alive)).start())

        out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             streamer=AtToken(kill_steps, lambda n: (chaos(n), processes.extend(spare), spare.clear())))
        assert out[0].tolist() == expected
        assert len(model.last_session.events) >= 10
    finally:
        model.close()
        for node in processes + spare:
            node.kill()


def test_killed_client_frees_the_nodes_caches(smollm_dir, nodes):
    chain = nodes((0, 10), (10, 20), (20, 30))
    peers = ",".join(n.address for n in chain)

    def free_tokens():
        return [node_info(node.address).free_cache_tokens for node in chain]

    budget = free_tokens()
    client_process = subprocess.Popen(
        [sys.executable, "-m", "node", "generate", "--model", str(smollm_dir), "--peers", peers, "--no-mdns",
         "--prompt", "Tell me a very long story", "--max-new-tokens", "2000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while free_tokens() == budget:  # wait until its session holds cache on the nodes
            assert time.monotonic() < deadline and client_process.poll() is None
            time.sleep(0.1)
    finally:
        client_process.kill()
        client_process.wait()
    deadline = time.monotonic() + 10
    while free_tokens() != budget:
        assert time.monotonic() < deadline, f"cache not freed: {free_tokens()} != {budget}"
        time.sleep(0.1)
