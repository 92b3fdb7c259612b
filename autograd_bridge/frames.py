"""Encode and decode one frame: a protobuf header plus the raw bytes of its tensors.

A frame on the wire (declared in ``proto/bridge.proto``)::

    b"TTN1" | header length (uint32, little-endian) | FrameHeader | payload 0 | payload 1 | ...

Tensor bytes stay outside protobuf: :func:`encode_frame` hands them to the transport as views of
the tensors' own memory, and :func:`decode_frame` views them in the received buffer when it may.
Protobuf types never leave this module; callers build and receive :class:`Frame` dataclasses.

Everything in a received frame is checked against :class:`FrameLimits` before anything is
allocated for it. Problems raise :class:`~autograd_bridge.errors.FrameError` (or its subclass
``FrameTooLargeError``) naming the field, what was expected and what arrived. Nothing here
unpickles or ``torch.load``\\ s anything.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Literal, cast, get_args

import torch
from google.protobuf.message import DecodeError

from autograd_bridge.errors import FrameError, FrameTooLargeError
from proto import bridge_pb2 as pb

__all__ = [
    "COMPRESSIONS",
    "FRAME_VERSION",
    "MAGIC",
    "Compression",
    "Frame",
    "FrameLimits",
    "MessageKind",
    "decode_frame",
    "encode_frame",
    "encoded_nbytes",
    "error_frame",
]

MAGIC = b"TTN1"
FRAME_VERSION = 1
_PREFIX = struct.Struct("<4sI")  # magic, header length
_PAYLOAD_ALIGNMENT = 8  # the encoder pads the header so the first payload starts here

_KiB = 1 << 10
_MiB = 1 << 20
_GiB = 1 << 30
_UINT32_MAX = (1 << 32) - 1
_UINT64_MAX = (1 << 64) - 1


class MessageKind(enum.IntEnum):
    """What a frame asks for or answers; the numbers are those of ``titanic.bridge.MessageKind``."""

    UNSPECIFIED = 0  # never sent; decode rejects it
    HELLO = 1
    FORWARD = 2
    FORWARD_RESULT = 3
    BACKWARD = 4
    BACKWARD_RESULT = 5
    EVAL_FORWARD = 6
    OPTIMIZER_STEP = 7
    ACK = 8
    GET_GRADS = 9
    GRADS = 10
    GET_WEIGHTS = 11
    WEIGHTS = 12
    RELEASE = 13
    ERROR = 14
    GET_GRAD_NORM = 15
    GRAD_NORM = 16
    PERTURB = 20
    APPLY_DIRECTIONAL = 21
    ALIGNMENT = 22
    DIRECTIONAL_RESULT = 23
    CHAIN_FORWARD = 30
    CHAIN_BACKWARD = 31
    AWAIT_FORWARD = 32
    AWAIT_BACKWARD = 33


Compression = Literal["none", "fp16", "int8"]
_COMPRESSIONS: tuple[str, ...] = get_args(Compression)
COMPRESSIONS = _COMPRESSIONS  # every Compression, for settings that name one


@dataclass(frozen=True, slots=True, kw_only=True)
class Frame:
    """One message between stage hosts, as the rest of the bridge sees it.

    Decoded tensors may share memory with the buffer they were decoded from; encoded tensors
    are read in place, so do not modify them until the encoded parts have been sent.
    """

    kind: MessageKind
    request_id: int = 0  # chosen by the requester (uint64); a response echoes it
    run_id: str = ""  # training run the frame belongs to
    step: int = 0  # optimizer step (uint64)
    micro_batch: int = 0  # micro-batch index within the step (uint32)
    stage: int = 0  # pipeline stage the frame is about (uint32)
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)  # sent in this order
    options: Mapping[str, str] = field(default_factory=dict)  # small settings, e.g. {"lr": "1e-4"}
    error_code: str = ""  # machine-readable cause on ERROR frames, e.g. "STATE_LIMIT"
    error_message: str = ""  # what went wrong and what to do about it


@dataclass(frozen=True, slots=True, kw_only=True)
class FrameLimits:
    """Bounds a received frame must respect; checked before anything is allocated for it."""

    # Whole frame, prefix and header included. Transports should refuse to buffer more than this.
    max_frame_bytes: int = 2 * _GiB
    # Serialized FrameHeader: metadata only, but a GRADS/WEIGHTS frame names every parameter.
    max_header_bytes: int = 1 * _MiB
    # Tensors in one frame (a WEIGHTS frame of a stage holds one per parameter: ~9 per block).
    max_tensors: int = 4096
    # Dimensions of one tensor.
    max_ndim: int = 8
    # Characters in a tensor name or an option key.
    max_name_length: int = 256
    # Entries in FrameHeader.options.
    max_options: int = 64
    # Bytes of one tensor after decoding (in its original dtype, so int8 payloads count 4x for
    # float32). Also caps every single dimension, which no non-empty tensor can exceed.
    max_tensor_bytes: int = 2 * _GiB
    # Bytes of all tensors of a frame after decoding; bounds what decompression may allocate.
    max_decoded_bytes: int = 4 * _GiB

    def __post_init__(self) -> None:
        for limit in fields(self):
            value = getattr(self, limit.name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"FrameLimits.{limit.name} must be a positive int, got {value!r}")
        if self.max_header_bytes > min(self.max_frame_bytes, _UINT32_MAX):
            raise ValueError(
                f"FrameLimits.max_header_bytes ({self.max_header_bytes}) must not exceed "
                f"max_frame_bytes ({self.max_frame_bytes}) or 2**32 - 1; lower it"
            )


# Wire dtypes. bool travels as one byte per element, 0 or 1.
_DTYPE_TO_WIRE: dict[torch.dtype, pb.DType] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float64: pb.DTYPE_FLOAT64,
    torch.int64: pb.DTYPE_INT64,
    torch.int32: pb.DTYPE_INT32,
    torch.int16: pb.DTYPE_INT16,
    torch.int8: pb.DTYPE_INT8,
    torch.uint8: pb.DTYPE_UINT8,
    torch.bool: pb.DTYPE_BOOL,
}
_WIRE_TO_DTYPE: dict[int, torch.dtype] = {wire: dtype for dtype, wire in _DTYPE_TO_WIRE.items()}
_COMPRESSION_TO_WIRE: dict[str, pb.Compression] = {
    "none": pb.COMPRESSION_NONE,
    "fp16": pb.COMPRESSION_FP16,
    "int8": pb.COMPRESSION_INT8,
}
_WIRE_TO_COMPRESSION: dict[int, str] = {wire: name for name, wire in _COMPRESSION_TO_WIRE.items()}
# For error messages: "1 (torch.float32), 2 (torch.float16), ..."
_KNOWN_DTYPES = ", ".join(f"{wire} ({dtype})" for wire, dtype in _WIRE_TO_DTYPE.items())
_KNOWN_COMPRESSIONS = ", ".join(f"{wire} ({name})" for wire, name in _WIRE_TO_COMPRESSION.items())
_SCALE_DTYPE = torch.float32  # int8 compression: one scale per row, in this dtype
_FP16_MAX = torch.finfo(torch.float16).max  # 65504
_INT8_LEVEL = 127  # int8 compression maps a row's absmax to +-127 (symmetric, -128 unused)
# Looked up by name, so importing this module fails if the two enums ever drift apart.
_KIND_TO_WIRE: dict[MessageKind, pb.MessageKind] = {
    kind: cast(pb.MessageKind, pb.MessageKind.Value(f"MESSAGE_KIND_{kind.name}")) for kind in MessageKind
}
_SENDABLE_KINDS = frozenset(int(kind) for kind in MessageKind if kind is not MessageKind.UNSPECIFIED)


# ---------------------------------------------------------------------------------------------
# encode


def encode_frame(frame: Frame, *, compression: Compression = "none") -> list[bytes | memoryview]:
    """Serialize ``frame``; the concatenation of the returned parts is the frame.

    The first part is the prefix and header; the rest are payload bytes, views of the tensors'
    memory where the tensor is already a contiguous CPU tensor (others are made so first).
    ``compression`` applies to floating tensors only: ``"fp16"`` halves float32/float64 tensors
    (a tensor that would overflow float16 is sent uncompressed), ``"int8"`` sends one byte per
    element plus a float32 scale per row of the last dimension (a tensor with inf or NaN is
    sent uncompressed). A tensor may contribute more than one part, or none when empty.
    """
    if compression not in _COMPRESSIONS:
        raise ValueError(f"compression must be one of {_COMPRESSIONS}, got {compression!r}")
    header = _header_of(frame)
    payload: list[bytes | memoryview] = []
    for name, tensor in frame.tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        payload.extend(_encode_tensor(name, tensor, compression, header.tensors.add()))
    _pad_header(header)
    header_bytes = header.SerializeToString()
    return [_PREFIX.pack(MAGIC, len(header_bytes)) + header_bytes, *payload]


def encoded_nbytes(parts: Sequence[bytes | memoryview]) -> int:
    """Total size in bytes of the frame made of ``parts`` (as returned by :func:`encode_frame`)."""
    return sum(part.nbytes if isinstance(part, memoryview) else len(part) for part in parts)


def error_frame(request: Frame | None, code: str, message: str) -> Frame:
    """An ERROR frame answering ``request`` (its ids echoed), or unsolicited when it is None."""
    if not code:
        raise ValueError("error_frame needs a non-empty code, e.g. 'BAD_FRAME' or 'INTERNAL'")
    if request is None:
        return Frame(kind=MessageKind.ERROR, error_code=code, error_message=message)
    return Frame(
        kind=MessageKind.ERROR,
        request_id=request.request_id,
        run_id=request.run_id,
        step=request.step,
        micro_batch=request.micro_batch,
        stage=request.stage,
        error_code=code,
        error_message=message,
    )


def _header_of(frame: Frame) -> pb.FrameHeader:
    """The FrameHeader of ``frame`` without tensors; ValueError names any field out of range."""
    try:
        kind = MessageKind(frame.kind)
    except ValueError:
        raise ValueError(f"Frame.kind must be a MessageKind, got {frame.kind!r}") from None
    if kind is MessageKind.UNSPECIFIED:
        raise ValueError("Frame.kind is UNSPECIFIED; set the kind of message being sent")
    for name, value, top in (
        ("request_id", frame.request_id, _UINT64_MAX),
        ("step", frame.step, _UINT64_MAX),
        ("micro_batch", frame.micro_batch, _UINT32_MAX),
        ("stage", frame.stage, _UINT32_MAX),
    ):
        if not isinstance(value, int) or not 0 <= value <= top:
            raise ValueError(f"Frame.{name} must be an int in [0, {top}], got {value!r}")
    header = pb.FrameHeader(
        version=FRAME_VERSION,
        kind=_KIND_TO_WIRE[kind],
        request_id=frame.request_id,
        run_id=frame.run_id,
        step=frame.step,
        micro_batch=frame.micro_batch,
        stage=frame.stage,
        error_code=frame.error_code,
        error_message=frame.error_message,
    )
    if "" in frame.options:
        raise ValueError("Frame.options has an empty key; give every option a name")
    try:
        header.options.update(frame.options)
    except TypeError as error:
        raise ValueError(f"Frame.options must map str to str: {error}") from error
    return header


def _pad_header(header: pb.FrameHeader) -> None:
    """Set ``header.padding`` so that prefix + header is a multiple of 8 bytes long."""
    size = _PREFIX.size + header.ByteSize()
    if size % _PAYLOAD_ALIGNMENT == 0:
        return
    # The padding field costs 2 bytes (tag, length < 128) plus its contents. An empty bytes
    # field is not serialized in proto3, so a needed 0 becomes a full 8.
    pad = (-(size + 2)) % _PAYLOAD_ALIGNMENT or _PAYLOAD_ALIGNMENT
    header.padding = bytes(pad)


def _encode_tensor(
    name: str, tensor: torch.Tensor, compression: str, meta: pb.TensorMeta
) -> list[memoryview]:
    """Fill ``meta`` for ``tensor``; return its payload parts, views of it or of its compressed form."""
    wire = _DTYPE_TO_WIRE.get(tensor.dtype)
    if wire is None:
        supported = ", ".join(str(dtype) for dtype in _DTYPE_TO_WIRE)
        raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which frames cannot carry ({supported})")
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    meta.name = name
    meta.shape.extend(tensor.shape)
    if tensor.numel() > 0 and tensor.is_floating_point():
        if compression == "fp16" and tensor.element_size() > 2:
            half = _to_fp16(tensor)
            if half is not None:
                meta.dtype = pb.DTYPE_FLOAT16
                meta.original_dtype = wire
                meta.compression = pb.COMPRESSION_FP16
                meta.nbytes = half.numel() * 2
                return [_byte_view(half)]
        elif compression == "int8":
            quantized = _quantize_int8(tensor)
            if quantized is not None:
                scales, values = quantized
                meta.dtype = pb.DTYPE_INT8
                meta.original_dtype = wire
                meta.compression = pb.COMPRESSION_INT8
                meta.nbytes = scales.numel() * _SCALE_DTYPE.itemsize + values.numel()
                return [_byte_view(scales), _byte_view(values)]
    meta.dtype = wire
    meta.compression = pb.COMPRESSION_NONE
    meta.nbytes = tensor.numel() * tensor.element_size()
    return [_byte_view(tensor)] if tensor.numel() > 0 else []


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a flat memoryview of the same memory."""
    # reshape(-1) and view(uint8) are views for a contiguous tensor; numpy cannot hold bf16
    # but holds its bytes. The memoryview keeps the array, and the array the tensor, alive.
    # numpy's stubs declare the buffer protocol only for Python >= 3.12, hence the ignore.
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def _to_fp16(tensor: torch.Tensor) -> torch.Tensor | None:
    """``tensor`` cast to float16, or None where a finite value would become inf."""
    low, high = torch.aminmax(tensor)
    # Within float16's range nothing can overflow. A NaN bound (NaN in the tensor) fails this
    # comparison too and takes the exact check, which is slower (isinf on float16 is not fast).
    if max(-float(low), float(high)) <= _FP16_MAX:
        return tensor.to(torch.float16)
    half = tensor.to(torch.float16)
    if bool((torch.isinf(half) & torch.isfinite(tensor)).any()):
        return None
    return half


def _rows_and_columns(shape: Sequence[int], numel: int) -> tuple[int, int]:
    """Rows and row length for int8 scales: the last dimension is a row; a 0-d tensor is 1x1."""
    columns = shape[-1] if len(shape) > 0 else 1
    return numel // columns, columns


def _quantize_int8(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scales (R,) float32, values (R, C) int8) for a non-empty float tensor, or None if not finite."""
    rows, columns = _rows_and_columns(tensor.shape, tensor.numel())
    x = tensor.reshape(rows, columns).to(torch.float32)  # (R, C)
    low, high = torch.aminmax(x, dim=1)  # (R,), (R,)
    scales = torch.maximum(high, -low) / _INT8_LEVEL  # (R,)
    if not bool(torch.isfinite(scales).all()):  # inf/NaN inside, or float64 beyond float32
        return None
    # An all-zero row has scale 0; divide it by 1 instead so its values quantize to 0.
    divisors = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(1)  # (R, 1)
    values = torch.div(x, divisors).round_().clamp_(-_INT8_LEVEL, _INT8_LEVEL).to(torch.int8)
    return scales, values


# ---------------------------------------------------------------------------------------------
# decode


@dataclass(frozen=True, slots=True)
class _TensorLayout:
    """Where one validated tensor lies in the frame and how to rebuild it."""

    name: str
    wire_dtype: torch.dtype  # dtype of the payload bytes
    dtype: torch.dtype  # dtype of the decoded tensor
    shape: tuple[int, ...]
    compression: str
    offset: int  # from the start of the frame
    nbytes: int


def decode_frame(data: bytes | bytearray | memoryview, *, limits: FrameLimits = FrameLimits()) -> Frame:
    """Parse and validate one whole frame; raise FrameError saying what is wrong with it.

    With writable ``data`` (a bytearray) uncompressed tensors are views into it, so the caller
    must not reuse the buffer; with read-only data each tensor's bytes are copied once.
    """
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    total = view.nbytes
    if total > limits.max_frame_bytes:
        raise FrameTooLargeError(f"frame is {total} bytes, over the limit of {limits.max_frame_bytes}")
    if total < _PREFIX.size:
        raise FrameError(f"frame is {total} bytes, shorter than the {_PREFIX.size}-byte prefix")
    magic, header_length = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise FrameError(f"frame magic is {bytes(magic)!r}, expected {MAGIC!r}; the peer is not speaking Titanic frames")
    if header_length > limits.max_header_bytes:
        raise FrameTooLargeError(f"header length is {header_length} bytes, over the limit of {limits.max_header_bytes}")
    payload_start = _PREFIX.size + header_length
    if payload_start > total:
        raise FrameError(f"header length is {header_length} bytes but only {total - _PREFIX.size} follow the prefix")
    try:
        header = pb.FrameHeader.FromString(bytes(view[_PREFIX.size : payload_start]))
    except DecodeError as error:
        raise FrameError(f"header of {header_length} bytes is not a valid FrameHeader: {error}") from error
    kind = _validate_header(header, limits)
    layouts = _validate_tensors(header, payload_start, total, limits)
    tensors = {layout.name: _tensor_from(view, layout) for layout in layouts}
    return Frame(
        kind=kind,
        request_id=header.request_id,
        run_id=header.run_id,
        step=header.step,
        micro_batch=header.micro_batch,
        stage=header.stage,
        tensors=tensors,
        options=dict(header.options),
        error_code=header.error_code,
        error_message=header.error_message,
    )


def _validate_header(header: pb.FrameHeader, limits: FrameLimits) -> MessageKind:
    """Check the header's scalar fields and options; return its kind."""
    if header.version != FRAME_VERSION:
        raise FrameError(f"header version is {header.version}, this reader supports only {FRAME_VERSION}")
    if header.kind not in _SENDABLE_KINDS:
        raise FrameError(f"header kind is {header.kind}, expected one of {sorted(_SENDABLE_KINDS)}")
    if len(header.tensors) > limits.max_tensors:
        raise FrameTooLargeError(f"frame has {len(header.tensors)} tensors, over the limit of {limits.max_tensors}")
    if len(header.options) > limits.max_options:
        raise FrameTooLargeError(f"frame has {len(header.options)} options, over the limit of {limits.max_options}")
    for key in header.options:
        if not key or len(key) > limits.max_name_length:
            raise FrameError(f"option key {key[:64]!r} must have 1 to {limits.max_name_length} characters")
    return MessageKind(header.kind)


def _validate_tensors(
    header: pb.FrameHeader, payload_start: int, total: int, limits: FrameLimits
) -> list[_TensorLayout]:
    """Check every TensorMeta and that the payloads fill the rest of the frame exactly."""
    layouts: list[_TensorLayout] = []
    seen: set[str] = set()
    offset = payload_start
    decoded_bytes = 0
    for index, meta in enumerate(header.tensors):
        layout = _validate_meta(index, meta, offset, limits)
        if layout.name in seen:
            raise FrameError(f"tensor name {layout.name!r} appears more than once; names must be unique")
        seen.add(layout.name)
        decoded_bytes += _numel(layout.shape) * layout.dtype.itemsize
        if decoded_bytes > limits.max_decoded_bytes:
            raise FrameTooLargeError(
                f"tensors decode to more than {limits.max_decoded_bytes} bytes (limit max_decoded_bytes)"
            )
        offset += layout.nbytes
        if offset > total:
            raise FrameError(
                f"tensor {layout.name!r} needs payload bytes up to offset {offset} but the frame "
                f"is {total} bytes long (truncated?)"
            )
        layouts.append(layout)
    if offset != total:
        raise FrameError(
            f"frame is {total} bytes but header and payloads account for {offset}; "
            f"{total - offset} trailing bytes"
        )
    return layouts


def _validate_meta(index: int, meta: pb.TensorMeta, offset: int, limits: FrameLimits) -> _TensorLayout:
    """Check one TensorMeta: name, dtypes, compression, shape and nbytes against each other."""
    name = meta.name
    where = f"tensor {index} ({name[:64]!r})"
    if not name or len(name) > limits.max_name_length:
        raise FrameError(f"{where}: name must have 1 to {limits.max_name_length} characters, got {len(name)}")
    wire_dtype = _WIRE_TO_DTYPE.get(meta.dtype)
    if wire_dtype is None:
        raise FrameError(f"{where}: dtype is {meta.dtype}, expected one of {_KNOWN_DTYPES}")
    compression = _WIRE_TO_COMPRESSION.get(meta.compression)
    if compression is None:
        raise FrameError(
            f"{where}: compression is {meta.compression}, expected one of {_KNOWN_COMPRESSIONS}"
        )
    if meta.original_dtype == pb.DTYPE_UNSPECIFIED:
        dtype = wire_dtype
    elif meta.original_dtype in _WIRE_TO_DTYPE:
        dtype = _WIRE_TO_DTYPE[meta.original_dtype]
    else:
        raise FrameError(
            f"{where}: original_dtype is {meta.original_dtype}, expected 0 (same as dtype) or one of {_KNOWN_DTYPES}"
        )
    shape = _validate_shape(where, meta.shape, limits)
    numel = _numel(shape)
    if numel * dtype.itemsize > limits.max_tensor_bytes:
        raise FrameTooLargeError(
            f"{where}: shape {list(shape)} of {dtype} is {numel * dtype.itemsize} bytes, "
            f"over the limit of {limits.max_tensor_bytes}"
        )
    expected = _expected_nbytes(where, compression, wire_dtype, dtype, shape, numel)
    if meta.nbytes != expected:
        raise FrameError(
            f"{where}: nbytes is {meta.nbytes}, expected {expected} for shape {list(shape)}, "
            f"dtype {wire_dtype}, compression {compression}"
        )
    return _TensorLayout(
        name=name,
        wire_dtype=wire_dtype,
        dtype=dtype,
        shape=shape,
        compression=compression,
        offset=offset,
        nbytes=expected,
    )


def _validate_shape(where: str, dims: Sequence[int], limits: FrameLimits) -> tuple[int, ...]:
    """The shape as a tuple, once its rank and extent are within ``limits``."""
    if len(dims) > limits.max_ndim:
        raise FrameError(f"{where}: shape has {len(dims)} dimensions, over the limit of {limits.max_ndim}")
    # An empty tensor has numel 0 whatever its other dimensions, but torch still multiplies them
    # in int64: bound the product of the non-zero ones too.
    extent = _numel(dim for dim in dims if dim != 0)
    if extent > limits.max_tensor_bytes:
        raise FrameTooLargeError(
            f"{where}: shape {list(dims)} spans {extent} elements ignoring zero dimensions, "
            f"over max_tensor_bytes ({limits.max_tensor_bytes})"
        )
    return tuple(dims)


def _expected_nbytes(
    where: str, compression: str, wire_dtype: torch.dtype, dtype: torch.dtype, shape: tuple[int, ...], numel: int
) -> int:
    """Payload bytes implied by the layout of ``compression``; FrameError if the dtypes do not fit it."""
    if compression == "none":
        if dtype != wire_dtype:
            raise FrameError(f"{where}: uncompressed but original_dtype {dtype} differs from dtype {wire_dtype}")
        return numel * wire_dtype.itemsize
    if not dtype.is_floating_point:
        raise FrameError(f"{where}: compression {compression} needs a floating original_dtype, got {dtype}")
    if compression == "fp16":
        if wire_dtype != torch.float16:
            raise FrameError(f"{where}: compression fp16 needs dtype float16, got {wire_dtype}")
        return numel * 2
    if wire_dtype != torch.int8:
        raise FrameError(f"{where}: compression int8 needs dtype int8, got {wire_dtype}")
    if numel == 0:
        raise FrameError(f"{where}: compression int8 on an empty tensor; empty tensors are sent uncompressed")
    rows, _ = _rows_and_columns(shape, numel)
    return rows * _SCALE_DTYPE.itemsize + numel


def _numel(shape: Iterable[int]) -> int:
    """Product of ``shape`` (1 for a 0-d tensor), stopping early once it passes 2**64."""
    numel = 1
    for dim in shape:
        numel *= dim
        if numel > _UINT64_MAX:
            break
    return numel


def _tensor_from(view: memoryview, layout: _TensorLayout) -> torch.Tensor:
    """Rebuild one validated tensor from its payload bytes in ``view``."""
    raw = _payload_bytes(view, layout)  # (nbytes,) uint8
    if layout.compression == "fp16":
        return raw.view(torch.float16).to(layout.dtype).reshape(layout.shape)
    if layout.compression == "int8":
        rows, columns = _rows_and_columns(layout.shape, _numel(layout.shape))
        split = rows * _SCALE_DTYPE.itemsize
        scales = raw[:split].view(_SCALE_DTYPE).unsqueeze(1)  # (R, 1)
        values = raw[split:].view(torch.int8).reshape(rows, columns)  # (R, C)
        return values.to(torch.float32).mul_(scales).to(layout.dtype).reshape(layout.shape)
    if layout.wire_dtype == torch.bool and bool(raw.gt(1).any()):
        raise FrameError(f"tensor {layout.name!r}: bool payload holds bytes other than 0 and 1")
    return raw.view(layout.wire_dtype).reshape(layout.shape)


def _payload_bytes(view: memoryview, layout: _TensorLayout) -> torch.Tensor:
    """A flat uint8 tensor of the payload: a view of writable aligned data, else one copy."""
    if layout.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    # int8 compression starts with float32 scales, which need float32 alignment.
    alignment = _SCALE_DTYPE.itemsize if layout.compression == "int8" else layout.wire_dtype.itemsize
    if not view.readonly:
        raw = torch.frombuffer(view, dtype=torch.uint8, count=layout.nbytes, offset=layout.offset)
        # Misaligned typed views are undefined behaviour for some kernels (and CPUs): copy those.
        return raw if raw.data_ptr() % alignment == 0 else raw.clone()
    raw = torch.empty(layout.nbytes, dtype=torch.uint8)
    destination = memoryview(raw.numpy())  # type: ignore[arg-type]  # as in _byte_view
    destination[:] = view[layout.offset : layout.offset + layout.nbytes]
    return raw
