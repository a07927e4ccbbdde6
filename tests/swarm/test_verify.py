"""Verification of peers' outputs: a deliberately faulty node is caught, banned and reported; answers stay
exactly those of plain transformers; honest swarms are never flagged. Tiny models, in-process nodes."""

from __future__ import annotations

import logging
import random
import time

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from client import ClientConfig, DistributedModelForCausalLM
from client.model import _RestartGuard
from client.routing import PeerInfo, plan_route
from client.session import InferenceSession
from client.verify import (
    COMPUTE_TOLERANCE,
    WIRE_TOLERANCE,
    VerificationError,
    Verifier,
    first_disagreement,
    relative_errors,
    tolerance,
)
from common.swarm.records import SignedRecord, node_id_of
from common.swarm.strikes import STRIKE_TTL, StrikeBook, StrikeError, make_strike, sign_strike, verify_strike
from tests.support.faulty_node import make_liar

NEW_TOKENS = 24
HONEST = 1.0     # tokens/s the honest nodes publish: slow enough that the route prefers the liar...
LIAR = 1e5       # ...which claims to be very fast (liars attract traffic)


@pytest.fixture(scope="module")
def folder(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def honest(bg_loop, folder):
    """A [0:3), B [3:6), C [0:6): every hop has a second node to check it, and a third to referee."""
    nodes = [bg_loop.start_node(folder, a, b, throughput=HONEST) for a, b in [(0, 3), (3, 6), (0, 6)]]
    yield nodes
    for node in nodes:
        bg_loop.stop_node(node)


@pytest.fixture()
def liar(bg_loop, folder):
    """A fresh lying node for layers [0:3) (a new identity each time: strikes from other tests do not apply)."""
    started = []

    def start(honest_steps: int = 0, scale: float = 0.5, start: int = 0, end: int = 3, throughput: float = LIAR):
        node = bg_loop.start_node(folder, start, end, throughput=throughput)
        started.append(node)
        return node, make_liar(node, honest_steps, scale)

    yield start
    for node in started:
        bg_loop.stop_node(node)


@pytest.fixture(scope="module")
def prompt():
    return torch.tensor([[1, 17, 230, 45, 99, 7, 311, 64, 12, 400, 5, 88]])


@pytest.fixture(scope="module")
def reference(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def expected(reference, prompt):
    """Greedy tokens of plain transformers on the same weights."""
    out = reference.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
    return out[0].tolist()


@pytest.fixture(scope="module")
def padded(prompt):
    """A left-padded batch of two prompts: (input_ids, attention_mask)."""
    short = prompt[:, 5:].flip(1)
    ids = torch.cat([prompt, torch.cat([torch.zeros(1, 5, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    return ids, mask


def client(folder, nodes, **overrides) -> DistributedModelForCausalLM:
    config = ClientConfig(peers=tuple(n.address for n in nodes), **overrides)
    return DistributedModelForCausalLM.from_pretrained(str(folder), config=config)


def generate(model, prompt, **kwargs) -> list[int]:
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                         max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0, **kwargs)
    return out[0].tolist()


# -- a faulty node in a real swarm ------------------------------------------------------------------------
def test_without_verification_the_liar_changes_the_answer(folder, honest, liar, prompt, expected):
    node, lying = liar()
    model = client(folder, [*honest, node])
    try:
        assert generate(model, prompt) != expected  # the faulty node matters...
        assert lying.lies > 0 and model.last_session.verification is None  # ...and nothing checks it
        assert not model.swarm.liars
    finally:
        model.close()


@pytest.mark.parametrize("push,span,scale", [(True, (0, 3), 0.5), (False, (0, 3), 0.5), (True, (3, 6), 0.5),
                                             (True, (0, 3), 0.01)])
def test_full_mode_catches_the_liar_at_its_first_lie_and_the_answer_is_exact(
        folder, honest, liar, prompt, expected, caplog, push, span, scale):
    node, lying = liar(honest_steps=5, scale=scale, start=span[0], end=span[1])
    model = client(folder, [*honest, node], verify="full", push=push)
    try:
        with caplog.at_level(logging.ERROR, logger="client.swarm"):
            assert generate(model, prompt) == expected
        assert lying.lies == 1  # caught at once: its first wrong output was never used
        stats = model.last_session.verification
        assert stats.caught == [node.address]
        assert node.address in model.swarm.liars
        assert node.address not in {hop.peer.address for hop in model.last_session.route}
        assert any("returned wrong activations" in r.getMessage() and node.address in r.getMessage()
                   for r in caplog.records)
        # the strike reached the honest nodes, signed, about the liar's identity
        liar_id = node.identity.node_id
        assert all(n.membership.strikes.counts().get(liar_id) == 1 for n in honest)
    finally:
        model.close()


def test_a_lying_shadow_is_convicted_and_the_honest_hop_is_not(bg_loop, folder, honest, liar, prompt, expected):
    fast = bg_loop.start_node(folder, 0, 3, throughput=LIAR)  # honest: the route takes it
    # the next cheapest for [0:3), so the hop's shadow: 100 ms of compute a token keeps it behind `fast`
    # whatever the measured round-trip times (ms, even on a loaded machine), far ahead of the honest (1 s)
    node, lying = liar(throughput=LIAR / 10000)
    model = client(folder, [*honest, fast, node], verify="full")
    try:
        assert generate(model, prompt) == expected
        assert lying.lies >= 1
        session = model.last_session
        assert session.verification.caught == [node.address]
        assert model.swarm.liars == {node.address, node.identity.node_id}
        assert fast.address in {hop.peer.address for hop in session.route} and not session.events
    finally:
        model.close()
        bg_loop.stop_node(fast)


def test_spot_mode_catches_the_liar_within_the_bound_and_restarts_exactly(folder, honest, liar, prompt, expected):
    fraction = 0.25
    bound = round(2 / fraction) - 1  # the longest gap between two checks
    node, lying = liar(honest_steps=3)
    model = client(folder, [*honest, node], verify="spot", verify_fraction=fraction)
    try:
        assert generate(model, prompt) == expected
        assert 1 <= lying.lies <= bound
        assert model.swarm.liars >= {node.address, node.identity.node_id}
        assert model.last_session.verification.compared_tokens > 0
    finally:
        model.close()


class Collect(BaseStreamer):
    def __init__(self):
        self.values, self.ended = [], 0

    def put(self, value):
        self.values.extend(value.reshape(-1).tolist())

    def end(self):
        self.ended += 1


def test_spot_mode_restarts_when_a_used_output_was_wrong_and_streams_each_token_once(
        folder, honest, liar, prompt, expected, caplog, monkeypatch):
    monkeypatch.setattr(Verifier, "_gap", lambda self: 4)  # checks after steps 4, 8, ...
    node, lying = liar(honest_steps=1, scale=0.01)  # wrong from step 2 on, too little to change a token
    model = client(folder, [*honest, node], verify="spot")
    streamer = Collect()
    try:
        with caplog.at_level(logging.WARNING, logger="client.model"):
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, streamer=streamer,
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
        assert out[0].tolist() == expected
        assert lying.lies == 3  # steps 2, 3 and 4; caught at the check after step 4, whose output was not used
        assert any("generating again" in r.getMessage() for r in caplog.records)
        assert streamer.values == expected and streamer.ended == 1  # the prompt and each token once
    finally:
        model.close()


class AtToken(BaseStreamer):
    """Calls `action` once the `when`-th new token has been produced."""

    def __init__(self, when, action):
        self.when, self.action, self.count = when, action, -1  # the prompt comes first

    def put(self, value):
        self.count += 1
        if self.count == self.when:
            self.action()

    def end(self):
        pass


def test_verification_survives_a_failover(bg_loop, folder, honest, prompt, expected):
    fast = bg_loop.start_node(folder, 0, 3, throughput=LIAR)  # an honest node the route prefers, stopped midway
    model = client(folder, [*honest, fast], verify="full")
    try:
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             streamer=AtToken(5, lambda: bg_loop.stop_node(fast)),
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
        assert out[0].tolist() == expected
        session = model.last_session
        assert [event.address for event in session.events] == [fast.address]
        assert session.verification.caught == [] and not model.swarm.liars
        assert session.verification.compared_tokens >= len(session.route) * (prompt.shape[1] + NEW_TOKENS - 1)
    finally:
        model.close()
        if fast in bg_loop.running:
            bg_loop.stop_node(fast)


def test_the_restart_guard_holds_back_repeats_and_refuses_to_take_back_tokens():
    inner = Collect()
    guard = _RestartGuard(inner)
    for value in ([1, 2], [3], [4]):
        guard.put(torch.tensor(value))
    guard.end()
    assert inner.values == [1, 2, 3, 4] and inner.ended == 0  # end waits for the verified answer
    guard.rewind()
    for value in ([1, 2], [3], [4], [5]):
        guard.put(torch.tensor(value))
    guard.finish()
    assert inner.values == [1, 2, 3, 4, 5] and inner.ended == 1
    guard.rewind()
    guard.put(torch.tensor([1, 2]))
    with pytest.raises(VerificationError, match="already streamed"):
        guard.put(torch.tensor([6]))


def test_the_restart_guard_compares_tokens_not_how_they_were_grouped():
    """With speculative decoding an attempt may bring the same tokens in other groups (a pass per draft)."""
    inner = Collect()
    guard = _RestartGuard(inner)
    for value in ([[1, 2, 3]], [4], [5, 6]):
        guard.put(torch.tensor(value))
    guard.rewind()
    for value in ([[1, 2, 3]], [4, 5], [6, 7, 8]):
        guard.put(torch.tensor(value))
    assert inner.values == [1, 2, 3, 4, 5, 6, 7, 8]
    guard.rewind()
    guard.put(torch.tensor([[1, 2, 3]]))
    with pytest.raises(VerificationError, match="already streamed"):
        guard.put(torch.tensor([4, 9]))


def test_a_strike_steers_other_clients_away_and_passes_on_by_gossip(bg_loop, folder, honest, liar, prompt, expected):
    node, _ = liar()
    others = list(honest)
    before = client(folder, [*others, node])
    try:
        assert node.address in {hop.peer.address for hop in before.swarm.route(refresh=True)}  # it attracts traffic
    finally:
        before.close()
    catcher = client(folder, [*others, node], verify="full")
    try:
        assert generate(catcher, prompt) == expected
    finally:
        catcher.close()
    fresh = client(folder, [*others, node])  # has caught nobody, but pulls the strikes from the nodes
    try:
        route = fresh.swarm.route(refresh=True)
        assert not fresh.swarm.liars
        assert fresh.swarm.strikes.counts().get(node.identity.node_id) == 1
        assert node.address not in {hop.peer.address for hop in route}
        assert generate(fresh, prompt) == expected
    finally:
        fresh.close()
    # a node that never heard from the client gets the strike by gossip
    newcomer = bg_loop.start_node(folder, 0, 6, throughput=HONEST)
    try:
        assert not newcomer.membership.strikes.counts()
        assert bg_loop.run(newcomer.membership.exchange(honest[0].address))
        assert newcomer.membership.strikes.counts().get(node.identity.node_id) == 1
    finally:
        bg_loop.stop_node(newcomer)


@pytest.mark.parametrize("mode,wire", [("full", "float32"), ("spot", "float32"), ("full", "bfloat16")])
def test_an_honest_swarm_is_never_flagged(folder, honest, reference, padded, mode, wire):
    ids, mask = padded
    settings = dict(attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                    pad_token_id=0)
    model = client(folder, honest, verify=mode, wire_dtype=wire, push=True)
    try:
        out = model.generate(ids, **settings)
        if wire == "float32":
            assert out.tolist() == reference.generate(ids, **settings).tolist()
        stats = model.last_session.verification
        assert stats.caught == [] and not model.swarm.liars
        hops = len(model.last_session.route)
        assert stats.compared_tokens == hops * (ids.shape[1] + NEW_TOKENS - 1)  # every step, spot mode too
        assert stats.max_error < tolerance(wire) / 4, stats.max_error  # honest differences are far inside
    finally:
        model.close()


def test_layers_nobody_else_serves_are_counted_and_logged_as_unverified(folder, honest, prompt, expected, caplog):
    model = client(folder, honest[:2], verify="full")  # A [0:3) and B [3:6) only: no second node anywhere
    try:
        with caplog.at_level(logging.WARNING, logger="client.verify"):
            assert generate(model, prompt) == expected
        stats = model.last_session.verification
        assert stats.compared_tokens == 0 and stats.unverified_tokens == 2 * (prompt.shape[1] + NEW_TOKENS - 1)
        warnings = [r.getMessage() for r in caplog.records if "not verified" in r.getMessage()]
        assert len(warnings) == 2  # once per hop and session, not once per step
    finally:
        model.close()


def test_verify_off_has_no_verifier_and_keeps_outputs_nowhere(folder, honest, prompt, expected):
    model = client(folder, honest)
    try:
        assert generate(model, prompt) == expected
        session = model.last_session
        assert session.verification is None
        assert all(stream.outputs is None for stream in session._session.hops)
    finally:
        model.close()


# -- pure parts --------------------------------------------------------------------------------------------
def test_relative_errors_and_the_first_disagreement():
    torch.manual_seed(0)
    ours = torch.randn(2, 5, 16)
    theirs = ours.clone()
    theirs[1, 3] *= 1.1  # 10% off
    theirs[0, 4] = float("nan")
    errors = relative_errors(ours, theirs)
    assert errors[0, :4].max() == 0 and errors[0, 4] == float("inf")
    assert errors[1, 3] == pytest.approx(0.1 / 1.05, rel=1e-4)
    assert first_disagreement(errors, 0.05) == 3
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 4] = mask[1, 3] = 0  # padding does not count
    assert first_disagreement(relative_errors(ours, theirs, mask), 0.05) is None
    assert relative_errors(ours, theirs[:, :4]).isinf().all()
    assert tolerance("float32") == WIRE_TOLERANCE["float32"] < tolerance("bfloat16") == WIRE_TOLERANCE["bfloat16"]
    assert tolerance("bfloat16", "float32", "bfloat16") == COMPUTE_TOLERANCE["bfloat16"] > WIRE_TOLERANCE["bfloat16"]
    assert tolerance("int8", "float16") == WIRE_TOLERANCE["int8"]
    assert tolerance("int8", "float32", hops=2) == 2 * WIRE_TOLERANCE["int8"]  # one more rounding per boundary
    assert tolerance("", "unknown") == WIRE_TOLERANCE["float32"]


def test_spot_checks_are_never_further_apart_than_the_bound():
    for fraction in (0.1, 0.25, 0.5, 1.0):
        verifier = Verifier(referees=None, mode="spot", fraction=fraction, rng=random.Random(3))
        gaps = [verifier._gap() for _ in range(2000)]
        assert max(gaps) <= round(2 / fraction) - 1 and min(gaps) >= 1
        assert sum(gaps) / len(gaps) == pytest.approx(1 / fraction, rel=0.1)


def test_routing_avoids_struck_nodes_unless_nothing_else_serves_the_layers():
    fast = PeerInfo(address="fast", start=0, end=6, throughput=1000.0, node_id="f" * 40)
    slow = PeerInfo(address="slow", start=0, end=6, throughput=10.0, node_id="s" * 40)
    assert [h.peer.address for h in plan_route([fast, slow], 6)] == ["fast"]
    assert [h.peer.address for h in plan_route([fast, slow], 6, strikes={fast.node_id: 1})] == ["slow"]
    assert [h.peer.address for h in plan_route([fast], 6, strikes={fast.node_id: 3})] == ["fast"]
    assert [h.peer.address for h in plan_route([fast, slow], 6, strikes={fast.node_id: 2, slow.node_id: 1})] == ["slow"]


def test_strikes_are_signed_expire_and_count_once_per_reporter():
    reporter, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    now = time.time()
    strike = make_strike("a" * 40, "10.0.0.1:5000", "h" * 16, 0, 3, "relative error 0.05", now=now)
    signed = sign_strike(strike, reporter)
    accusation = verify_strike(signed, now)
    assert accusation.strike == strike and accusation.reporter == node_id_of(reporter.public_key().public_bytes_raw())
    forged = SignedRecord(signed.payload, other.public_key().public_bytes_raw(), signed.signature)
    tampered = SignedRecord(signed.payload.replace(b"10.0.0.1", b"10.0.0.2"), signed.public_key, signed.signature)
    with pytest.raises(StrikeError, match="forged"):
        verify_strike(forged, now)
    with pytest.raises(StrikeError, match="forged"):
        verify_strike(tampered, now)
    with pytest.raises(StrikeError, match="expired"):
        verify_strike(signed, now + STRIKE_TTL + 1)
    own_id = node_id_of(reporter.public_key().public_bytes_raw())
    with pytest.raises(StrikeError, match="itself"):
        verify_strike(sign_strike(make_strike(own_id, "x:1", "h", 0, 1, "", now=now), reporter), now)
    book = StrikeBook(limit=3)
    assert book.offer(signed, now) and not book.offer(signed, now)  # the same report twice counts once
    again = sign_strike(make_strike("a" * 40, "10.0.0.1:5000", "h" * 16, 0, 3, "later", now=now + 1), reporter)
    assert book.offer(again, now + 1)  # a newer report from the same reporter replaces the older one
    assert book.counts(now + 1) == {"a" * 40: 1}
    assert book.offer(sign_strike(strike, other), now)
    assert book.counts(now + 1) == {"a" * 40: 2} and book.counts(now + 1, config_hash="other") == {}
    accepted, problems = book.offer_many([forged, tampered], now)
    assert accepted == 0 and len(problems) == 2
    for _ in range(5):  # a flood of reporters keeps at most `limit` strikes, the newest
        flood = make_strike("b" * 40, "y:1", "h" * 16, 0, 3, "", now=now + 2)
        book.offer(sign_strike(flood, Ed25519PrivateKey.generate()), now + 2)
    assert len(book.entries) == 3 and book.counts(now + 2) == {"b" * 40: 3}
    assert book.counts(now + STRIKE_TTL + 10) == {}


def test_cli_flags_reach_the_client_config():
    from node.cli.generate import client_config
    from node.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(
        ["generate", "--model", "m", "--prompt", "p", "--verify", "spot", "--verify-fraction", "0.5"]
    )
    config = client_config(args, ["127.0.0.1:1"])
    assert (config.verify, config.verify_fraction) == ("spot", 0.5)
    assert parser.parse_args(["generate", "--model", "m", "--prompt", "p"]).verify == "off"
    assert parser.parse_args(["api", "--model", "m", "--verify", "full"]).verify == "full"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--model", "m", "--prompt", "p", "--verify", "sometimes"])
    with pytest.raises(ValueError, match="verify_fraction"):
        ClientConfig(peers=("127.0.0.1:1",), verify="spot", verify_fraction=0.0)
    with pytest.raises(ValueError, match="verify"):
        ClientConfig(peers=("127.0.0.1:1",), verify="always")


# -- speculative decoding under verification ----------------------------------------------------------------
LOOKUP = 4


class CountRewinds:
    def __init__(self, monkeypatch):
        self.count = 0
        original = InferenceSession.rewind

        def rewind(session, position):
            self.count += position < session.position
            return original(session, position)

        monkeypatch.setattr(InferenceSession, "rewind", rewind)


@pytest.mark.parametrize("mode", ["full", "spot"])
def test_prompt_lookup_in_an_honest_verified_swarm_is_exact_and_never_flagged(folder, honest, prompt, expected, mode,
                                                                              monkeypatch):
    """Drafts are checked in one pass and rejected ones taken back (rewinds) while every hop is verified, also
    where a check covers a step cut short by a rewind (spot mode)."""
    rewinds = CountRewinds(monkeypatch)
    model = client(folder, honest, verify=mode)
    try:
        assert generate(model, prompt, prompt_lookup_num_tokens=LOOKUP) == expected
        session, stats = model.last_session, model.last_session.verification
        assert session.steps < NEW_TOKENS, "no draft was ever accepted"
        assert rewinds.count > 0, "no draft was ever rejected"
        assert (
            not stats.caught and stats.compared_tokens >= len(expected) - 1
        )  # every token that went in (not the last)
    finally:
        model.close()


def test_prompt_lookup_under_full_verification_catches_a_liar_at_its_first_lie(folder, honest, liar, prompt,
                                                                               expected):
    node, lying = liar(honest_steps=3)
    model = client(folder, [*honest, node], verify="full")
    try:
        assert generate(model, prompt, prompt_lookup_num_tokens=LOOKUP) == expected
        assert lying.lies == 1 and model.last_session.verification.caught == [node.address]
    finally:
        model.close()


def test_spot_checks_follow_rewinds_and_a_restart_streams_each_token_once(folder, honest, liar, prompt, expected,
                                                                          monkeypatch):
    monkeypatch.setattr(Verifier, "_gap", lambda self: 3)
    node, lying = liar(honest_steps=1, scale=0.01)  # wrong from its second step on, too little to change a token
    model = client(folder, [*honest, node], verify="spot")
    streamer = Collect()
    try:
        out = generate(model, prompt, prompt_lookup_num_tokens=LOOKUP, streamer=streamer)
        assert out == expected and streamer.values == expected and streamer.ended == 1
        assert lying.lies >= 1 and node.address in model.swarm.liars
    finally:
        model.close()



def test_a_rewind_past_checked_steps_leaves_the_new_steps_to_be_checked(folder, honest, liar, reference):
    """Steps checked and then taken back by a rewind do not count as checked for the steps that replace them:
    the liar's first lie, in such a step, is caught and redone, and the logits are transformers'."""
    from client.model import RemoteCache

    node, lying = liar(honest_steps=3)
    model = client(folder, [*honest, node], verify="full")
    torch.manual_seed(5)
    first, later, other = (torch.randint(3, 512, (1, n)) for n in (4, 1, 2))
    try:
        with torch.inference_mode(), model.inference_session(max_length=16) as session:
            cache = RemoteCache(session)
            model(input_ids=first, cache=cache)
            for _ in range(2):  # the liar's steps 2 and 3, honest and checked
                model(input_ids=later, cache=cache)
            cache.crop(-2)  # back to the prompt: two checked steps taken back
            logits = model(input_ids=other, cache=cache).logits  # the liar's fourth step: a lie
            assert lying.lies == 1 and node.address in model.swarm.liars
            expected = reference(torch.cat([first, other], dim=1)).logits[:, 4:]
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    finally:
        model.close()
