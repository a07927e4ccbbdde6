"""Tensors on the wire: exact round trips, no copy on decode, clear errors on bad messages."""

import ctypes

import pytest
import torch

from common.wire import codec, contract
from common.wire.generated import potluck_pb2 as pb


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool])
def test_round_trip_is_exact(dtype):
    tensor = (torch.randn(2, 3, 5) * 10).to(dtype)
    message = pb.Tensor.FromString(codec.encode_tensor(tensor).SerializeToString())
    back = codec.decode_tensor(message)
    assert back.dtype == dtype and back.shape == tensor.shape
    assert torch.equal(back, tensor)


def test_encode_converts_to_the_wire_dtype_and_handles_views():
    tensor = torch.randn(4, 6).t()  # not contiguous
    back = codec.decode_tensor(codec.encode_tensor(tensor, torch.bfloat16))
    assert back.dtype == torch.bfloat16
    assert torch.equal(back, tensor.to(torch.bfloat16))


def test_decode_is_a_view_of_the_received_bytes():
    data = codec.encode_tensor(torch.arange(16, dtype=torch.float32)).data
    tensor = codec.view_bytes(data, [4, 4], "float32")
    assert tensor.data_ptr() == ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value  # no copy
    assert tensor[3, 3].item() == 15.0


@pytest.mark.parametrize(
    "message, fragment",
    [
        (pb.Tensor(data=b"\0" * 7, shape=[2], dtype="float32"), "do not hold shape"),
        (pb.Tensor(data=b"", shape=[-1], dtype="float32"), "invalid shape"),
        (pb.Tensor(data=b"", shape=[0], dtype="float8"), "unknown dtype"),
    ],
)
def test_bad_messages_raise_codec_errors(message, fragment):
    with pytest.raises(codec.CodecError, match=fragment):
        codec.decode_tensor(message)


def test_metadata_is_msgpack_and_validated():
    assert codec.unpack_metadata(codec.pack_metadata({"a": 1, "b": [1, 2]})) == {"a": 1, "b": [1, 2]}
    assert codec.unpack_metadata(b"") == {}
    with pytest.raises(codec.CodecError):
        codec.unpack_metadata(codec.pack_metadata([1, 2]))
    with pytest.raises(codec.CodecError):
        codec.unpack_metadata(b"\xc1")


# -- int8 blockwise wire format ---------------------------------------------------------------------
def int8_round_trip(tensor: torch.Tensor) -> tuple[pb.Tensor, torch.Tensor]:
    message = pb.Tensor.FromString(codec.encode_hidden(tensor, "int8").SerializeToString())
    return message, codec.decode_tensor(message, "hidden")


@pytest.mark.parametrize("hidden", [576, 64, 100, 1, 65, 130])
def test_int8_error_is_within_half_a_step_of_every_block(hidden):
    torch.manual_seed(hidden)
    # magnitudes from 1e-3 to 1e3 across the hidden dimension: blocks of very different scales
    tensor = torch.randn(2, 5, hidden) * torch.logspace(-3, 3, hidden)
    message, back = int8_round_trip(tensor)
    assert message.dtype == codec.INT8_NAME and list(message.shape) == [2, 5, hidden]
    assert back.dtype == torch.float32 and back.shape == tensor.shape
    blocks = -(-hidden // codec.BLOCK)
    for b in range(blocks):
        part = slice(b * codec.BLOCK, (b + 1) * codec.BLOCK)
        absmax = tensor[..., part].abs().amax(dim=-1, keepdim=True)
        step = absmax.to(codec.SCALE_DTYPE).float() / 127 * (1 + 2 ** -9)  # the scale, rounded up to float16
        error = (back[..., part] - tensor[..., part]).abs()
        assert (error <= step / 2 + 1e-6 * absmax).all(), f"block {b}: error {error.max()} over half a step"


def test_int8_keeps_zeros_extremes_and_signs():
    tensor = torch.zeros(1, 1, 128)
    tensor[0, 0, 3], tensor[0, 0, 70], tensor[0, 0, 71] = -5.0, 2.5, -0.02
    _, back = int8_round_trip(tensor)
    assert back[0, 0, 3].item() == pytest.approx(-5.0, rel=2e-3)  # a block's absmax comes back (almost) exactly
    assert back[0, 0, 70].item() == pytest.approx(2.5, rel=2e-3)
    assert back[0, 0, 71].item() == pytest.approx(-2.5 / 127, rel=2e-3)  # one step below zero, sign kept
    assert torch.count_nonzero(back) == 3  # zeros stay zeros


def test_int8_non_finite_values_spoil_only_their_block():
    tensor = torch.ones(1, 2, 128)
    tensor[0, 0, 5] = float("nan")
    tensor[0, 1, 100] = float("inf")
    _, back = int8_round_trip(tensor)
    assert back[0, 0, :64].isnan().all() and back[0, 1, 64:].isnan().all()
    assert torch.allclose(back[0, 0, 64:], torch.ones(64), rtol=5e-3)
    assert torch.allclose(back[0, 1, :64], torch.ones(64), rtol=5e-3)


def test_int8_message_sizes():
    scale = codec.SCALE_DTYPE.itemsize
    for shape, blocks in [([1, 1, 576], 9), ([2, 3, 100], 12), ([1, 128, 576], 128 * 9), ([4, 64], 4), ([7], 1)]:
        message = codec.encode_hidden(torch.randn(shape), "int8")
        numel = torch.Size(shape).numel()
        assert len(message.data) == numel + blocks * scale
    assert codec.encode_hidden(torch.randn(1, 0, 576), "int8").data == b""
    hidden = torch.randn(1, 1, 576)
    sizes = {wire: len(codec.encode_hidden(hidden, wire).SerializeToString()) for wire in contract.WIRE_FORMATS}
    assert sizes["int8"] < sizes["float16"] < sizes["bfloat16"] < sizes["float32"]  # the dtype names differ by a byte
    assert sizes["int8"] < 0.3 * sizes["float32"]


def test_int8_empty_tensors_round_trip():
    for shape in ([1, 0, 576], [0, 4, 64], [3, 2, 0]):
        _, back = int8_round_trip(torch.zeros(shape))
        assert back.shape == torch.Size(shape) and back.dtype == torch.float32


def test_wire_dtype_of_int8_is_what_nodes_compute_on():
    assert codec.wire_dtype("int8") is torch.float32
    assert codec.wire_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(codec.CodecError, match="wire dtype 'int4' is not one of float32, bfloat16, float16, int8"):
        codec.wire_dtype("int4")
    with pytest.raises(codec.CodecError, match="wire dtype 'int8_block64'"):
        codec.encode_hidden(torch.zeros(1, 1, 64), codec.INT8_NAME)  # the message's dtype is not a session's format


def good_int8(shape=(1, 2, 100)) -> pb.Tensor:
    return codec.encode_hidden(torch.randn(shape), "int8")


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda m: setattr(m, "data", m.data[:-1]), "do not hold shape"),                 # a scale byte short
        (lambda m: setattr(m, "data", m.data + b"\0\0"), "do not hold shape"),            # one scale too many
        (lambda m: setattr(m, "data", m.data[:200]), "do not hold shape"),                # only the int8 values
        (lambda m: m.shape.__setitem__(-1, 101), "do not hold shape"),                    # hidden size off by one
        (lambda m: m.shape.__setitem__(-1, 50), "do not hold shape"),                     # fewer blocks than sent
        (lambda m: m.shape.__setitem__(0, 2), "do not hold shape"),                       # more rows than sent
        (lambda m: m.shape.__setitem__(0, -1), "invalid shape"),
        (lambda m: m.ClearField("shape"), "at least one dimension"),
        (lambda m: m.shape.extend([1] * 8), "invalid shape"),
        (lambda m: (m.shape.__setitem__(1, 0)), "empty int8_block64 tensor"),             # bytes for no values
        (lambda m: setattr(m, "dtype", "int8_block32"), "unknown dtype 'int8_block32'"),
        (lambda m: setattr(m, "dtype", "int8"), "unknown dtype 'int8'"),
    ],
)
def test_int8_malformed_messages_raise_codec_errors(mutate, fragment):
    message = good_int8()
    mutate(message)
    with pytest.raises(codec.CodecError, match=fragment) as error:
        codec.decode_tensor(message, "hidden")
    assert str(error.value).startswith("hidden: ")


def test_int8_length_error_says_what_was_expected():
    message = good_int8((1, 2, 100))
    message.data = message.data[:-3]
    with pytest.raises(codec.CodecError, match=r"200 int8 values \+ 4 scales x 2 bytes = 208"):
        codec.decode_tensor(message, "hidden")


# -- int8 end to end: three real node processes -------------------------------------------------------
@pytest.fixture(scope="module")
def int8_remote(smollm_dir, smollm_chain):
    from client import DistributedModelForCausalLM

    model = DistributedModelForCausalLM.from_pretrained(str(smollm_dir), peers=[n.address for n in smollm_chain],
                                                        wire_dtype="int8")
    yield model
    model.close()


@pytest.mark.slow
def test_int8_wire_through_a_three_node_chain(int8_remote, remote, smollm_reference, tokenizer, smollm_chain):
    """SmolLM2 over 0:10, 10:20, 20:30 with int8 hidden states on every hop (and back to the client)."""
    from client.textgen import encode_prompt, generate_text
    from tests.support.swarm_fixtures import wait_for_full_cache

    prompt = "What is the capital of France?"  # the demo's and tests/test_smollm2.py's prompt
    ids = encode_prompt(tokenizer, prompt, True)
    with torch.no_grad():
        embeds = smollm_reference.get_input_embeddings()(ids)
    exact = remote.swarm.forward(embeds)           # float32 wire (the Forward RPC)
    quantised = int8_remote.swarm.forward(embeds)  # int8 wire, same RPC
    error = (quantised - exact).abs()
    print(
        f"int8 vs float32 wire, final hidden states: max |error| {error.max():.3g} (max |h| {exact.abs().max():.4g}), "
        f"mean {error.mean():.3g} (mean |h| {exact.abs().mean():.3g})"
    )
    assert quantised.dtype == torch.float32 and quantised.shape == exact.shape
    assert 0 < error.max() < 0.1 * exact.abs().max()
    assert error.mean() < 0.1 * exact.abs().mean()

    expected = smollm_reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                         do_sample=False)[0, ids.shape[1]:].tolist()
    result = generate_text(int8_remote, tokenizer, prompt, chat=True, max_new_tokens=24)
    assert result.token_ids == expected  # measured: true for this prompt (not for every prompt, see docs/benchmarks.md)
    assert result.text.strip() == "The capital of France is Paris."
    for node in smollm_chain:
        wait_for_full_cache(node.address, timeout=5)
