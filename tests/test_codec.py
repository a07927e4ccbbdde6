"""Tensors on the wire: exact round trips, no copy on decode, clear errors on bad messages."""

import ctypes

import pytest
import torch

from node.rpc import codec
from node.rpc.generated import potluck_pb2 as pb


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
