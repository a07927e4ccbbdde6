from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Frame(_message.Message):
    __slots__ = ("conn", "data", "open", "close", "address")
    CONN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    conn: int
    data: bytes
    open: bool
    close: bool
    address: str
    def __init__(self, conn: _Optional[int] = ..., data: _Optional[bytes] = ..., open: _Optional[bool] = ..., close: _Optional[bool] = ..., address: _Optional[str] = ...) -> None: ...
