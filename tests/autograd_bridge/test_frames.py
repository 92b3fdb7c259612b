"""Tests of autograd_bridge.frames: round trips, compression, validation of hostile frames."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autograd_bridge.errors import FrameError, FrameTooLargeError
from autograd_bridge.frames import (
    MAGIC,
    Frame,
    FrameLimits,
    MessageKind,
    decode_frame,
    encode_frame,
    encoded_nbytes,
    error_frame,
)
from proto import bridge_pb2 as pb

ALL_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


# --------------------------------------------------------------------------------------------
# helpers


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor whose bytes are random (floats may hold NaN/inf patterns), bool 0/1 only."""
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    numel = int(np.prod(shape, dtype=np.int64))
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bytes(a.contiguous().reshape(-1).view(torch.uint8).numpy()) == bytes(
        b.contiguous().reshape(-1).view(torch.uint8).numpy()
    )


def roundtrip(frame: Frame, *, compression: str = "none", writable: bool = False) -> Frame:
    data = b"".join(encode_frame(frame, compression=compression))  # type: ignore[arg-type]
    return decode_frame(bytearray(data) if writable else data)


def raw_frame(header: pb.FrameHeader, payload: bytes = b"") -> bytes:
    """Frame bytes around a hand-built header, bypassing every check of the encoder."""
    body = header.SerializeToString()
    return MAGIC + struct.pack("<I", len(body)) + body + payload


def header_of(data: bytes) -> tuple[pb.FrameHeader, bytes]:
    """Split encoded frame bytes into the parsed header and the payload bytes."""
    (length,) = struct.unpack_from("<I", data, 4)
    return pb.FrameHeader.FromString(data[8 : 8 + length]), data[8 + length :]


def float_meta(name: str = "x", shape: tuple[int, ...] = (2, 3)) -> pb.TensorMeta:
    numel = int(np.prod(shape, dtype=np.int64))
    return pb.TensorMeta(name=name, dtype=pb.DTYPE_FLOAT32, shape=shape, nbytes=4 * numel)


def valid_header(*metas: pb.TensorMeta) -> pb.FrameHeader:
    return pb.FrameHeader(version=1, kind=pb.MESSAGE_KIND_FORWARD, tensors=list(metas))


def encoded(frame: Frame, compression: str = "none") -> bytes:
    return b"".join(encode_frame(frame, compression=compression))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exactly(dtype: torch.dtype) -> None:
    """A tensor of each supported dtype comes back with identical dtype, shape and bytes."""
    tensor = random_tensor(dtype, (3, 5, 7))
    decoded = roundtrip(Frame(kind=MessageKind.FORWARD, tensors={"t": tensor}))
    assert bit_equal(decoded.tensors["t"], tensor)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips_from_writable_buffer(dtype: torch.dtype) -> None:
    """Decoding from a bytearray (the zero-copy path) gives the same tensors."""
    tensor = random_tensor(dtype, (4, 9), seed=1)
    decoded = roundtrip(Frame(kind=MessageKind.FORWARD, tensors={"t": tensor}), writable=True)
    assert bit_equal(decoded.tensors["t"], tensor)


@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0, 2), ()], ids=str)
def test_empty_and_scalar_tensors_round_trip(shape: tuple[int, ...]) -> None:
    """Empty tensors and 0-d scalars keep their exact shape."""
    tensor = random_tensor(torch.float32, shape, seed=2)
    decoded = roundtrip(Frame(kind=MessageKind.WEIGHTS, tensors={"t": tensor}))
    assert decoded.tensors["t"].shape == tensor.shape
    assert bit_equal(decoded.tensors["t"], tensor)


def test_all_header_fields_round_trip() -> None:
    """Ids, counters, options and error fields survive, extreme integer values included."""
    frame = Frame(
        kind=MessageKind.BACKWARD_RESULT,
        request_id=2**64 - 1,
        run_id="run-ü-42",
        step=2**63,
        micro_batch=2**32 - 1,
        stage=7,
        options={"lr": "0.0001", "betas": "0.9,0.95", "note": ""},
        error_code="SOME_CODE",
        error_message="a message",
    )
    decoded = roundtrip(frame)
    for name in ("kind", "request_id", "run_id", "step", "micro_batch", "stage", "error_code", "error_message"):
        assert getattr(decoded, name) == getattr(frame, name), name
    assert dict(decoded.options) == dict(frame.options)
    assert decoded.tensors == {}


def test_many_tensors_keep_their_order() -> None:
    """Sixty-four tensors of mixed dtypes and shapes come back in order, each intact."""
    tensors = {
        f"layer.{i}.weight": random_tensor(ALL_DTYPES[i % len(ALL_DTYPES)], (i % 5, 3) if i % 7 else (), seed=i)
        for i in range(64)
    }
    decoded = roundtrip(Frame(kind=MessageKind.WEIGHTS, tensors=tensors), writable=True)
    assert list(decoded.tensors) == list(tensors)
    for name, tensor in tensors.items():
        assert bit_equal(decoded.tensors[name], tensor), name


def test_non_contiguous_tensor_round_trips() -> None:
    """A transposed, sliced view is sent as its logical values."""
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    view = base.t()[2:7:2]  # (3, 6), non-contiguous
    decoded = roundtrip(Frame(kind=MessageKind.FORWARD, tensors={"v": view}))
    assert torch.equal(decoded.tensors["v"], view)


def test_tensor_requiring_grad_is_sent_detached() -> None:
    """A leaf that requires grad encodes like its data and decodes without grad."""
    tensor = torch.randn(4, 4, requires_grad=True)
    decoded = roundtrip(Frame(kind=MessageKind.FORWARD, tensors={"h": tensor * 2}))
    assert torch.equal(decoded.tensors["h"], (tensor * 2).detach())
    assert not decoded.tensors["h"].requires_grad


def test_decode_of_read_only_bytes_gives_writable_copy() -> None:
    """Decoding read-only bytes copies once into memory the caller may modify."""
    tensor = random_tensor(torch.int32, (16,), seed=3)
    data = encoded(Frame(kind=MessageKind.FORWARD, tensors={"t": tensor}))
    decoded = decode_frame(data).tensors["t"]
    decoded += 1  # would fail or corrupt `data` if it were a view of immutable bytes
    assert torch.equal(decoded, tensor + 1)
    assert decode_frame(data).tensors["t"].equal(tensor)


# --------------------------------------------------------------------------------------------
# zero copy and alignment


def test_encode_does_not_copy_a_16_mib_tensor() -> None:
    """The payload part of a contiguous CPU tensor is a view of the tensor's own memory."""
    tensor = torch.randn(4 * 1024 * 1024)  # 16 MiB of float32
    parts = encode_frame(Frame(kind=MessageKind.FORWARD, tensors={"h": tensor}))
    assert len(parts) == 2
    payload = np.frombuffer(parts[1], dtype=np.uint8)
    assert payload.nbytes == 16 * 1024 * 1024
    assert payload.ctypes.data == tensor.data_ptr()
    tensor[0] = 123.0  # the part sees later writes: it is the same memory
    assert np.frombuffer(parts[1], dtype=np.float32, count=1)[0] == 123.0


def test_decode_of_writable_buffer_does_not_copy() -> None:
    """Tensors decoded from a bytearray point into that bytearray."""
    tensor = torch.randn(1024, 256)
    buffer = bytearray(encoded(Frame(kind=MessageKind.FORWARD, tensors={"h": tensor})))
    decoded = decode_frame(buffer).tensors["h"]
    start = np.frombuffer(buffer, dtype=np.uint8).ctypes.data
    assert start <= decoded.data_ptr() < start + len(buffer)
    assert torch.equal(decoded, tensor)


def test_first_payload_is_eight_byte_aligned() -> None:
    """Prefix plus header always occupy a multiple of 8 bytes, whatever the header holds."""
    for length in range(40):
        frame = Frame(kind=MessageKind.FORWARD, run_id="r" * length, tensors={"x": torch.ones(3)})
        assert len(encode_frame(frame)[0]) % 8 == 0, length


def test_misaligned_payload_in_writable_buffer_is_copied_aligned() -> None:
    """A float tensor after an odd-sized one decodes correctly into aligned memory."""
    odd = torch.arange(3, dtype=torch.uint8)
    floats = torch.randn(5, dtype=torch.float64)
    decoded = roundtrip(Frame(kind=MessageKind.FORWARD, tensors={"a": odd, "b": floats}), writable=True)
    assert decoded.tensors["b"].data_ptr() % 8 == 0
    assert torch.equal(decoded.tensors["b"], floats)


def test_encoded_nbytes_counts_every_part() -> None:
    """encoded_nbytes equals the length of the concatenated frame."""
    frame = Frame(kind=MessageKind.FORWARD, tensors={"a": torch.randn(7, 3), "b": torch.ones(5, dtype=torch.int16)})
    for compression in ("none", "fp16", "int8"):
        parts = encode_frame(frame, compression=compression)  # type: ignore[arg-type]
        assert encoded_nbytes(parts) == len(b"".join(parts)), compression


# --------------------------------------------------------------------------------------------
# compression


def normal_fp16_values(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Values of both signs whose magnitudes span the normal float16 range."""
    generator = torch.Generator().manual_seed(seed)
    low, high = np.log(2.0**-14), np.log(60000.0)
    magnitude = torch.exp(torch.empty(shape, dtype=torch.float64).uniform_(low, high, generator=generator))
    sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    return (magnitude * sign).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fp16_relative_error_is_at_most_half_an_ulp(dtype: torch.dtype) -> None:
    """fp16 compression errs by at most 2**-11 relative on values in float16's normal range."""
    tensor = normal_fp16_values((64, 33), dtype)
    frame = Frame(kind=MessageKind.FORWARD, tensors={"h": tensor})
    decoded = roundtrip(frame, compression="fp16").tensors["h"]
    assert decoded.dtype == dtype
    relative = ((decoded.double() - tensor.double()).abs() / tensor.double().abs()).max().item()
    assert 0 < relative <= 2**-11
    assert len(encoded(frame, "fp16")) < len(encoded(frame)) * 0.6


def test_fp16_falls_back_to_uncompressed_on_overflow() -> None:
    """A tensor with a value beyond float16's range is sent exactly, the others still compressed."""
    big = torch.randn(8, 8)
    big[3, 4] = 1e6
    small = torch.randn(8, 8)
    data = encoded(Frame(kind=MessageKind.FORWARD, tensors={"big": big, "small": small}), "fp16")
    header, _ = header_of(data)
    assert [meta.compression for meta in header.tensors] == [pb.COMPRESSION_NONE, pb.COMPRESSION_FP16]
    decoded = decode_frame(data)
    assert bit_equal(decoded.tensors["big"], big)
    assert not torch.equal(decoded.tensors["small"], small)  # rounded, so really compressed


def test_fp16_keeps_existing_infinities_and_nan() -> None:
    """inf and NaN already in the tensor are no overflow: they travel compressed and survive."""
    tensor = torch.tensor([1.0, float("inf"), float("-inf"), float("nan")])
    data = encoded(Frame(kind=MessageKind.FORWARD, tensors={"t": tensor}), "fp16")
    assert header_of(data)[0].tensors[0].compression == pb.COMPRESSION_FP16
    decoded = decode_frame(data).tensors["t"]
    assert torch.equal(decoded[:3], tensor[:3]) and bool(decoded[3].isnan())


@pytest.mark.parametrize("compression", ["fp16", "int8"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.uint8, torch.bool], ids=str)
def test_compression_leaves_non_floating_tensors_exact(compression: str, dtype: torch.dtype) -> None:
    """Integer and bool tensors are never compressed."""
    tensor = random_tensor(dtype, (6, 5), seed=4)
    decoded = roundtrip(Frame(kind=MessageKind.FORWARD, tensors={"t": tensor}), compression=compression)
    assert bit_equal(decoded.tensors["t"], tensor)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp16_sends_two_byte_floats_unchanged(dtype: torch.dtype) -> None:
    """float16 and bfloat16 gain nothing from fp16 compression, so they go bit-exact."""
    tensor = torch.randn(10, 10).to(dtype)
    decoded = roundtrip(Frame(kind=MessageKind.FORWARD, tensors={"t": tensor}), compression="fp16")
    assert bit_equal(decoded.tensors["t"], tensor)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 16, 32), (257,), ()], ids=str)
def test_int8_error_is_within_half_a_step_of_the_row_max(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """int8 errs by at most rowmax/254 per element (plus the rounding of the original dtype)."""
    generator = torch.Generator().manual_seed(5)
    tensor = (torch.randn(shape, generator=generator) * torch.rand(shape, generator=generator) * 10).to(dtype)
    decoded = roundtrip(Frame(kind=MessageKind.FORWARD, tensors={"t": tensor}), compression="int8").tensors["t"]
    assert decoded.dtype == dtype and decoded.shape == tensor.shape
    x = tensor.double().reshape(-1, shape[-1] if shape else 1)  # (R, C)
    rowmax = x.abs().amax(dim=1, keepdim=True)  # (R, 1)
    error = (decoded.double().reshape(x.shape) - x).abs()
    dtype_rounding = x.abs() * torch.finfo(dtype).eps if dtype.itemsize < 4 else 0.0
    bound = rowmax / 254 + rowmax * 1e-6 + dtype_rounding
    assert bool((error <= bound).all()), (error - bound).max().item()


def test_int8_payload_is_one_byte_per_element_plus_row_scales() -> None:
    """A (16, 64) float32 tensor travels as 16 fp32 scales and 1024 int8 values."""
    frame = Frame(kind=MessageKind.FORWARD, tensors={"t": torch.randn(16, 64)})
    header, payload = header_of(encoded(frame, "int8"))
    meta = header.tensors[0]
    assert (meta.dtype, meta.original_dtype, meta.compression) == (
        pb.DTYPE_INT8,
        pb.DTYPE_FLOAT32,
        pb.COMPRESSION_INT8,
    )
    assert meta.nbytes == len(payload) == 16 * 4 + 16 * 64


def test_int8_zero_rows_decode_to_zero() -> None:
    """A row of zeros (scale 0) decodes to exact zeros next to ordinary rows."""
    tensor = torch.randn(3, 8)
    tensor[1] = 0.0
    decoded = roundtrip(Frame(kind=MessageKind.FORWARD, tensors={"t": tensor}), compression="int8").tensors["t"]
    assert torch.equal(decoded[1], torch.zeros(8))
    assert not torch.equal(decoded[0], torch.zeros(8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_int8_falls_back_to_uncompressed_on_non_finite(bad: float) -> None:
    """A tensor holding NaN or inf cannot be scaled, so it is sent exactly."""
    tensor = torch.randn(4, 4)
    tensor[2, 1] = bad
    data = encoded(Frame(kind=MessageKind.FORWARD, tensors={"t": tensor}), "int8")
    assert header_of(data)[0].tensors[0].compression == pb.COMPRESSION_NONE
    assert bit_equal(decode_frame(data).tensors["t"], tensor)


# --------------------------------------------------------------------------------------------
# the encoder refuses caller mistakes with ValueError


def test_encode_rejects_unspecified_kind() -> None:
    """A frame without a kind is a programming error, reported before anything is sent."""
    with pytest.raises(ValueError, match="UNSPECIFIED"):
        encode_frame(Frame(kind=MessageKind.UNSPECIFIED))


def test_encode_rejects_unsupported_dtype() -> None:
    """A complex tensor is refused with a message listing what is supported."""
    with pytest.raises(ValueError, match=r"complex64.*torch\.float32"):
        encode_frame(Frame(kind=MessageKind.FORWARD, tensors={"z": torch.zeros(2, dtype=torch.complex64)}))


def test_encode_rejects_out_of_range_counters() -> None:
    """A negative step or a micro-batch beyond uint32 is named in the error."""
    with pytest.raises(ValueError, match="step"):
        encode_frame(Frame(kind=MessageKind.FORWARD, step=-1))
    with pytest.raises(ValueError, match="micro_batch"):
        encode_frame(Frame(kind=MessageKind.FORWARD, micro_batch=2**32))


def test_encode_rejects_unknown_compression() -> None:
    """Only none, fp16 and int8 are accepted."""
    with pytest.raises(ValueError, match="compression"):
        encode_frame(Frame(kind=MessageKind.FORWARD), compression="zstd")  # type: ignore[arg-type]


def test_encode_rejects_empty_option_key() -> None:
    """Option keys must be non-empty, as the decoder requires."""
    with pytest.raises(ValueError, match="empty key"):
        encode_frame(Frame(kind=MessageKind.OPTIMIZER_STEP, options={"": "1"}))


def test_encode_rejects_empty_tensor_name() -> None:
    """Tensor names must be non-empty, as the decoder requires."""
    with pytest.raises(ValueError, match="non-empty"):
        encode_frame(Frame(kind=MessageKind.FORWARD, tensors={"": torch.ones(1)}))


# --------------------------------------------------------------------------------------------
# error frames and the enum mirror


def test_error_frame_echoes_the_request_ids() -> None:
    """An error answer carries the request's ids and round-trips with its code and message."""
    request = Frame(kind=MessageKind.BACKWARD, request_id=77, run_id="r1", step=3, micro_batch=2, stage=1)
    answer = roundtrip(error_frame(request, "STATE_LIMIT", "too many micro-batches; release some"))
    assert answer.kind is MessageKind.ERROR
    assert (answer.request_id, answer.run_id, answer.step, answer.micro_batch, answer.stage) == (77, "r1", 3, 2, 1)
    assert (answer.error_code, answer.error_message) == ("STATE_LIMIT", "too many micro-batches; release some")


def test_error_frame_without_request_has_zero_ids() -> None:
    """An unsolicited error frame (e.g. for undecodable bytes) has request_id 0."""
    answer = error_frame(None, "BAD_FRAME", "bad magic")
    assert (answer.kind, answer.request_id, answer.error_code) == (MessageKind.ERROR, 0, "BAD_FRAME")


def test_message_kind_mirrors_the_proto_enum() -> None:
    """Every proto MessageKind value has a MessageKind member of the same number, and back."""
    proto_kinds = {name.removeprefix("MESSAGE_KIND_"): number for name, number in pb.MessageKind.items()}
    assert proto_kinds == {kind.name: kind.value for kind in MessageKind}


def test_frame_limits_reject_non_positive_values() -> None:
    """A zero limit is a configuration mistake and is named."""
    with pytest.raises(ValueError, match="max_tensors"):
        FrameLimits(max_tensors=0)


# --------------------------------------------------------------------------------------------
# hostile frames


def test_wrong_magic_is_rejected() -> None:
    """Bytes from something that is not a Titanic peer are refused at the magic."""
    data = b"HTTP" + encoded(Frame(kind=MessageKind.ACK))[4:]
    with pytest.raises(FrameError, match=r"magic is b'HTTP', expected b'TTN1'"):
        decode_frame(data)


def test_frame_shorter_than_prefix_is_rejected() -> None:
    """Fewer than 8 bytes cannot hold the prefix."""
    with pytest.raises(FrameError, match="shorter than the 8-byte prefix"):
        decode_frame(b"TTN1\x00")


def test_header_length_beyond_data_is_rejected() -> None:
    """A header length pointing past the end of the data is reported with both numbers."""
    data = MAGIC + struct.pack("<I", 1000) + b"\x08\x01"
    with pytest.raises(FrameError, match="header length is 1000 bytes but only 2 follow"):
        decode_frame(data)


def test_header_that_is_not_protobuf_is_rejected() -> None:
    """Garbage where the header should be fails to parse and says so."""
    garbage = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"
    with pytest.raises(FrameError, match="not a valid FrameHeader"):
        decode_frame(MAGIC + struct.pack("<I", len(garbage)) + garbage)


def test_unsupported_version_is_rejected() -> None:
    """A header from a future layout version is refused by number."""
    header = valid_header()
    header.version = 2
    with pytest.raises(FrameError, match="version is 2"):
        decode_frame(raw_frame(header))


@pytest.mark.parametrize("kind", [0, 17, 1000, -1])
def test_unknown_or_unspecified_kind_is_rejected(kind: int) -> None:
    """Kinds outside 1..16 (including the unset 0) are refused by number."""
    header = valid_header()
    header.kind = kind  # type: ignore[assignment]
    with pytest.raises(FrameError, match=f"kind is {kind}"):
        decode_frame(raw_frame(header))


@pytest.mark.parametrize("dtype", [0, 11, 99, -3])
def test_unknown_dtype_is_rejected(dtype: int) -> None:
    """A dtype number the reader does not know is refused and the known ones listed."""
    meta = float_meta()
    meta.dtype = dtype  # type: ignore[assignment]
    with pytest.raises(FrameError, match=f"tensor 0 \\('x'\\): dtype is {dtype}, expected one of 1"):
        decode_frame(raw_frame(valid_header(meta), bytes(24)))


def test_unknown_compression_is_rejected() -> None:
    """A compression number the reader does not know is refused."""
    meta = float_meta()
    meta.compression = 9  # type: ignore[assignment]
    with pytest.raises(FrameError, match="compression is 9"):
        decode_frame(raw_frame(valid_header(meta), bytes(24)))


def test_unknown_original_dtype_is_rejected() -> None:
    """original_dtype must be 0 or a known dtype."""
    meta = float_meta()
    meta.original_dtype = 42  # type: ignore[assignment]
    with pytest.raises(FrameError, match="original_dtype is 42"):
        decode_frame(raw_frame(valid_header(meta), bytes(24)))


def test_lying_shape_is_rejected() -> None:
    """nbytes that disagree with shape and dtype are reported with the expected size."""
    meta = float_meta(shape=(2, 3))
    meta.nbytes = 20
    with pytest.raises(FrameError, match="nbytes is 20, expected 24"):
        decode_frame(raw_frame(valid_header(meta), bytes(20)))


def test_int8_layout_with_wrong_nbytes_is_rejected() -> None:
    """An int8-compressed tensor must carry exactly rows*4 + numel bytes."""
    meta = pb.TensorMeta(
        name="q",
        dtype=pb.DTYPE_INT8,
        original_dtype=pb.DTYPE_FLOAT32,
        compression=pb.COMPRESSION_INT8,
        shape=[2, 5],
        nbytes=10,  # forgot the 2 scales
    )
    with pytest.raises(FrameError, match="nbytes is 10, expected 18"):
        decode_frame(raw_frame(valid_header(meta), bytes(10)))


def test_compression_of_integer_original_is_rejected() -> None:
    """fp16 compression claiming to restore an int64 tensor is refused."""
    meta = pb.TensorMeta(
        name="i",
        dtype=pb.DTYPE_FLOAT16,
        original_dtype=pb.DTYPE_INT64,
        compression=pb.COMPRESSION_FP16,
        shape=[4],
        nbytes=8,
    )
    with pytest.raises(FrameError, match="needs a floating original_dtype"):
        decode_frame(raw_frame(valid_header(meta), bytes(8)))


def test_uncompressed_dtype_mismatch_is_rejected() -> None:
    """Without compression the original dtype cannot differ from the payload dtype."""
    meta = float_meta()
    meta.original_dtype = pb.DTYPE_FLOAT64
    with pytest.raises(FrameError, match="uncompressed but original_dtype"):
        decode_frame(raw_frame(valid_header(meta), bytes(24)))


def test_too_many_dimensions_are_rejected() -> None:
    """A shape with more dimensions than max_ndim is refused before any allocation."""
    meta = float_meta(shape=(1,) * 9)
    with pytest.raises(FrameError, match="9 dimensions, over the limit of 8"):
        decode_frame(raw_frame(valid_header(meta), bytes(4)))


def test_absurd_dimensions_of_an_empty_tensor_are_rejected() -> None:
    """A zero-element shape with huge other dimensions cannot overflow torch's size math."""
    meta = pb.TensorMeta(name="e", dtype=pb.DTYPE_FLOAT32, shape=[0, 2**31, 2**31, 2**31], nbytes=0)
    with pytest.raises(FrameTooLargeError, match="ignoring zero dimensions"):
        decode_frame(raw_frame(valid_header(meta)))


def test_oversize_frame_is_rejected() -> None:
    """A frame longer than max_frame_bytes raises FrameTooLargeError."""
    data = encoded(Frame(kind=MessageKind.FORWARD, tensors={"h": torch.zeros(1000)}))
    with pytest.raises(FrameTooLargeError, match=f"frame is {len(data)} bytes, over the limit of 1024"):
        decode_frame(data, limits=FrameLimits(max_frame_bytes=1024, max_header_bytes=512))


def test_oversize_header_is_rejected() -> None:
    """A header longer than max_header_bytes is refused before it is parsed."""
    data = encoded(Frame(kind=MessageKind.FORWARD, error_message="x" * 300))
    with pytest.raises(FrameTooLargeError, match="over the limit of 256"):
        decode_frame(data, limits=FrameLimits(max_header_bytes=256))


def test_oversize_tensor_is_rejected_before_allocation() -> None:
    """A shape claiming 4 GiB in a small frame is refused by size, not by running out of memory."""
    meta = pb.TensorMeta(name="h", dtype=pb.DTYPE_FLOAT32, shape=[2**20, 2**10], nbytes=2**32)
    with pytest.raises(FrameTooLargeError, match="over the limit of 2147483648"):
        decode_frame(raw_frame(valid_header(meta)))


def test_int8_expansion_beyond_decoded_limit_is_rejected() -> None:
    """Decompression may not allocate more than max_decoded_bytes in total."""
    frame = Frame(kind=MessageKind.FORWARD, tensors={"a": torch.randn(64, 64), "b": torch.randn(64, 64)})
    data = encoded(frame, "int8")  # ~8.5 KiB on the wire, 32 KiB decoded
    with pytest.raises(FrameTooLargeError, match="max_decoded_bytes"):
        decode_frame(data, limits=FrameLimits(max_decoded_bytes=20_000))


def test_too_many_tensors_are_rejected() -> None:
    """More tensors than max_tensors raise FrameTooLargeError naming both counts."""
    frame = Frame(kind=MessageKind.WEIGHTS, tensors={f"t{i}": torch.ones(1) for i in range(5)})
    with pytest.raises(FrameTooLargeError, match="5 tensors, over the limit of 4"):
        decode_frame(encoded(frame), limits=FrameLimits(max_tensors=4))


def test_too_many_options_are_rejected() -> None:
    """More options than max_options raise FrameTooLargeError."""
    frame = Frame(kind=MessageKind.OPTIMIZER_STEP, options={f"k{i}": "v" for i in range(3)})
    with pytest.raises(FrameTooLargeError, match="3 options"):
        decode_frame(encoded(frame), limits=FrameLimits(max_options=2))


def test_truncated_frame_is_rejected() -> None:
    """A frame cut short in its payload names the tensor whose bytes are missing."""
    data = encoded(Frame(kind=MessageKind.FORWARD, tensors={"h": torch.randn(10)}))
    with pytest.raises(FrameError, match=r"tensor 'h' needs payload bytes up to offset \d+ but the frame is \d+ bytes long"):
        decode_frame(data[:-1])


def test_trailing_bytes_are_rejected() -> None:
    """Bytes after the last payload mean the header and payload disagree."""
    data = encoded(Frame(kind=MessageKind.FORWARD, tensors={"h": torch.randn(10)}))
    with pytest.raises(FrameError, match="3 trailing bytes"):
        decode_frame(data + b"abc")


def test_duplicate_tensor_names_are_rejected() -> None:
    """Two tensors with the same name would shadow each other, so the frame is refused."""
    header = valid_header(float_meta("w", (2,)), float_meta("w", (2,)))
    with pytest.raises(FrameError, match="'w' appears more than once"):
        decode_frame(raw_frame(header, bytes(16)))


def test_empty_tensor_name_is_rejected() -> None:
    """Every tensor needs a name."""
    with pytest.raises(FrameError, match="name must have 1 to 256 characters, got 0"):
        decode_frame(raw_frame(valid_header(float_meta("", (2,))), bytes(8)))


def test_bool_payload_other_than_zero_and_one_is_rejected() -> None:
    """A bool byte of 2 would give torch an invalid bool, so it is refused."""
    meta = pb.TensorMeta(name="m", dtype=pb.DTYPE_BOOL, shape=[3], nbytes=3)
    with pytest.raises(FrameError, match="bytes other than 0 and 1"):
        decode_frame(raw_frame(valid_header(meta), b"\x00\x01\x02"))


# --------------------------------------------------------------------------------------------
# fuzzing: only a Frame or a FrameError may come out


def sample_frames() -> list[bytes]:
    tensors = {
        "h": torch.randn(3, 4),
        "mask": torch.tensor([[True, False, True]]),
        "ids": torch.arange(6).reshape(2, 3),
        "s": torch.tensor(2.5, dtype=torch.bfloat16),
    }
    frame = Frame(kind=MessageKind.FORWARD, request_id=9, run_id="run", tensors=tensors, options={"lr": "1e-3"})
    return [encoded(frame, compression) for compression in ("none", "fp16", "int8")]


SAMPLES = sample_frames()
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode_or_frame_error(data: bytes | bytearray) -> None:
    try:
        frame = decode_frame(data)
    except FrameError:
        return
    assert isinstance(frame, Frame)


@FUZZ
@given(st.binary(max_size=256), st.booleans())
def test_random_bytes_give_frame_or_frame_error(data: bytes, with_magic: bool) -> None:
    """Arbitrary bytes (with or without the magic) never raise anything but FrameError."""
    decode_or_frame_error(MAGIC + data if with_magic else data)


@FUZZ
@given(
    st.sampled_from(range(len(SAMPLES))),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    st.sampled_from(["overwrite", "insert", "delete", "truncate"]),
    st.booleans(),
)
def test_mutated_frames_give_frame_or_frame_error(
    sample: int, edits: list[tuple[int, int]], how: str, writable: bool
) -> None:
    """Valid frames with random bytes changed, inserted, deleted or cut off decode or raise FrameError."""
    data = bytearray(SAMPLES[sample])
    for position, value in edits:
        at = position % (len(data) + 1)
        if how == "overwrite" and at < len(data):
            data[at] = value
        elif how == "insert":
            data.insert(at, value)
        elif how == "delete" and at < len(data):
            del data[at]
        elif how == "truncate":
            del data[at:]
    decode_or_frame_error(data if writable else bytes(data))


meta_strategy = st.builds(
    pb.TensorMeta,
    name=st.sampled_from(["", "a", "b", "x" * 300]),
    dtype=st.integers(-2, 12),
    shape=st.lists(st.sampled_from([0, 1, 2, 3, 7, 2**31, 2**40, 2**64 - 1]), max_size=10),
    compression=st.integers(-1, 4),
    nbytes=st.sampled_from([0, 1, 3, 4, 8, 12, 24, 28, 2**63]),
    original_dtype=st.integers(-1, 12),
)


@FUZZ
@given(
    st.integers(0, 3),
    st.integers(-2, 16),
    st.lists(meta_strategy, max_size=4),
    st.binary(max_size=64),
    st.booleans(),
)
def test_random_headers_give_frame_or_frame_error(
    version: int, kind: int, metas: list[pb.TensorMeta], payload: bytes, writable: bool
) -> None:
    """Well-formed protobuf headers with random field values decode or raise FrameError."""
    header = pb.FrameHeader(version=version, kind=kind, tensors=metas)  # type: ignore[arg-type]
    data = raw_frame(header, payload)
    decode_or_frame_error(bytearray(data) if writable else data)
