"""The only module that knows how tensors and metadata look on the wire."""

from __future__ import annotations

import warnings

import msgpack
import torch

from node.rpc.generated import potluck_pb2 as pb

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

WIRE_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
FLOAT_WIRE_DTYPES = ("float32", "bfloat16", "float16")
_NAMES = {dtype: name for name, dtype in WIRE_DTYPES.items()}


class CodecError(ValueError):
    """A message that does not decode into a valid tensor."""


def wire_dtype(name: str) -> torch.dtype:
    if name not in FLOAT_WIRE_DTYPES:
        raise CodecError(f"wire dtype {name!r} is not one of {', '.join(FLOAT_WIRE_DTYPES)}")
    return WIRE_DTYPES[name]


def encode_hidden(tensor: torch.Tensor, wire: str) -> pb.Tensor:
    """Hidden states -> message in the session's wire format (a name from FLOAT_WIRE_DTYPES)."""
    return encode_tensor(tensor, wire_dtype(wire))


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
    """Message -> tensor; raises CodecError on any mismatch. The tensor is a view of the message's bytes."""
    return view_bytes(message.data, list(message.shape), message.dtype, name)


def view_bytes(data: bytes, shape: list[int], dtype_name: str, name: str = "tensor") -> torch.Tensor:
    """A read-only tensor over `data` (no copy), after checking that the bytes fit the shape and dtype."""
    dtype = WIRE_DTYPES.get(dtype_name)
    if dtype is None:
        raise CodecError(f"{name}: unknown dtype {dtype_name!r}")
    if any(size < 0 for size in shape) or len(shape) > 8:
        raise CodecError(f"{name}: invalid shape {shape}")
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


def unpack_metadata(blob: bytes) -> dict:
    if not blob:
        return {}
    try:
        data = msgpack.unpackb(blob, raw=False)
    except Exception as error:  # msgpack raises several unrelated types
        raise CodecError(f"metadata is not valid msgpack: {error}") from error
    if not isinstance(data, dict):
        raise CodecError("metadata must be a msgpack map")
    return data


def encode_records(records) -> list[pb.SignedRecord]:
    """node.swarm.records.SignedRecord -> messages."""
    return [pb.SignedRecord(payload=r.payload, public_key=r.public_key, signature=r.signature) for r in records]


def decode_records(messages) -> list:
    """Messages -> node.swarm.records.SignedRecord (verification is the registry's job)."""
    from node.swarm.records import SignedRecord

    return [SignedRecord(payload=m.payload, public_key=m.public_key, signature=m.signature) for m in messages]
