"""The gRPC edge against bad input over a real loopback connection: undecodable requests."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest

from proto import control_pb2 as pb
from proto import control_pb2_grpc as pb_grpc
from proto.messages import PROTOCOL_VERSION
from server.control.servicer import SESSION_METADATA_KEY

from .support import JOIN_TOKEN, running_app, server_config

GARBAGE = b"\xff\xff\xff\x0f\x01"  # a field header whose length runs past the end


def _method(
    channel: grpc.aio.Channel, name: str, *, client_streaming: bool, server_streaming: bool
) -> object:
    path = f"/{pb.DESCRIPTOR.services_by_name['Control'].full_name}/{name}"
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
    }[(client_streaming, server_streaming)]
    return kind(path)


async def test_undecodable_requests_are_invalid_argument_with_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bytes that are not the method's message answer INVALID_ARGUMENT on every method, logged once, no traceback."""
    caplog.set_level(logging.WARNING)
    async with (
        running_app(server_config(tmp_path)) as app,
        grpc.aio.insecure_channel(app.control_address) as channel,
    ):
        reply = await pb_grpc.ControlStub(channel).Register(
            pb.RegisterRequest(name="c1", join_token=JOIN_TOKEN, protocol_version=PROTOCOL_VERSION,
                               profile=pb.DeviceProfile(flops_per_s=1e9, device="cpu", capacity=1))
        )  # fmt: skip
        session = ((SESSION_METADATA_KEY, reply.session_token),)
        for _ in range(3):
            for method in pb.DESCRIPTOR.services_by_name["Control"].methods:
                call = _method(
                    channel,
                    method.name,
                    client_streaming=method.client_streaming,
                    server_streaming=method.server_streaming,
                )
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    if method.client_streaming:
                        await call(iter([GARBAGE]), metadata=session)  # type: ignore[operator]
                    elif method.server_streaming:
                        async for _ in call(GARBAGE, metadata=session):  # type: ignore[operator]
                            pass
                    else:
                        await call(GARBAGE, metadata=session)  # type: ignore[operator]
                assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method.name
                assert "does not decode" in (raised.value.details() or "")
    lines = [r for r in caplog.records if "undecodable" in r.getMessage() or "deserializ" in r.getMessage()]
    assert len(lines) == 1
    assert all(r.exc_info is None for r in caplog.records)
