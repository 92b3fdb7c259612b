from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MessageKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESSAGE_KIND_UNSPECIFIED: _ClassVar[MessageKind]
    MESSAGE_KIND_HELLO: _ClassVar[MessageKind]
    MESSAGE_KIND_FORWARD: _ClassVar[MessageKind]
    MESSAGE_KIND_FORWARD_RESULT: _ClassVar[MessageKind]
    MESSAGE_KIND_BACKWARD: _ClassVar[MessageKind]
    MESSAGE_KIND_BACKWARD_RESULT: _ClassVar[MessageKind]
    MESSAGE_KIND_EVAL_FORWARD: _ClassVar[MessageKind]
    MESSAGE_KIND_OPTIMIZER_STEP: _ClassVar[MessageKind]
    MESSAGE_KIND_ACK: _ClassVar[MessageKind]
    MESSAGE_KIND_GET_GRADS: _ClassVar[MessageKind]
    MESSAGE_KIND_GRADS: _ClassVar[MessageKind]
    MESSAGE_KIND_GET_WEIGHTS: _ClassVar[MessageKind]
    MESSAGE_KIND_WEIGHTS: _ClassVar[MessageKind]
    MESSAGE_KIND_RELEASE: _ClassVar[MessageKind]
    MESSAGE_KIND_ERROR: _ClassVar[MessageKind]
    MESSAGE_KIND_GET_GRAD_NORM: _ClassVar[MessageKind]
    MESSAGE_KIND_GRAD_NORM: _ClassVar[MessageKind]
    MESSAGE_KIND_PERTURB: _ClassVar[MessageKind]
    MESSAGE_KIND_APPLY_DIRECTIONAL: _ClassVar[MessageKind]
    MESSAGE_KIND_ALIGNMENT: _ClassVar[MessageKind]
    MESSAGE_KIND_DIRECTIONAL_RESULT: _ClassVar[MessageKind]
    MESSAGE_KIND_CHAIN_FORWARD: _ClassVar[MessageKind]
    MESSAGE_KIND_CHAIN_BACKWARD: _ClassVar[MessageKind]
    MESSAGE_KIND_AWAIT_FORWARD: _ClassVar[MessageKind]
    MESSAGE_KIND_AWAIT_BACKWARD: _ClassVar[MessageKind]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[Compression]
    COMPRESSION_FP16: _ClassVar[Compression]
    COMPRESSION_INT8: _ClassVar[Compression]
MESSAGE_KIND_UNSPECIFIED: MessageKind
MESSAGE_KIND_HELLO: MessageKind
MESSAGE_KIND_FORWARD: MessageKind
MESSAGE_KIND_FORWARD_RESULT: MessageKind
MESSAGE_KIND_BACKWARD: MessageKind
MESSAGE_KIND_BACKWARD_RESULT: MessageKind
MESSAGE_KIND_EVAL_FORWARD: MessageKind
MESSAGE_KIND_OPTIMIZER_STEP: MessageKind
MESSAGE_KIND_ACK: MessageKind
MESSAGE_KIND_GET_GRADS: MessageKind
MESSAGE_KIND_GRADS: MessageKind
MESSAGE_KIND_GET_WEIGHTS: MessageKind
MESSAGE_KIND_WEIGHTS: MessageKind
MESSAGE_KIND_RELEASE: MessageKind
MESSAGE_KIND_ERROR: MessageKind
MESSAGE_KIND_GET_GRAD_NORM: MessageKind
MESSAGE_KIND_GRAD_NORM: MessageKind
MESSAGE_KIND_PERTURB: MessageKind
MESSAGE_KIND_APPLY_DIRECTIONAL: MessageKind
MESSAGE_KIND_ALIGNMENT: MessageKind
MESSAGE_KIND_DIRECTIONAL_RESULT: MessageKind
MESSAGE_KIND_CHAIN_FORWARD: MessageKind
MESSAGE_KIND_CHAIN_BACKWARD: MessageKind
MESSAGE_KIND_AWAIT_FORWARD: MessageKind
MESSAGE_KIND_AWAIT_BACKWARD: MessageKind
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT64: DType
DTYPE_INT64: DType
DTYPE_INT32: DType
DTYPE_INT16: DType
DTYPE_INT8: DType
DTYPE_UINT8: DType
DTYPE_BOOL: DType
COMPRESSION_NONE: Compression
COMPRESSION_FP16: Compression
COMPRESSION_INT8: Compression

class TensorMeta(_message.Message):
    __slots__ = ("name", "dtype", "shape", "compression", "nbytes", "original_dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    compression: Compression
    nbytes: int
    original_dtype: DType
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., compression: _Optional[_Union[Compression, str]] = ..., nbytes: _Optional[int] = ..., original_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class FrameHeader(_message.Message):
    __slots__ = ("version", "kind", "request_id", "run_id", "step", "micro_batch", "stage", "tensors", "error_code", "error_message", "options", "padding")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    version: int
    kind: MessageKind
    request_id: int
    run_id: str
    step: int
    micro_batch: int
    stage: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorMeta]
    error_code: str
    error_message: str
    options: _containers.ScalarMap[str, str]
    padding: bytes
    def __init__(self, version: _Optional[int] = ..., kind: _Optional[_Union[MessageKind, str]] = ..., request_id: _Optional[int] = ..., run_id: _Optional[str] = ..., step: _Optional[int] = ..., micro_batch: _Optional[int] = ..., stage: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorMeta, _Mapping]]] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., options: _Optional[_Mapping[str, str]] = ..., padding: _Optional[bytes] = ...) -> None: ...
