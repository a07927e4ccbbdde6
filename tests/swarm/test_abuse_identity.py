"""Strangers in the public swarm (issue 25): quotas keyed by client identity, with a ceiling per address. An attacker
showing many fresh identities from one address (127.0.0.2, through node/bench/masquerade.py) gets no more than that
address's quota; two honest clients behind one address (127.0.0.1) each keep their own share, and get exactly
transformers' answer in bounded time."""

from __future__ import annotations

import threading
from contextlib import ExitStack, contextmanager
from dataclasses import replace

import grpc
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.wire.caller import CALLER_METADATA, caller_identity, caller_token
from common.wire.generated import potluck_pb2_grpc as pb_grpc
from node.rpc.ratelimit import RateLimited, RateLimiter
from node.runtime.quota import caller_key
from tests.swarm import test_abuse
from tests.swarm.test_abuse import ATTACKER, honest
from tests.swarm.test_bad_input import open_request, step_request
from tests.swarm.test_overload import EXHAUSTED, HIDDEN, assert_exact, stub_for

make_node = test_abuse.make_node  # the fixture: a node on loopback and an address reaching it from 127.0.0.2
LIMITS = dict(max_length=64, cache_tokens=512, max_sessions=16, max_peer_sessions=4, admission_wait=0.2)
# per address: 4 sessions and 256 cache tokens (half the budget); per identity: half of that


class AsIdentity:
    """A stub whose Inference calls prove `key`'s client identity (common/wire/caller.py)."""

    def __init__(self, stub, key: Ed25519PrivateKey | None = None):
        self.stub = stub
        self.key = key or Ed25519PrivateKey.generate()

    def Inference(self, requests, timeout=None):
        return self.stub.Inference(requests, timeout=timeout, metadata=((CALLER_METADATA, caller_token(self.key)),))


@contextmanager
def held(stub, sid: str, tokens: int = 60):
    """A session that prefills `tokens` tokens and stays open until the block ends; yields the error that refused
    it, or None."""
    release = threading.Event()

    def requests():
        yield open_request(sid=sid, max_length=64)
        yield step_request(torch.zeros(1, tokens, HIDDEN))
        release.wait(60)

    call = stub.Inference(requests(), timeout=60)
    try:
        next(call), next(call)
        yield None
    except grpc.RpcError as error:
        yield error
    finally:
        release.set()
        call.cancel()


def test_fresh_identities_from_one_address_do_not_multiply_its_quota(make_node, tiny_model_dir):
    node, attacker = make_node(**LIMITS)
    with ExitStack() as stack, grpc.insecure_channel(attacker) as channel:
        stub = pb_grpc.PotluckStub(channel)
        errors = [stack.enter_context(held(AsIdentity(stub), f"sybil-{i}")) for i in range(8)]
        assert [e is None for e in errors] == [True] * 4 + [False] * 4, [e and e.details() for e in errors]
        assert all(e.code() == EXHAUSTED and "--max-peer-sessions" in e.details() for e in errors[4:])
        assert node.executor.sessions.address_tokens(ATTACKER) == 240  # of the address's 256, whatever the keys
        assert honest(node, tiny_model_dir, "honest") < 5  # from 127.0.0.1: the rest of the node is its


def test_two_identities_behind_one_address_each_keep_their_share(make_node, tiny_model_dir):
    node, _ = make_node(**LIMITS)
    with ExitStack() as stack, stub_for(node) as stub:
        greedy, other = AsIdentity(stub), AsIdentity(stub)
        errors = [stack.enter_context(held(greedy, f"greedy-{i}")) for i in range(4)]
        # its share: 2 sessions, 128 tokens (a third 60-token prefill would pass it); keyed by address only, it
        # would have taken the address's 4 sessions and 240 tokens, and left the other client nothing
        assert [e is None for e in errors] == [True, True, False, False], [e and e.details() for e in errors]
        assert "this identity" in errors[2].details() and errors[2].code() == EXHAUSTED
        assert stack.enter_context(held(other, "other-0")) is None  # the other client's share is intact
        assert_exact(other, tiny_model_dir, "other-exact")
        greedy_key = caller_key("127.0.0.1", caller_identity(caller_token(greedy.key)))
        assert node.executor.sessions.peer_tokens(greedy_key) == 120
        assert node.executor.sessions.address_tokens("127.0.0.1") == 180


def test_the_rate_limit_is_per_identity_within_a_ceiling_per_address():
    now = [0.0]
    limiter = RateLimiter(2.0, clock=lambda: now[0])  # bursts of 4 per address, 2 per identity
    keys = [caller_key("10.0.0.9", f"id{i}") for i in range(20)]
    taken = 0
    for key in keys:  # twenty fresh identities from one address: the address's burst in all
        for _ in range(3):
            try:
                limiter.charge(key)
                taken += 1
            except RateLimited:
                pass
    assert taken == 4
    alice, bob = caller_key("10.0.0.1", "alice"), caller_key("10.0.0.1", "bob")  # two clients behind one NAT
    limiter.charge(alice)
    limiter.charge(alice)
    with pytest.raises(RateLimited, match="this identity"):  # alice is past her share ...
        limiter.charge(alice)
    limiter.charge(bob)  # ... which leaves bob his
    limiter.charge(bob)
    with pytest.raises(RateLimited, match="10.0.0.1 is over"):
        limiter.charge(caller_key("10.0.0.1", "carol"))  # and the address's burst is spent


def test_the_client_proves_its_identity_on_every_call(make_node, bg_loop):
    """The SDK's calls carry a throwaway identity (client/swarm.py), so a node counts them as that client's."""
    from client.transport import Peer
    from common.wire.security import PLAINTEXT

    node, _ = make_node(rate_limit=50.0, **LIMITS)
    key = Ed25519PrivateKey.generate()

    async def ask():
        peer = Peer(node.address, replace(PLAINTEXT, caller=key))  # made on the loop that uses it
        try:
            return await peer.info(5.0)
        finally:
            await peer.close()

    assert bg_loop.run(ask()).node_id == node.identity.node_id
    identity = caller_identity(caller_token(key))
    assert caller_key("127.0.0.1", identity) in node.servicer.limiter._identities
