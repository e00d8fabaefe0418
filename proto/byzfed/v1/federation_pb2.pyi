from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Credentials(_message.Message):
    __slots__ = ("node_name", "node_secret", "federation_token")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_SECRET_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    node_secret: str
    federation_token: str
    def __init__(self, node_name: _Optional[str] = ..., node_secret: _Optional[str] = ..., federation_token: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("credentials", "num_samples", "device", "cpu_cores", "protocol_version")
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    credentials: Credentials
    num_samples: int
    device: str
    cpu_cores: int
    protocol_version: int
    def __init__(self, credentials: _Optional[_Union[Credentials, _Mapping]] = ..., num_samples: _Optional[int] = ..., device: _Optional[str] = ..., cpu_cores: _Optional[int] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("node_id", "session_token", "lease_seconds", "layout_json", "layout_hash", "ingest_address", "workload_json", "rejoined", "current_round")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_JSON_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    INGEST_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    REJOINED_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    session_token: str
    lease_seconds: float
    layout_json: str
    layout_hash: str
    ingest_address: str
    workload_json: str
    rejoined: bool
    current_round: int
    def __init__(self, node_id: _Optional[str] = ..., session_token: _Optional[str] = ..., lease_seconds: _Optional[float] = ..., layout_json: _Optional[str] = ..., layout_hash: _Optional[str] = ..., ingest_address: _Optional[str] = ..., workload_json: _Optional[str] = ..., rejoined: _Optional[bool] = ..., current_round: _Optional[int] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("node_id", "session_token")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    session_token: str
    def __init__(self, node_id: _Optional[str] = ..., session_token: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("session", "received_round")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_ROUND_FIELD_NUMBER: _ClassVar[int]
    session: Session
    received_round: int
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ..., received_round: _Optional[int] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("lease_seconds", "current_round", "selected", "shutdown", "upload_nonce", "session_token")
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_NONCE_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    lease_seconds: float
    current_round: int
    selected: bool
    shutdown: bool
    upload_nonce: str
    session_token: str
    def __init__(self, lease_seconds: _Optional[float] = ..., current_round: _Optional[int] = ..., selected: _Optional[bool] = ..., shutdown: _Optional[bool] = ..., upload_nonce: _Optional[str] = ..., session_token: _Optional[str] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("session", "reason")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session: Session
    reason: str
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("session", "wait_seconds")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session: Session
    wait_seconds: float
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("dtype", "num_bytes", "crc32", "shape")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    num_bytes: int
    crc32: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dtype: _Optional[str] = ..., num_bytes: _Optional[int] = ..., crc32: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("kind", "round", "model_version", "deadline_unix", "train_json", "layout_hash", "weights", "upload_nonce")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        WAIT: _ClassVar[TaskHeader.Kind]
        TRAIN: _ClassVar[TaskHeader.Kind]
        SHUTDOWN: _ClassVar[TaskHeader.Kind]
    WAIT: TaskHeader.Kind
    TRAIN: TaskHeader.Kind
    SHUTDOWN: TaskHeader.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    TRAIN_JSON_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_NONCE_FIELD_NUMBER: _ClassVar[int]
    kind: TaskHeader.Kind
    round: int
    model_version: int
    deadline_unix: float
    train_json: str
    layout_hash: str
    weights: TensorHeader
    upload_nonce: str
    def __init__(self, kind: _Optional[_Union[TaskHeader.Kind, str]] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ..., deadline_unix: _Optional[float] = ..., train_json: _Optional[str] = ..., layout_hash: _Optional[str] = ..., weights: _Optional[_Union[TensorHeader, _Mapping]] = ..., upload_nonce: _Optional[str] = ...) -> None: ...

class TaskChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: TaskHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[TaskHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("session", "round", "model_version", "layout_hash", "num_samples", "tensor", "upload_nonce")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_NONCE_FIELD_NUMBER: _ClassVar[int]
    session: Session
    round: int
    model_version: int
    layout_hash: str
    num_samples: int
    tensor: TensorHeader
    upload_nonce: str
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ..., layout_hash: _Optional[str] = ..., num_samples: _Optional[int] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., upload_nonce: _Optional[str] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushUpdateReply(_message.Message):
    __slots__ = ("accepted", "round", "bytes_received", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    round: int
    bytes_received: int
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., round: _Optional[int] = ..., bytes_received: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...
