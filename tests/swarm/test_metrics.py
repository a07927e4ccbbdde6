"""Prometheus metrics: an in-process node counts steps, errors, traffic and cache, per node."""

from __future__ import annotations

import queue
import urllib.request

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from common.wire import codec
from common.wire.generated import potluck_pb2 as pb
from common.wire.generated import potluck_pb2_grpc as pb_grpc
from node.metrics import NodeMetrics
from node.runtime.sessions import kv_bytes_per_token
from tests.support.families import tiny_config

HIDDEN = 64
BUDGET = 256


def scrape(node) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from the node's /metrics page."""
    url = f"http://127.0.0.1:{node.metrics_server.port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture(scope="module")
def node(bg_loop, tiny_model_dir):
    running = bg_loop.start_node(tiny_model_dir("llama"), 0, 3, max_length=64, cache_tokens=BUDGET, metrics_port=0)
    yield running
    bg_loop.stop_node(running)


def open_request(sid: str, max_length: int = 32):
    return pb.SessionRequest(open=pb.OpenSession(session_id=sid, start=0, end=3, max_length=max_length, batch_size=1,
                                                 wire_dtype="float32"))


def step_request(tokens: int, position: int):
    return pb.SessionRequest(
        step=pb.Step(hidden=codec.encode_tensor(torch.randn(1, tokens, HIDDEN)), position=position)
    )


def test_a_session_and_a_bad_request_show_up_in_the_metrics(node):
    assert node.metrics_server.port > 0
    before = scrape(node)
    bytes_per_token = kv_bytes_per_token(tiny_config("llama"), 3, torch.float32)
    assert bytes_per_token == 3 * 2 * 2 * 16 * 4  # layers x (k + v) x kv heads x head dim x fp32
    assert before[("potluck_sessions_active", ())] == 0
    assert before[("potluck_kv_cache_tokens", (("state", "free"),))] == BUDGET
    assert before[("potluck_kv_cache_bytes", (("state", "free"),))] == BUDGET * bytes_per_token
    assert before[("potluck_steps_total", (("kind", "decode"),))] == 0

    with grpc.insecure_channel(node.address) as channel:
        stub = pb_grpc.PotluckStub(channel)
        outbox: queue.Queue = queue.Queue()
        replies = stub.Inference(iter(outbox.get, None), timeout=30)
        for request in (open_request("metrics-good"), step_request(5, 0), step_request(1, 5), step_request(1, 6)):
            outbox.put(request)  # prefill, then two decode steps, each answered before the next
            next(replies)
        # while the session is still open: it is counted and holds cache
        middle = scrape(node)
        assert middle[("potluck_sessions_active", ())] == 1
        # reserved as it steps (7 tokens so far), not the 32 its open declared (issue 25: lazy reservation)
        assert middle[("potluck_kv_cache_tokens", (("state", "reserved"),))] == 7
        assert middle[("potluck_kv_cache_tokens", (("state", "free"),))] == BUDGET - 7
        assert middle[("potluck_kv_cache_bytes", (("state", "used"),))] == 7 * bytes_per_token
        outbox.put(pb.SessionRequest(close=pb.CloseSession()))
        outbox.put(None)
        assert list(replies) == []
        bad = [open_request("metrics-bad"), pb.SessionRequest(step=pb.Step(
            hidden=codec.encode_tensor(torch.zeros(1, 2, HIDDEN + 1)), position=0))]
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Inference(iter(bad), timeout=30))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    after = scrape(node)
    assert after[("potluck_steps_total", (("kind", "prefill"),))] == 1
    assert after[("potluck_steps_total", (("kind", "decode"),))] == 2
    assert after[("potluck_step_seconds_count", (("kind", "decode"),))] == 2
    assert after[("potluck_step_seconds_sum", (("kind", "prefill"),))] > 0
    assert after[("potluck_errors_total", (("code", "INVALID_ARGUMENT"),))] == 1
    hidden_bytes = 7 * HIDDEN * 4  # 7 tokens in, 7 out (the bad step was refused before compute)
    assert after[("potluck_hidden_bytes_received_total", ())] == hidden_bytes
    assert after[("potluck_hidden_bytes_sent_total", ())] == hidden_bytes
    assert after[("potluck_sessions_active", ())] == 0
    assert after[("potluck_kv_cache_tokens", (("state", "free"),))] == BUDGET
    assert after[("potluck_kv_cache_tokens", (("state", "used"),))] == 0
    assert after[("potluck_kv_cache_bytes", (("state", "free"),))] == BUDGET * bytes_per_token


def test_each_node_has_its_own_registry(node, bg_loop, tiny_model_dir):
    other = bg_loop.start_node(tiny_model_dir("llama"), 3, 6, cache_tokens=128, metrics_port=0)
    try:
        assert other.metrics.registry is not node.metrics.registry
        assert other.metrics_server.port != node.metrics_server.port
        assert scrape(other)[("potluck_kv_cache_tokens", (("state", "free"),))] == 128
        assert scrape(node)[("potluck_kv_cache_tokens", (("state", "free"),))] == BUDGET
    finally:
        bg_loop.stop_node(other)


def test_metrics_are_off_unless_asked(bg_loop, tiny_model_dir):
    plain = bg_loop.start_node(tiny_model_dir("llama"), 0, 2)
    try:
        assert plain.metrics is None and plain.metrics_server is None
    finally:
        bg_loop.stop_node(plain)


def test_forward_counts_bytes_and_errors_by_code():
    metrics = NodeMetrics()
    metrics.forward(100, 60)
    metrics.error("OUT_OF_RANGE")
    metrics.error("OUT_OF_RANGE")
    get = metrics.registry.get_sample_value
    assert get("potluck_forwards_total") == 1
    assert get("potluck_hidden_bytes_received_total") == 100
    assert get("potluck_hidden_bytes_sent_total") == 60
    assert get("potluck_errors_total", {"code": "OUT_OF_RANGE"}) == 2


def test_memory_parts_in_info_and_metrics_follow_the_span_and_its_caches(node):
    """Info's "memory" and the potluck_memory_bytes gauges: the weights as held (the span's own count), the KV
    cache as allocated (a session's first chunk while it is open, nothing after), the runtime baseline."""
    from client.transport import memory_parts
    from node.model.lean import KV_CHUNK
    from node.model.quant import weight_bytes
    from tests.support.swarm_fixtures import node_info

    def memory() -> dict:
        return dict(memory_parts(codec.unpack_metadata(node_info(node.address).metadata).get("memory")))

    assert KV_CHUNK > 64
    kv_chunk_bytes = 64 * kv_bytes_per_token(tiny_config("llama"), 3, torch.float32)  # a chunk, cut at max_length
    before = memory()
    assert before["weights"] == weight_bytes(node.executor.span) > 0
    assert before["kv_cache"] == 0
    assert 0 < before["baseline"] <= before["peak"] and 0 < before["resident"] <= before["peak"]
    with grpc.insecure_channel(node.address) as channel:
        outbox: queue.Queue = queue.Queue()
        replies = pb_grpc.PotluckStub(channel).Inference(iter(outbox.get, None), timeout=30)
        for request in (open_request("memory", max_length=64), step_request(3, 0)):
            outbox.put(request)
            next(replies)
        assert memory()["kv_cache"] == kv_chunk_bytes  # 3 tokens written: one chunk, not the budget
        gauges = scrape(node)
        assert gauges[("potluck_memory_bytes", (("part", "kv_cache"),))] == kv_chunk_bytes
        assert gauges[("potluck_memory_bytes", (("part", "weights"),))] == before["weights"]
        outbox.put(pb.SessionRequest(close=pb.CloseSession()))
        outbox.put(None)
        assert list(replies) == []
    import gc

    gc.collect()
    assert memory()["kv_cache"] == 0
