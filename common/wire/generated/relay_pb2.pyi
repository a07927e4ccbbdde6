from common.wire.generated import potluck_pb2 as _potluck_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Frame(_message.Message):
    __slots__ = ("conn", "data", "open", "close", "address", "peer", "challenge", "record", "proof")
    CONN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    conn: int
    data: bytes
    open: bool
    close: bool
    address: str
    peer: str
    challenge: bytes
    record: _potluck_pb2.SignedRecord
    proof: bytes
    def __init__(self, conn: _Optional[int] = ..., data: _Optional[bytes] = ..., open: _Optional[bool] = ..., close: _Optional[bool] = ..., address: _Optional[str] = ..., peer: _Optional[str] = ..., challenge: _Optional[bytes] = ..., record: _Optional[_Union[_potluck_pb2.SignedRecord, _Mapping]] = ..., proof: _Optional[bytes] = ...) -> None: ...
