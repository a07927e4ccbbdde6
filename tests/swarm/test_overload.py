"""Overload: every limit refuses with RESOURCE_EXHAUSTED and a message naming its flag; opens wait a
bounded time for room; many clients beyond the limits leave the node's memory and accounting bounded
and a healthy session exact."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from contextlib import contextmanager

import grpc
import pytest
import torch

from common.wire import codec
from common.wire.generated import potluck_pb2 as pb
from common.wire.generated import potluck_pb2_grpc as pb_grpc
from node.rpc.ratelimit import RateLimiter, peer_host
from node.runtime.errors import Exhausted
from tests.swarm.test_bad_input import open_request, reference_layers, run_stream, step_request

HIDDEN = 64
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture()
def make_node(bg_loop, tiny_model_dir):
    """A node on layers 0:3 of the tiny LLaMA with the given limits; stopped after the test."""
    started = []

    def make(**limits):
        limits.setdefault("max_length", 64)
        limits.setdefault("max_peer_tokens", 10**9)  # every client here is 127.0.0.1: test the node-wide budget
        node = bg_loop.start_node(tiny_model_dir("llama"), 0, 3, throughput=10.0, **limits)
        started.append(node)
        return node

    yield make
    for node in started:
        bg_loop.stop_node(node)


@contextmanager
def stub_for(node):
    with grpc.insecure_channel(node.address) as channel:
        yield pb_grpc.PotluckStub(channel)


@contextmanager
def held_open(stub, tokens: int = 0, **open_fields):
    """A session that stays open (its stream idle, after a first step of `tokens` tokens if given) until the block
    ends."""
    release = threading.Event()

    def requests():
        yield open_request(**open_fields)
        if tokens:
            yield step_request(torch.zeros(open_fields.get("batch_size", 1), tokens, HIDDEN))
        release.wait(60)

    call = stub.Inference(requests(), timeout=60)
    assert next(call).WhichOneof("kind") == "opened"
    if tokens:
        assert next(call).result.position == tokens
    try:
        yield call
    finally:
        release.set()
        assert list(call) == []


def refused(stub, requests) -> grpc.RpcError:
    _, error = run_stream(stub, requests)
    assert error is not None, "the node accepted it"
    assert error.code() == EXHAUSTED, f"{error.code()}: {error.details()}"
    return error


def assert_exact(stub, tiny_model_dir, sid: str) -> None:
    """A fresh session gives what plain transformers gives."""
    hidden = torch.randn(1, 5, HIDDEN)
    replies, error = run_stream(stub, [open_request(sid=sid, max_length=8), step_request(hidden[:, :4]),
                                       step_request(hidden[:, 4:], position=4)])
    assert error is None, error
    got = torch.cat([codec.decode_tensor(r.result.hidden) for r in replies[1:]], dim=1)
    torch.testing.assert_close(got, reference_layers(tiny_model_dir, hidden), rtol=1e-5, atol=1e-5)


# -- each limit ---------------------------------------------------------------------------------------
def test_max_sessions_refuses_the_next_open(make_node, tiny_model_dir):
    node = make_node(max_sessions=2, admission_wait=0.0)
    with stub_for(node) as stub, held_open(stub, sid="a", max_length=8), held_open(stub, sid="b", max_length=8):
        error = refused(stub, [open_request(sid="c", max_length=8)])
        assert "already holds 2 sessions" in error.details() and "--max-sessions" in error.details()
        assert len(node.executor.sessions) == 2
    with stub_for(node) as stub:
        assert_exact(stub, tiny_model_dir, "after")  # the slots are free again


def test_max_session_tokens_caps_one_session_and_one_forward(make_node):
    node = make_node(max_session_tokens=32, cache_tokens=1024, admission_wait=5.0)
    with stub_for(node) as stub:
        started = time.monotonic()
        error = refused(stub, [open_request(sid="big", batch_size=2, max_length=32)])
        assert time.monotonic() - started < 2, "a session that can never fit must not wait for room"
        assert "needs 64 cache tokens (batch 2 x max_length 32)" in error.details()
        assert "per-session limit of 32 (--max-session-tokens)" in error.details()
        assert run_stream(stub, [open_request(sid="fits", batch_size=2, max_length=16)])[1] is None
        request = pb.ForwardRequest(start=0, end=3, hidden=codec.encode_tensor(torch.zeros(3, 11, HIDDEN)))
        with pytest.raises(grpc.RpcError) as caught:
            stub.Forward(request, timeout=30)
        assert caught.value.code() == EXHAUSTED and "--max-session-tokens" in caught.value.details()
        ok = stub.Forward(pb.ForwardRequest(start=0, end=3, hidden=codec.encode_tensor(torch.zeros(2, 16, HIDDEN))),
                          timeout=30)
        assert list(ok.hidden.shape) == [2, 16, HIDDEN]


def test_cache_memory_sets_the_budget_in_bytes(make_node):
    per_token = 3 * 2 * (16 + 16) * 4  # layers x kv heads x (key + value dims) x float32
    node = make_node(cache_memory=100 * per_token + 5, admission_wait=0.0)
    assert node.executor.kv_bytes_per_token == per_token
    with stub_for(node) as stub:
        assert stub.Info(pb.InfoRequest(), timeout=10).free_cache_tokens == 100
        with held_open(stub, tokens=60, sid="first", max_length=60):  # a session reserves what its steps reach
            error = refused(stub, [open_request(sid="second", max_length=60),
                                   step_request(torch.zeros(1, 60, HIDDEN))])
            assert "only 40 of 100 are free (--cache-memory)" in error.details()
        error = refused(stub, [open_request(sid="too-big", batch_size=2, max_length=60)])
        assert "whole cache budget is smaller (--cache-memory)" in error.details()


def test_cache_memory_too_small_for_one_token_stops_the_node_at_start(bg_loop, tiny_model_dir):
    with pytest.raises(ValueError, match="--cache-memory 100 bytes hold no token"):
        bg_loop.start_node(tiny_model_dir("llama"), 0, 3, throughput=10.0, cache_memory=100)


def test_rate_limit_refuses_a_peer_past_its_bucket_and_refills(make_node, tiny_model_dir):
    node = make_node(rate_limit=5.0)  # bursts of 10
    with stub_for(node) as stub:
        codes = []
        for _ in range(20):
            try:
                stub.Info(pb.InfoRequest(), timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
                assert "over this node's rate limit of 5 requests/s (--rate-limit)" in error.details()
        assert codes.count(grpc.StatusCode.OK) in range(10, 13), codes  # the burst (and what refilled meanwhile)
        assert codes[-1] == EXHAUSTED and set(codes) == {grpc.StatusCode.OK, EXHAUSTED}
        time.sleep(0.8)  # 4 tokens back
        stub.Info(pb.InfoRequest(), timeout=10)
        # steps on a stream count too: 3 tokens left, and the stream asks for 1 open + 5 steps. A refused step gets
        # a refusal of its own (the session and its stream live on), and so do the steps queued behind it
        steps = [step_request(torch.zeros(1, 1, HIDDEN), position=i) for i in range(5)]
        replies, error = run_stream(stub, [open_request(sid="fast", max_length=8), *steps])
        assert error is None, error
        results = [reply.result for reply in replies[1:]]
        assert len(results) == 5 and any(r.refused for r in results) and not results[0].refused
        ran = next(i for i, r in enumerate(results) if r.refused)  # the steps the bucket still paid for ran
        assert [r.position for r in results[:ran]] == list(range(1, ran + 1))
        for result in results[ran:]:
            assert result.refused and "refused" in result.refused and "--rate-limit" in result.refused
            assert result.position == ran and result.retry_after_ms > 0 and not result.HasField("hidden")
        assert node.servicer.limiter.refused >= 9


def test_a_waiting_open_is_admitted_when_another_session_closes(make_node):
    node = make_node(max_sessions=1, admission_wait=10.0)
    with stub_for(node) as stub:
        outcome = {}
        with held_open(stub, sid="holder", max_length=8):
            def waiting_open():
                started = time.monotonic()
                outcome["result"] = run_stream(stub, [open_request(sid="waiter", max_length=8),
                                                     step_request(torch.zeros(1, 2, HIDDEN))])
                outcome["seconds"] = time.monotonic() - started

            thread = threading.Thread(target=waiting_open)
            thread.start()
            deadline = time.monotonic() + 10
            while not node.executor._room_waiters:  # the open is waiting for room
                assert time.monotonic() < deadline and thread.is_alive(), outcome
                time.sleep(0.01)
            time.sleep(0.3)
        thread.join(15)
        replies, error = outcome["result"]
        assert error is None, error
        assert replies[0].WhichOneof("kind") == "opened" and replies[1].result.position == 2
        assert 0.3 <= outcome["seconds"] < 10
        assert not node.executor._room_waiters


def test_a_waiting_open_gives_up_after_the_admission_wait(make_node):
    node = make_node(max_sessions=1, admission_wait=0.5)
    with stub_for(node) as stub, held_open(stub, sid="holder", max_length=8):
        started = time.monotonic()
        error = refused(stub, [open_request(sid="late", max_length=8)])
        assert 0.5 <= time.monotonic() - started < 5
        assert "--max-sessions" in error.details() and "waited 0.5s for room (--admission-wait)" in error.details()
    assert not node.executor._room_waiters


# -- the rate limiter alone ---------------------------------------------------------------------------
def test_token_buckets_are_per_host_refill_with_time_and_stay_bounded():
    now = [0.0]
    limiter = RateLimiter(2.0, clock=lambda: now[0], max_peers=3)  # bursts of 4
    for _ in range(4):
        limiter.charge("10.0.0.1")
    with pytest.raises(Exhausted, match="10.0.0.1 is over this node's rate limit of 2 requests/s"):
        limiter.charge("10.0.0.1")
    limiter.charge("10.0.0.2")  # another peer has its own bucket
    now[0] = 0.5  # one token back
    limiter.charge("10.0.0.1")
    with pytest.raises(Exhausted):
        limiter.charge("10.0.0.1")
    for host in ("a", "b", "c", "d"):
        limiter.charge(host)
    assert len(limiter) == 3 and limiter.refused == 2
    assert peer_host("ipv4:127.0.0.1:5123") == "127.0.0.1"
    assert peer_host("ipv6:[::1]:5123") == "::1"
    assert peer_host("unix:/tmp/sock") == "unix:/tmp/sock"


# -- many clients beyond every limit -------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def reason(error: grpc.aio.AioRpcError) -> str:
    """Which limit refused a call: the flag its message names, or gRPC's own limit of calls in flight."""
    for flag in ("--max-sessions", "--cache-tokens", "--max-session-tokens", "--rate-limit"):
        if flag in error.details():
            return f"{error.code().name} {flag}"
    if "Concurrent RPC limit exceeded" in error.details():
        return f"{error.code().name} calls in flight"
    if error.code() == grpc.StatusCode.INTERNAL and error.details() == "Internal error from Core":
        # grpc's own race (grpc/grpc#36066): the client's request writer still sending into a stream the server
        # has just refused (calls in flight) reports INTERNAL from grpc's core; a node's own errors say
        # "internal error: <what>" (node/rpc/servicer.py)
        return "RESOURCE_EXHAUSTED calls in flight (seen as INTERNAL from grpc's core)"
    return f"{error.code().name} {error.details()}"


async def one_client(address: str, index: int, tokens: int) -> str:
    """Open a session of `tokens` tokens, prefill and decode through it, close: how it ended."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.PotluckStub(channel)
        requests = [open_request(sid=f"load-{index}", max_length=tokens),
                    step_request(torch.randn(1, tokens - 2, HIDDEN)),
                    step_request(torch.randn(1, 1, HIDDEN), position=tokens - 2),
                    step_request(torch.randn(1, 1, HIDDEN), position=tokens - 1)]
        try:
            replies = [reply async for reply in stub.Inference(iter(requests), timeout=60)]
        except grpc.aio.AioRpcError as error:
            return reason(error)
        assert [r.result.position for r in replies[1:]] == [tokens - 2, tokens - 1, tokens]
        return "OK"


async def load(address: str, clients: int, rounds: int) -> Counter:
    """`rounds` times, `clients` clients at once (sessions of 48 and 8 tokens, alternately)."""
    outcomes: Counter = Counter()
    for round_ in range(rounds):
        outcomes.update(await asyncio.gather(*(one_client(address, round_ * clients + i, 48 if i % 2 else 8)
                                               for i in range(clients))))
    return outcomes


def test_load_beyond_every_limit_stays_bounded(make_node, tiny_model_dir):
    max_sessions, budget = 8, 6 * 48
    node = make_node(max_sessions=max_sessions, cache_tokens=budget, admission_wait=0.2)
    peak = {"sessions": 0, "reserved": 0}
    stop = threading.Event()

    def watch():  # the table never holds more than the limits allow
        while not stop.is_set():
            peak["sessions"] = max(peak["sessions"], len(node.executor.sessions))
            peak["reserved"] = max(peak["reserved"], node.executor.sessions.reserved_tokens)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        warm = asyncio.run(load(node.address, 96, 1))  # 96 clients at once: 2 x 8 + 64 calls pass grpc
        before = rss_bytes()
        outcomes = asyncio.run(load(node.address, 96, 3))
        after = rss_bytes()
    finally:
        stop.set()
        watcher.join()
    print(f"\nload: warm-up {dict(warm)}; 3 rounds {dict(outcomes)}; RSS {before / 2**20:.0f} -> "
          f"{after / 2**20:.0f} MiB; peak {peak}")
    assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED --max-sessions", "RESOURCE_EXHAUSTED --cache-tokens",
                             "RESOURCE_EXHAUSTED calls in flight",
                             "RESOURCE_EXHAUSTED calls in flight (seen as INTERNAL from grpc's core)"}, outcomes
    assert outcomes["OK"] >= 3 * 6, outcomes
    assert sum(outcomes.values()) - outcomes["OK"] > 0, outcomes  # the limits did refuse some
    assert peak["sessions"] <= max_sessions and peak["reserved"] <= budget, peak
    assert after - before < 64 * 2**20, f"RSS grew by {(after - before) / 2**20:.0f} MiB over 288 clients"
    assert len(node.executor.sessions) == 0 and node.executor.sessions.reserved_tokens == 0
    assert not node.executor._room_waiters
    with stub_for(node) as stub:
        assert_exact(stub, tiny_model_dir, "after-load")


# -- flags and config-file keys ------------------------------------------------------------------------
def test_limit_flags_and_config_keys_reach_the_node_config(tmp_path):
    from node.cli.join import _limit_options, join_args
    from node.config import ConfigError, NodeConfig

    path = tmp_path / "node.toml"
    path.write_text('model = "m"\nmax-sessions = 32\nmax_session_tokens = 4096\ncache-memory = "2GiB"\n'
                    'rate-limit = 50\nadmission-wait = 0.5\nmax-peer-sessions = 4\nmax-peer-tokens = 512\n')
    options = _limit_options(join_args(["--config", str(path), "--rate-limit", "7.5"]))
    assert options == dict(max_sessions=32, max_session_tokens=4096, cache_memory=2 * 2**30, rate_limit=7.5,
                           admission_wait=0.5, max_peer_sessions=4, max_peer_tokens=512)
    config = NodeConfig(model="m", **options)
    assert (config.max_sessions, config.max_rpcs) == (32, 2 * 32 + 64)
    defaults = _limit_options(join_args(["--model", "m"]))
    assert defaults == dict(
        max_sessions=256, max_session_tokens=0, cache_memory=None, rate_limit=0.0, admission_wait=2.0,
        max_peer_sessions=32, max_peer_tokens=0,
    )
    with pytest.raises(ConfigError, match="--cache-memory 'lots'"):
        _limit_options(join_args(["--model", "m", "--cache-memory", "lots"]))
    for bad, message in [(dict(max_sessions=0), "--max-sessions"), (dict(rate_limit=-1.0), "--rate-limit"),
                         (dict(admission_wait=float("nan")), "--admission-wait"),
                         (dict(max_session_tokens=-5), "--max-session-tokens"),
                         (dict(max_peer_tokens=-1), "--max-peer-tokens"),
                         (dict(session_open_timeout=0.0), "--session-open-timeout")]:
        with pytest.raises(ConfigError, match=message):
            NodeConfig(model="m", **bad)
