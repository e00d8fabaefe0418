from proto.byzfed.v1 import federation_pb2 as _federation_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetHonestUpdatesRequest(_message.Message):
    __slots__ = ("adversary_token", "session", "round", "wait_seconds")
    ADVERSARY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    adversary_token: str
    session: _federation_pb2.Session
    round: int
    wait_seconds: float
    def __init__(self, adversary_token: _Optional[str] = ..., session: _Optional[_Union[_federation_pb2.Session, _Mapping]] = ..., round: _Optional[int] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class HonestUpdatesHeader(_message.Message):
    __slots__ = ("round", "rows", "expected", "tensor")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    round: int
    rows: int
    expected: int
    tensor: _federation_pb2.TensorHeader
    def __init__(self, round: _Optional[int] = ..., rows: _Optional[int] = ..., expected: _Optional[int] = ..., tensor: _Optional[_Union[_federation_pb2.TensorHeader, _Mapping]] = ...) -> None: ...

class HonestUpdatesChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: HonestUpdatesHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[HonestUpdatesHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...
