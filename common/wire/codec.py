"""The only module that knows how tensors and metadata look on the wire."""

from __future__ import annotations

import warnings

import msgpack
import torch

from common.wire.contract import WIRE_FORMATS
from common.wire.generated import potluck_pb2 as pb
from common.wire.record_codec import decode_records, encode_records  # noqa: F401  (re-exported)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024

WIRE_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
_NAMES = {dtype: name for name, dtype in WIRE_DTYPES.items()}

# "int8": blockwise absmax quantisation along the last (hidden) dimension. A block is BLOCK
# consecutive values of one row (the row's last block may be shorter); it travels as int8
# values q = round(x / scale) in [-127, 127] with scale = absmax(block) / 127. Message dtype
# INT8_NAME; data = the int8 values in row-major order, then one scale per block (rows x blocks).
BLOCK = 64
INT8_NAME = f"int8_block{BLOCK}"
# Scales in float16, measured against float32 scales on SmolLM2 (a 3-hop chain simulated in one
# process, 8 prompts x 32 greedy tokens): the same 4 of 8 prompts equal to transformers, parting at
# the same tokens; max error of the final hidden states 139 with float16 scales, 140 with float32.
# So float32 scales would only cost 3% more bytes.
SCALE_DTYPE = torch.float16


class CodecError(ValueError):
    """A message that does not decode into a valid tensor."""


def wire_dtype(name: str) -> torch.dtype:
    """The dtype hidden states have after decoding a message of wire format `name`."""
    if name not in WIRE_FORMATS:
        raise CodecError(f"wire dtype {name!r} is not one of {', '.join(WIRE_FORMATS)}")
    return torch.float32 if name == "int8" else WIRE_DTYPES[name]


def encode_hidden(tensor: torch.Tensor, wire: str) -> pb.Tensor:
    """Hidden states -> message in the session's wire format (a name from WIRE_FORMATS)."""
    if wire == "int8":
        return encode_int8_blocks(tensor)
    return encode_tensor(tensor, wire_dtype(wire))


def _blocks(hidden: int) -> int:
    return -(-hidden // BLOCK)


def encode_int8_blocks(tensor: torch.Tensor) -> pb.Tensor:
    """Tensor [..., hidden] -> int8 values and one scale per block of BLOCK along `hidden`.

    Every value comes back within scale / 2 of the original, scale being absmax / 127 of its block
    rounded up to SCALE_DTYPE. A block holding a NaN or an infinity (or, with float16 scales, an
    absmax above 127 x 65504) decodes as all NaN."""
    if tensor.dim() < 1:
        raise CodecError(f"int8 wire needs a tensor with a hidden dimension, got shape {list(tensor.shape)}")
    shape = list(tensor.shape)
    if tensor.numel() == 0:
        return pb.Tensor(data=b"", shape=shape, dtype=INT8_NAME)
    hidden = shape[-1]
    blocks = _blocks(hidden)
    x = tensor.detach().to(device="cpu", dtype=torch.float32).reshape(-1, hidden)
    padded = torch.nn.functional.pad(x, (0, blocks * BLOCK - hidden)).view(-1, blocks, BLOCK)
    exact = padded.abs().amax(dim=-1) / 127
    scales = exact.to(SCALE_DTYPE)
    scales = torch.where(scales.float() < exact, torch.nextafter(scales, torch.full_like(scales, torch.inf)), scales)
    wide = scales.float().unsqueeze(-1)  # rounded up, so no value needs more than 127 steps
    q = torch.where(wide > 0, padded / wide, 0.0).round().clamp(-127, 127).nan_to_num(0.0)
    q = q.to(torch.int8).view(-1, blocks * BLOCK)[:, :hidden].contiguous()
    data = q.numpy().tobytes() + scales.contiguous().numpy().tobytes()
    return pb.Tensor(data=data, shape=shape, dtype=INT8_NAME)


def _decode_int8_blocks(data: bytes, shape: list[int], name: str) -> torch.Tensor:
    """The float32 tensor an INT8_NAME message stands for; CodecError unless every length fits."""
    if not shape:
        raise CodecError(f"{name}: {INT8_NAME} needs at least one dimension, got shape {shape}")
    numel = 1
    for size in shape:
        numel *= size
    hidden = shape[-1]
    if numel == 0:
        if data:
            raise CodecError(f"{name}: {len(data)} bytes for an empty {INT8_NAME} tensor of shape {shape}")
        return torch.empty(shape, dtype=torch.float32)
    rows, blocks = numel // hidden, _blocks(hidden)
    scale_bytes = rows * blocks * SCALE_DTYPE.itemsize
    if len(data) != numel + scale_bytes:
        raise CodecError(
            f"{name}: {len(data)} bytes do not hold shape {shape} of {INT8_NAME} "
            f"({numel} int8 values + {rows * blocks} scales x {SCALE_DTYPE.itemsize} bytes = {numel + scale_bytes})"
        )
    with warnings.catch_warnings():  # read-only views of the immutable bytes
        warnings.simplefilter("ignore", UserWarning)
        q = torch.frombuffer(data, dtype=torch.int8, count=numel).view(rows, hidden)
    scales = torch.frombuffer(bytearray(data[numel:]), dtype=SCALE_DTYPE).view(rows, blocks, 1)  # a copy: aligned
    padded = torch.nn.functional.pad(q.float(), (0, blocks * BLOCK - hidden)).view(rows, blocks, BLOCK)
    return (padded * scales.float()).view(rows, blocks * BLOCK)[:, :hidden].reshape(shape)


def dtype_to_name(dtype: torch.dtype) -> str:
    return _NAMES[dtype]


def encode_tensor(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> pb.Tensor:
    """Tensor -> message; one copy (into the protobuf bytes)."""
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    tensor = tensor.detach().to("cpu").contiguous()
    data = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    return pb.Tensor(data=data, shape=list(tensor.shape), dtype=_NAMES[tensor.dtype])


def decode_tensor(message: pb.Tensor, name: str = "tensor") -> torch.Tensor:
    """Message -> tensor; raises CodecError on any mismatch.

    The tensor is a view of the message's bytes, except for INT8_NAME: a new float32 tensor."""
    if message.dtype == INT8_NAME:
        shape = list(message.shape)
        _check_shape(shape, name)
        return _decode_int8_blocks(message.data, shape, name)
    return view_bytes(message.data, list(message.shape), message.dtype, name)


def _check_shape(shape: list[int], name: str) -> None:
    """At most 8 dimensions, none negative, and no more elements than a message can carry, even where a
    zero makes the tensor empty (torch cannot lay out [0, 2, 2**62]: its strides overflow)."""
    span = 1
    for size in shape:
        span *= size or 1
    if len(shape) > 8 or any(size < 0 for size in shape) or span > MAX_MESSAGE_BYTES:
        raise CodecError(f"{name}: invalid shape {shape}")


def view_bytes(data: bytes, shape: list[int], dtype_name: str, name: str = "tensor") -> torch.Tensor:
    """A read-only tensor over `data` (no copy), after checking that the bytes fit the shape and dtype."""
    dtype = WIRE_DTYPES.get(dtype_name)
    if dtype is None:
        raise CodecError(f"{name}: unknown dtype {dtype_name!r}")
    _check_shape(shape, name)
    numel = 1
    for size in shape:
        numel *= size
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) != numel * itemsize:
        raise CodecError(f"{name}: {len(data)} bytes do not hold shape {shape} of {dtype_name}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # the bytes are immutable; we never write into the view
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=dtype).view(shape)


def optional_tensor(message, field: str) -> torch.Tensor | None:
    return decode_tensor(getattr(message, field), field) if message.HasField(field) else None


def pack_metadata(data: dict) -> bytes:
    return msgpack.packb(data, use_bin_type=True)


MAX_METADATA_BYTES = 64 * 1024  # a metadata map on the wire, at most


def unpack_metadata(blob: bytes) -> dict:
    """A msgpack map with string keys (at most MAX_METADATA_BYTES); CodecError for anything else."""
    if not blob:
        return {}
    if len(blob) > MAX_METADATA_BYTES:
        raise CodecError(f"metadata of {len(blob)} bytes exceeds the limit of {MAX_METADATA_BYTES}")
    try:
        data = msgpack.unpackb(blob, raw=False)
    except Exception as error:  # msgpack raises several unrelated types
        raise CodecError(f"metadata is not valid msgpack: {error}") from error
    if not isinstance(data, dict):
        raise CodecError("metadata must be a msgpack map")
    if not all(isinstance(key, str) for key in data):
        raise CodecError("metadata keys must be strings")
    return data
