"""Strangers in the public swarm (issue 25): one peer hogging a node's sessions or cache. Each attack runs against
a real node on loopback, the attacker arriving from another address (127.0.0.2, through node/bench/masquerade.py);
an honest client on 127.0.0.1 must still get exactly transformers' answer, in bounded time."""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack, contextmanager

import grpc
import pytest
import torch

from common.wire.generated import potluck_pb2_grpc as pb_grpc
from node.bench.masquerade import Masquerade
from tests.swarm.test_bad_input import open_request, run_stream, step_request
from tests.swarm.test_overload import EXHAUSTED, HIDDEN, assert_exact, stub_for

ATTACKER = "127.0.0.2"


@pytest.fixture()
def make_node(bg_loop, tiny_model_dir):
    """A node on layers 0:3 of the tiny LLaMA and an address that reaches it from 127.0.0.2."""
    started = []

    def make(**limits):
        node = bg_loop.start_node(tiny_model_dir("llama"), 0, 3, throughput=10.0, **limits)
        masquerade = Masquerade(node.address, ATTACKER)
        bg_loop.run(masquerade.start())
        started.append((node, masquerade))
        return node, masquerade.address

    yield make
    for node, masquerade in started:
        bg_loop.run(masquerade.close())
        bg_loop.stop_node(node)


@contextmanager
def hog(address: str, sid: str, tokens: int = 0, **open_fields):
    """An attacker's session through `address`, held open (after a prefill of `tokens` tokens, if given) until the
    block ends; yields the call (its first reply read) or the error that refused it."""
    release = threading.Event()

    def requests():
        yield open_request(sid=sid, **open_fields)
        if tokens:
            yield step_request(torch.zeros(open_fields.get("batch_size", 1), tokens, HIDDEN))
        release.wait(60)

    with grpc.insecure_channel(address) as channel:
        call = pb_grpc.PotluckStub(channel).Inference(requests(), timeout=60)
        try:
            replies = [next(call)] + ([next(call)] if tokens else [])
            yield call, replies, None
        except grpc.RpcError as error:
            yield call, [], error
        finally:
            release.set()
            call.cancel()


def honest(node, tiny_model_dir, sid: str) -> float:
    """The honest client's exact answer; returns how long it took."""
    started = time.monotonic()
    with stub_for(node) as stub:
        assert_exact(stub, tiny_model_dir, sid)
    return time.monotonic() - started


def test_declared_but_unused_cache_does_not_starve_an_honest_client(make_node, tiny_model_dir):
    """Issue 25's attack: two opens of batch 64 x 512 tokens with no step reserved the node's whole cache (65,536
    tokens) until the 600 s idle timeout. A session now reserves only what its steps reach."""
    node, attacker = make_node(max_length=512, max_batch=64, cache_tokens=65536, admission_wait=0.5)
    with ExitStack() as stack:
        for i in range(2):
            _, replies, error = stack.enter_context(hog(attacker, f"hog-{i}", batch_size=64, max_length=512))
            assert error is None and replies[0].WhichOneof("kind") == "opened", error
        assert node.executor.sessions.reserved_tokens == 0
        assert honest(node, tiny_model_dir, "honest") < 5


def test_a_session_that_never_steps_is_closed_after_the_open_timeout(make_node, tiny_model_dir):
    node, attacker = make_node(max_sessions=2, session_open_timeout=0.4, admission_wait=0.0)
    with hog(attacker, "idle-a") as (call_a, _, error_a), hog(attacker, "idle-b") as (call_b, _, error_b):
        assert error_a is None and error_b is None
        started = time.monotonic()
        for call in (call_a, call_b):  # the node ends both streams: the client fails over by replay
            with pytest.raises(grpc.RpcError) as caught:
                next(call)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "never stepped" in caught.value.details()
        assert time.monotonic() - started < 3, "unstepped sessions must go in seconds, not at the idle timeout"
        assert len(node.executor.sessions) == 0
        assert honest(node, tiny_model_dir, "honest") < 5


def test_per_peer_quotas_keep_one_peer_from_taking_every_session_and_the_cache(make_node, tiny_model_dir):
    """An attacker that does step (prefills to hold cache) gets at most half the budget and --max-peer-sessions
    sessions; the honest client still opens, steps and gets the exact answer."""
    node, attacker = make_node(max_length=64, cache_tokens=256, max_sessions=4, max_peer_sessions=3,
                               admission_wait=0.3)
    with ExitStack() as stack:
        held = [stack.enter_context(hog(attacker, f"cache-{i}", tokens=60, max_length=64)) for i in range(3)]
        assert [error is None for _, _, error in held] == [True, True, False], [e for _, _, e in held]
        error = held[2][2]  # 2 x 60 tokens held; a third 60 passes half the budget (128)
        assert error.code() == EXHAUSTED and "--max-peer-tokens" in error.details(), error.details()
        _, _, error = stack.enter_context(hog(attacker, "slots-3"))  # 2 open + 1 more = 3 sessions: its limit
        assert error is None
        _, _, error = stack.enter_context(hog(attacker, "slots-4"))
        assert error is not None and error.code() == EXHAUSTED and "--max-peer-sessions" in error.details()
        assert node.executor.sessions.peer_tokens(ATTACKER) == 120
        assert honest(node, tiny_model_dir, "honest") < 5  # the 4th session slot and the other half of the cache
    with stub_for(node) as stub:
        replies, error = run_stream(stub, [open_request(sid="after", max_length=8)])
        assert error is None and node.executor.sessions.peer_tokens(ATTACKER) == 0
