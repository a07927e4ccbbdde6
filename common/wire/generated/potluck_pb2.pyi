from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("protocol_version", "node_id", "model_id", "config_hash", "start", "end", "num_layers", "hidden_size", "dtype", "device", "free_cache_tokens", "max_length", "metadata")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    FREE_CACHE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    node_id: str
    model_id: str
    config_hash: str
    start: int
    end: int
    num_layers: int
    hidden_size: int
    dtype: str
    device: str
    free_cache_tokens: int
    max_length: int
    metadata: bytes
    def __init__(self, protocol_version: _Optional[int] = ..., node_id: _Optional[str] = ..., model_id: _Optional[str] = ..., config_hash: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., free_cache_tokens: _Optional[int] = ..., max_length: _Optional[int] = ..., metadata: _Optional[bytes] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("session_id", "start", "end", "max_length", "batch_size", "wire_dtype", "metadata")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start: int
    end: int
    max_length: int
    batch_size: int
    wire_dtype: str
    metadata: bytes
    def __init__(self, session_id: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., max_length: _Optional[int] = ..., batch_size: _Optional[int] = ..., wire_dtype: _Optional[str] = ..., metadata: _Optional[bytes] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("hidden", "position_ids", "attention_mask", "position", "step_id", "push", "prompts", "convoy", "convoy_size")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    CONVOY_FIELD_NUMBER: _ClassVar[int]
    CONVOY_SIZE_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    position: int
    step_id: int
    push: _containers.RepeatedCompositeFieldContainer[PushTarget]
    prompts: Tensor
    convoy: int
    convoy_size: int
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., position: _Optional[int] = ..., step_id: _Optional[int] = ..., push: _Optional[_Iterable[_Union[PushTarget, _Mapping]]] = ..., prompts: _Optional[_Union[Tensor, _Mapping]] = ..., convoy: _Optional[int] = ..., convoy_size: _Optional[int] = ...) -> None: ...

class PushTarget(_message.Message):
    __slots__ = ("address", "session_id", "timeout")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    address: str
    session_id: str
    timeout: float
    def __init__(self, address: _Optional[str] = ..., session_id: _Optional[str] = ..., timeout: _Optional[float] = ...) -> None: ...

class CloseSession(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("open", "step", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    step: Step
    close: CloseSession
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., step: _Optional[_Union[Step, _Mapping]] = ..., close: _Optional[_Union[CloseSession, _Mapping]] = ...) -> None: ...

class Opened(_message.Message):
    __slots__ = ("session_id", "max_length", "push")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_length: int
    push: bool
    def __init__(self, session_id: _Optional[str] = ..., max_length: _Optional[int] = ..., push: _Optional[bool] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("hidden", "step_id", "position", "compute_ms", "push_error", "convoy", "convoy_size", "refused", "retry_after_ms")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    PUSH_ERROR_FIELD_NUMBER: _ClassVar[int]
    CONVOY_FIELD_NUMBER: _ClassVar[int]
    CONVOY_SIZE_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    step_id: int
    position: int
    compute_ms: float
    push_error: str
    convoy: int
    convoy_size: int
    refused: str
    retry_after_ms: int
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., step_id: _Optional[int] = ..., position: _Optional[int] = ..., compute_ms: _Optional[float] = ..., push_error: _Optional[str] = ..., convoy: _Optional[int] = ..., convoy_size: _Optional[int] = ..., refused: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class SessionReply(_message.Message):
    __slots__ = ("opened", "result")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    opened: Opened
    result: StepResult
    def __init__(self, opened: _Optional[_Union[Opened, _Mapping]] = ..., result: _Optional[_Union[StepResult, _Mapping]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("start", "end", "hidden", "position_ids", "attention_mask", "wire_dtype", "metadata", "prompts")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    hidden: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    wire_dtype: str
    metadata: bytes
    prompts: Tensor
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., wire_dtype: _Optional[str] = ..., metadata: _Optional[bytes] = ..., prompts: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("hidden",)
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("start", "end", "hidden", "grad_output", "position_ids", "attention_mask", "prompts", "wire_dtype", "metadata")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    hidden: Tensor
    grad_output: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    prompts: Tensor
    wire_dtype: str
    metadata: bytes
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., grad_output: _Optional[_Union[Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., prompts: _Optional[_Union[Tensor, _Mapping]] = ..., wire_dtype: _Optional[str] = ..., metadata: _Optional[bytes] = ...) -> None: ...

class BackwardReply(_message.Message):
    __slots__ = ("grad_input", "grad_prompts")
    GRAD_INPUT_FIELD_NUMBER: _ClassVar[int]
    GRAD_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    grad_input: Tensor
    grad_prompts: Tensor
    def __init__(self, grad_input: _Optional[_Union[Tensor, _Mapping]] = ..., grad_prompts: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("session_id", "step")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: Step
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[_Union[Step, _Mapping]] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PushManyRequest(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[PushRequest]
    def __init__(self, steps: _Optional[_Iterable[_Union[PushRequest, _Mapping]]] = ...) -> None: ...

class PushOutcome(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class PushManyReply(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[PushOutcome]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[PushOutcome, _Mapping]]] = ...) -> None: ...

class SignedRecord(_message.Message):
    __slots__ = ("payload", "public_key", "signature")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    public_key: bytes
    signature: bytes
    def __init__(self, payload: _Optional[bytes] = ..., public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class GossipRequest(_message.Message):
    __slots__ = ("records", "strikes", "anti_entropy", "digest", "model", "push_only")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    STRIKES_FIELD_NUMBER: _ClassVar[int]
    ANTI_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PUSH_ONLY_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[SignedRecord]
    strikes: _containers.RepeatedCompositeFieldContainer[SignedRecord]
    anti_entropy: bool
    digest: bytes
    model: str
    push_only: bool
    def __init__(self, records: _Optional[_Iterable[_Union[SignedRecord, _Mapping]]] = ..., strikes: _Optional[_Iterable[_Union[SignedRecord, _Mapping]]] = ..., anti_entropy: _Optional[bool] = ..., digest: _Optional[bytes] = ..., model: _Optional[str] = ..., push_only: _Optional[bool] = ...) -> None: ...

class GossipReply(_message.Message):
    __slots__ = ("records", "strikes", "wanted", "more", "node_id")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    STRIKES_FIELD_NUMBER: _ClassVar[int]
    WANTED_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[SignedRecord]
    strikes: _containers.RepeatedCompositeFieldContainer[SignedRecord]
    wanted: bytes
    more: bool
    node_id: str
    def __init__(self, records: _Optional[_Iterable[_Union[SignedRecord, _Mapping]]] = ..., strikes: _Optional[_Iterable[_Union[SignedRecord, _Mapping]]] = ..., wanted: _Optional[bytes] = ..., more: _Optional[bool] = ..., node_id: _Optional[str] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("address",)
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    address: str
    def __init__(self, address: _Optional[str] = ...) -> None: ...

class ProbeReply(_message.Message):
    __slots__ = ("reachable", "detail", "time")
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    reachable: bool
    detail: str
    time: float
    def __init__(self, reachable: _Optional[bool] = ..., detail: _Optional[str] = ..., time: _Optional[float] = ...) -> None: ...

class ModelFileRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ModelFileChunk(_message.Message):
    __slots__ = ("data", "size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    size: int
    def __init__(self, data: _Optional[bytes] = ..., size: _Optional[int] = ...) -> None: ...
