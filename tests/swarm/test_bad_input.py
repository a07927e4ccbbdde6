"""Malformed requests get a precise status and message; the node keeps serving everyone else."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from common.wire import codec, contract
from common.wire.generated import potluck_pb2 as pb
from common.wire.generated import potluck_pb2_grpc as pb_grpc

HIDDEN = 64


@pytest.fixture(scope="module")
def node(bg_loop, tiny_model_dir):
    running = bg_loop.start_node(tiny_model_dir("llama"), 0, 3, max_length=64, cache_tokens=256)
    yield running
    assert running.executor.sessions.reserved_tokens == 0
    bg_loop.stop_node(running)


@pytest.fixture()
def stub(node):
    channel = grpc.insecure_channel(node.address)
    yield pb_grpc.PotluckStub(channel)
    channel.close()


def open_request(**overrides):
    fields = dict(session_id="s-" + overrides.pop("sid", "x"), start=0, end=3, max_length=32, batch_size=1,
                  wire_dtype="float32")
    fields.update(overrides)
    return pb.SessionRequest(open=pb.OpenSession(**fields))


def step_request(hidden: torch.Tensor, position: int = 0, **extra):
    step = pb.Step(hidden=codec.encode_tensor(hidden), position=position)
    for name, tensor in extra.items():
        getattr(step, name).CopyFrom(codec.encode_tensor(tensor))
    return pb.SessionRequest(step=step)


def run_stream(stub, requests):
    """Send requests on one stream; return (replies, error or None)."""
    replies = []
    try:
        for reply in stub.Inference(iter(requests), timeout=30):
            replies.append(reply)
    except grpc.RpcError as error:
        return replies, error
    return replies, None


def reference_layers(tiny_model_dir, hidden):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32).eval()
    with torch.no_grad():
        positions = torch.arange(hidden.shape[1])[None]
        emb = model.model.rotary_emb(hidden, positions)
        for layer in model.model.layers[:3]:
            hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=emb)
    return hidden


BAD_CASES = {
    "wrong hidden size": (
        lambda: [open_request(), step_request(torch.zeros(1, 2, HIDDEN + 1))],
        grpc.StatusCode.INVALID_ARGUMENT,
        "hidden size 65",
    ),
    "wrong dtype": (
        lambda: [open_request(), step_request(torch.zeros(1, 2, HIDDEN, dtype=torch.float16))],
        grpc.StatusCode.INVALID_ARGUMENT,
        "wire dtype",
    ),
    "wrong rank": (
        lambda: [open_request(), step_request(torch.zeros(2, HIDDEN))],
        grpc.StatusCode.INVALID_ARGUMENT,
        "must be [batch, tokens, 64]",
    ),
    "wrong batch": (
        lambda: [open_request(), step_request(torch.zeros(3, 1, HIDDEN))],
        grpc.StatusCode.INVALID_ARGUMENT,
        "batch_size 1",
    ),
    "bytes do not fit the shape": (
        lambda: [
            open_request(),
            pb.SessionRequest(step=pb.Step(hidden=pb.Tensor(data=b"\0" * 12, shape=[1, 1, HIDDEN], dtype="float32"))),
        ],
        grpc.StatusCode.INVALID_ARGUMENT,
        "do not hold shape",
    ),
    "unknown tensor dtype": (
        lambda: [
            open_request(),
            pb.SessionRequest(step=pb.Step(hidden=pb.Tensor(data=b"", shape=[0], dtype="complex64"))),
        ],
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown dtype",
    ),
    "bad position_ids shape": (
        lambda: [
            open_request(),
            step_request(torch.zeros(1, 2, HIDDEN), position_ids=torch.zeros(1, 3, dtype=torch.int64)),
        ],
        grpc.StatusCode.INVALID_ARGUMENT,
        "position_ids must have shape [1, 2]",
    ),
    "step before open": (
        lambda: [step_request(torch.zeros(1, 1, HIDDEN))],
        grpc.StatusCode.FAILED_PRECONDITION,
        "open",
    ),
    "span not served": (lambda: [open_request(start=2, end=5)], grpc.StatusCode.INVALID_ARGUMENT, "serves 0:3"),
    "max_length past the node's limit": (
        lambda: [open_request(max_length=65)],
        grpc.StatusCode.OUT_OF_RANGE,
        "max_length 65",
    ),
    "position past max length": (
        lambda: [open_request(max_length=4), step_request(torch.zeros(1, 5, HIDDEN))],
        grpc.StatusCode.OUT_OF_RANGE,
        "past the session's max_length 4",
    ),
    "wrong position": (
        lambda: [open_request(), step_request(torch.zeros(1, 1, HIDDEN), position=7)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "holds 0",
    ),
    "cache budget exhausted": (
        lambda: [open_request(batch_size=8, max_length=64)],
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "of 256 are free",
    ),
    "unknown wire dtype": (
        lambda: [open_request(wire_dtype="int4")],
        grpc.StatusCode.INVALID_ARGUMENT,
        "wire dtype 'int4'",
    ),
    "empty request": (lambda: [pb.SessionRequest()], grpc.StatusCode.INVALID_ARGUMENT, "empty SessionRequest"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_stream_input_gets_a_clear_status(case, stub, node, tiny_model_dir):
    make, code, fragment = BAD_CASES[case]
    # A good session is open on another stream while the bad one fails.
    good = stub.Inference(iter([open_request(sid="good-" + case), step_request(torch.ones(1, 3, HIDDEN))]), timeout=30)
    _, error = run_stream(stub, make())
    assert error is not None, f"{case}: the node accepted it"
    assert error.code() == code, f"{case}: {error.code()} {error.details()}"
    assert fragment in error.details(), error.details()
    # the node still answers correctly, on the session opened before and on a new one
    replies = list(good)
    hidden = torch.randn(1, 4, HIDDEN)
    fresh, error = run_stream(stub, [open_request(sid="after-" + case), step_request(hidden)])
    assert error is None
    got = codec.decode_tensor(fresh[1].result.hidden)
    torch.testing.assert_close(got, reference_layers(tiny_model_dir, hidden), rtol=1e-5, atol=1e-5)
    assert replies[1].result.position == 3
    assert node.executor.sessions.reserved_tokens == 0


def test_duplicate_session_id_is_refused(stub):
    release = threading.Event()

    def held_open():  # the first stream stays open until the second has been refused
        yield open_request(sid="dup")
        release.wait(30)

    first = stub.Inference(held_open(), timeout=30)
    assert next(first).WhichOneof("kind") == "opened"
    _, error = run_stream(stub, [open_request(sid="dup")])
    release.set()
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "already open" in error.details()
    assert list(first) == []


def test_forward_rejects_a_span_it_does_not_serve(stub):
    request = pb.ForwardRequest(
        start=1, end=4, hidden=codec.encode_tensor(torch.zeros(1, 2, HIDDEN)), wire_dtype="float32"
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.Forward(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "layers 1:4 are not served here" in caught.value.details()


def test_info_reports_the_span_and_free_cache(stub):
    info = stub.Info(pb.InfoRequest(), timeout=10)
    assert (info.start, info.end, info.num_layers, info.hidden_size) == (0, 3, 6, HIDDEN)
    assert info.protocol_version == contract.PROTOCOL_VERSION
    assert info.free_cache_tokens == 256 and info.max_length == 64
    assert info.dtype == "float32" and info.device == "cpu" and len(info.config_hash) == 16


def test_a_step_at_an_earlier_position_rewinds_the_cache(stub, tiny_model_dir):
    """Push recovery re-sends a step a node may already have run: the node forgets what came after it."""
    torch.manual_seed(3)
    prompt, wrong, right = torch.randn(1, 4, HIDDEN), torch.randn(1, 2, HIDDEN), torch.randn(1, 1, HIDDEN)
    replies, error = run_stream(
        stub,
        [
            open_request(sid="rewind"),
            step_request(prompt),
            step_request(wrong, position=4),
            step_request(right, position=4),
        ],
    )
    assert error is None, error
    assert [r.result.position for r in replies[1:]] == [4, 6, 5]
    expected = reference_layers(tiny_model_dir, torch.cat([prompt, right], dim=1))[:, -1:]
    torch.testing.assert_close(codec.decode_tensor(replies[3].result.hidden), expected, rtol=1e-5, atol=1e-5)
