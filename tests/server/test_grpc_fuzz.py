"""Property-based fuzzing of the gRPC control plane: generated protobuf messages of every method's request type
against a real server on loopback. Whatever arrives, the answer is a status the protocol names, never UNKNOWN or
INTERNAL, and the server keeps serving."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto import control_pb2 as pb
from proto import control_pb2_grpc as pb_grpc
from proto.messages import PROTOCOL_VERSION
from server.control.servicer import SESSION_METADATA_KEY

from .support import JOIN_TOKEN, running_app, server_config

SERVICE = pb.DESCRIPTOR.services_by_name["Control"]
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNIMPLEMENTED}

_F = FieldDescriptor
_INTS = {
    _F.TYPE_INT32: (-(1 << 31), (1 << 31) - 1),
    _F.TYPE_SINT32: (-(1 << 31), (1 << 31) - 1),
    _F.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    _F.TYPE_SINT64: (-(1 << 63), (1 << 63) - 1),
    _F.TYPE_UINT32: (0, (1 << 32) - 1),
    _F.TYPE_UINT64: (0, (1 << 64) - 1),
}
# Strings a server treats specially, beside arbitrary text.
_WORDS = st.sampled_from(
    ["", "c1", "fuzzer", "plan-1-p0", "r1", "0" * 64, "cpu", "cuda", "x" * 200, "../..", "é"]
)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in (_F.TYPE_DOUBLE, _F.TYPE_FLOAT):
        return st.floats(width=64 if kind == _F.TYPE_DOUBLE else 32)
    if kind in _INTS:
        low, high = _INTS[kind]
        return st.integers(low, high) | st.integers(0, 10)
    if kind == _F.TYPE_BOOL:
        return st.booleans()
    if kind == _F.TYPE_STRING:
        return _WORDS | st.text(max_size=24)
    if kind == _F.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == _F.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    raise AssertionError(f"no strategy for field type {kind}")


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor``'s type with any subset of fields set to generated values."""
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.type == _F.TYPE_MESSAGE:
            if depth >= 3:
                continue
            value: st.SearchStrategy[Any] = st.deferred(lambda f=field: messages(f.message_type, depth + 1))
        else:
            value = _scalar(field)
        if field.is_repeated:
            value = st.lists(value, max_size=3)
        optional[field.name] = value
    cls = GetMessageClass(descriptor)
    return st.fixed_dictionaries({}, optional=optional).map(lambda kwargs: cls(**kwargs))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real server in a thread of its own (its own event loop); yields its control address."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()
    address: list[str] = []

    async def run() -> None:
        async with running_app(server_config(tmp_path_factory.mktemp("fuzz"), timeout_s=60)) as app:
            address.append(app.control_address)
            started.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    assert started.wait(30)
    yield address[0]
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)


@pytest.fixture(scope="module")
def channel(server: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server) as channel:
        yield channel


def _session(channel: grpc.Channel) -> tuple[tuple[str, str], ...]:
    reply = pb_grpc.ControlStub(channel).Register(
        pb.RegisterRequest(name="fuzzer", join_token=JOIN_TOKEN, protocol_version=PROTOCOL_VERSION,
                           profile=pb.DeviceProfile(flops_per_s=1e9, device="cpu", capacity=1)),
        timeout=10,
    )  # fmt: skip
    return ((SESSION_METADATA_KEY, reply.session_token),)


def _call(channel: grpc.Channel, name: str, requests: list[Message], metadata: Any) -> grpc.StatusCode:
    method = SERVICE.methods_by_name[name]
    path = f"/{SERVICE.full_name}/{name}"
    options: dict[str, Any] = {
        "request_serializer": lambda m: m.SerializeToString(),
        "response_deserializer": GetMessageClass(method.output_type).FromString,
    }
    try:
        if method.client_streaming:
            channel.stream_unary(path, **options)(iter(requests), metadata=metadata, timeout=5)
        elif method.server_streaming:
            for _ in channel.unary_stream(path, **options)(requests[0], metadata=metadata, timeout=0.5):
                pass
        else:
            channel.unary_unary(path, **options)(requests[0], metadata=metadata, timeout=5)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.mark.slow
@pytest.mark.parametrize("name", [m.name for m in SERVICE.methods])
def test_generated_requests_get_a_named_status(channel: grpc.Channel, name: str) -> None:
    """Generated requests (with a session and without) never get UNKNOWN or INTERNAL, and Ping works after."""
    method = SERVICE.methods_by_name[name]

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(requests=st.lists(messages(method.input_type), min_size=1, max_size=3), with_session=st.booleans())
    def fuzz(requests: list[Message], with_session: bool) -> None:
        metadata = _session(channel) if with_session else ()
        code = _call(channel, name, requests, metadata)
        allowed_timeout = method.server_streaming and code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert code not in FORBIDDEN or allowed_timeout, (name, code, requests)

    fuzz()
    assert _call(channel, "Ping", [pb.PingRequest(nonce=7)], _session(channel)) == grpc.StatusCode.OK
