"""The gRPC edge: converts messages, calls the handler, and maps server errors to status codes.

Nothing here decides anything; see :mod:`server.control.handler` for what each call means.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from proto import control_pb2 as pb
from proto import control_pb2_grpc as pb_grpc
from proto import serde
from proto.serde import ProtocolError
from server.control.handler import ControlHandler
from server.control.state import ClientRecord
from server.errors import (
    AuthenticationError,
    ForbiddenError,
    IntegrityError,
    InvalidRequestError,
    LimitExceededError,
    NotFoundError,
    ServerError,
)

log = logging.getLogger(__name__)

SESSION_METADATA_KEY = "x-titanic-session"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Control"].full_name
# At most one log line per this many seconds about requests that do not decode.
UNDECODABLE_LOG_PERIOD_S = 10.0

GRPC_STATUS: dict[type[ServerError], grpc.StatusCode] = {
    AuthenticationError: grpc.StatusCode.UNAUTHENTICATED,
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    ForbiddenError: grpc.StatusCode.PERMISSION_DENIED,
    LimitExceededError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    IntegrityError: grpc.StatusCode.DATA_LOSS,
}


def status_code_of(error: ServerError | ProtocolError) -> grpc.StatusCode:
    """The gRPC status code a server error (or a message the protocol does not allow) travels as."""
    if isinstance(error, ProtocolError):
        return grpc.StatusCode.INVALID_ARGUMENT
    for cls in type(error).__mro__:
        if cls in GRPC_STATUS:
            return GRPC_STATUS[cls]
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, error: ServerError | ProtocolError) -> None:
    await context.abort(status_code_of(error), str(error))


def _session_token(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == SESSION_METADATA_KEY:
            return value if isinstance(value, str) else value.decode()
    return None


class ControlServicer(pb_grpc.ControlServicer):
    """Thin gRPC servicer over a :class:`ControlHandler`."""

    def __init__(self, handler: ControlHandler) -> None:
        self.handler = handler

    async def _client(self, context: grpc.aio.ServicerContext, *, touch: bool = True) -> ClientRecord:
        try:
            return self.handler.authenticate(_session_token(context), touch=touch)
        except (ServerError, ProtocolError) as error:
            await _abort(context, error)
            raise  # unreachable: abort raises

    async def Register(
        self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterReply:
        try:
            registration = serde.registration_from_proto(request, address=context.peer())
            return serde.session_to_proto(self.handler.register(registration))
        except (ServerError, ProtocolError) as error:
            await _abort(context, error)
            raise

    async def ReportProfile(self, request: pb.ProfileReport, context: grpc.aio.ServicerContext) -> pb.Ack:
        client = await self._client(context)
        try:
            self.handler.report_profile(client, serde.device_profile_from_proto(request.profile))
        except (ServerError, ProtocolError) as error:
            await _abort(context, error)
        return pb.Ack()

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatReply:
        client = await self._client(context, touch=False)  # the beat itself records last_seen: one write
        try:
            interval = self.handler.heartbeat(client, serde.heartbeat_from_proto(request))
        except (ServerError, ProtocolError) as error:
            await _abort(context, error)
            raise
        return pb.HeartbeatReply(heartbeat_interval_s=interval)

    async def Commands(
        self, request: pb.CommandsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Command]:
        client = await self._client(context)
        async for command in self.handler.commands(client):
            yield serde.command_to_proto(command)

    async def ReportStatus(self, request: pb.StatusReport, context: grpc.aio.ServicerContext) -> pb.Ack:
        client = await self._client(context)
        try:
            self.handler.report_status(client, serde.status_report_from_proto(request))
        except (ServerError, ProtocolError) as error:
            await _abort(context, error)
        return pb.Ack()

    async def Leave(self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext) -> pb.Ack:
        client = await self._client(context)
        self.handler.leave(client, request.reason)
        return pb.Ack()

    async def Ping(self, request: pb.PingRequest, context: grpc.aio.ServicerContext) -> pb.PingReply:
        await self._client(context)
        return pb.PingReply(nonce=request.nonce)

    async def ProbeUpload(
        self, request_iterator: AsyncIterator[pb.ProbeChunk], context: grpc.aio.ServicerContext
    ) -> pb.ProbeResult:
        client = await self._client(context)

        async def data() -> AsyncIterator[bytes]:
            async for chunk in request_iterator:
                yield chunk.data

        try:
            result = await self.handler.probe_upload(client, data())
        except (ServerError, ProtocolError) as error:
            await _abort(context, error)
            raise
        return serde.probe_result_to_proto(result)

    async def ProbeDownload(
        self, request: pb.ProbeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProbeChunk]:
        client = await self._client(context)
        try:
            async for data in self.handler.probe_download(client, request.seconds, request.chunk_bytes):
                yield pb.ProbeChunk(data=data)
        except (ServerError, ProtocolError) as error:
            await _abort(context, error)

    async def DownloadPartition(
        self, request: pb.PartitionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WeightChunk]:
        client = await self._client(context)
        try:
            header, chunks = self.handler.partition_weights(client, request.run_id, request.partition)
        except (ServerError, ProtocolError) as error:
            await _abort(context, error)
            return
        yield serde.weight_header_to_proto(header)
        async for data in chunks:
            yield pb.WeightChunk(data=data)

    async def UploadPartition(
        self, request_iterator: AsyncIterator[pb.WeightChunk], context: grpc.aio.ServicerContext
    ) -> pb.UploadReply:
        client = await self._client(context)
        messages = aiter(request_iterator)
        try:
            first = await anext(messages, None)
            if first is None:
                raise InvalidRequestError("an upload needs a header message")
            header = serde.weight_header_from_proto(first)

            async def data() -> AsyncIterator[bytes]:
                async for message in messages:
                    yield serde.weight_data_from_proto(message)

            receipt = await self.handler.upload_partition(client, header, data())
        except (ServerError, ProtocolError) as error:
            await _abort(context, error)
            raise
        return serde.upload_receipt_to_proto(receipt)


class _Undecodable:
    """Stands in for a request whose bytes are not the message its method takes."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _RateLimitedLog:
    """One short warning per period about undecodable requests, with the count since the last line."""

    def __init__(self, period_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.period_s = period_s
        self.clock = clock
        self.suppressed = 0
        self._last = -float("inf")

    def note(self, reason: str) -> None:
        now = self.clock()
        if now - self._last < self.period_s:
            self.suppressed += 1
            return
        more = f" ({self.suppressed} more since the last line)" if self.suppressed else ""
        log.warning("refused an undecodable request: %s%s", reason, more)
        self._last = now
        self.suppressed = 0


def _parser(
    message: type[Message], undecodable: _RateLimitedLog
) -> Callable[[bytes], Message | _Undecodable]:
    def parse(data: bytes) -> Message | _Undecodable:
        try:
            return message.FromString(data)
        except (DecodeError, RecursionError, ValueError) as exc:
            reason = f"{len(data)} bytes are not a {message.DESCRIPTOR.name} ({exc})"[:200]
            undecodable.note(reason)
            return _Undecodable(reason)

    return parse


def _invalid(request: _Undecodable) -> ProtocolError:
    return ProtocolError(f"the request does not decode: {request.reason}")


def _guard_unary(method: Any) -> Any:
    async def call(request: Message | _Undecodable, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await _abort(context, _invalid(request))
        return await method(request, context)

    return call


def _guard_unary_stream(method: Any) -> Any:
    async def call(request: Message | _Undecodable, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, _Undecodable):
            await _abort(context, _invalid(request))
        async for reply in method(request, context):
            yield reply

    return call


def _guard_stream_unary(method: Any) -> Any:
    async def call(requests: AsyncIterator[Message | _Undecodable], context: grpc.aio.ServicerContext) -> Any:
        async def decoded() -> AsyncIterator[Message]:
            async for request in requests:
                if isinstance(request, _Undecodable):
                    raise _invalid(request)  # the method answers it as INVALID_ARGUMENT
                yield request

        return await method(decoded(), context)

    return call


def add_to_server(
    servicer: ControlServicer, server: grpc.aio.Server, *, log_period_s: float = UNDECODABLE_LOG_PERIOD_S
) -> None:
    """Serve ``servicer`` on ``server``; a request that does not decode is answered INVALID_ARGUMENT.

    gRPC's generated registration answers such a request UNKNOWN and logs a traceback for
    each; here the parser hands the method a marker instead, and one short warning per
    ``log_period_s`` counts them.
    """
    undecodable = _RateLimitedLog(log_period_s)
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Control"].methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        options = {
            "request_deserializer": _parser(request_type, undecodable),
            "response_serializer": response_type.SerializeToString,
        }
        if method.client_streaming and not method.server_streaming:
            handler = grpc.stream_unary_rpc_method_handler(_guard_stream_unary(behaviour), **options)
        elif method.server_streaming and not method.client_streaming:
            handler = grpc.unary_stream_rpc_method_handler(_guard_unary_stream(behaviour), **options)
        elif not method.client_streaming:
            handler = grpc.unary_unary_rpc_method_handler(_guard_unary(behaviour), **options)
        else:
            raise AssertionError(f"no bidirectional methods are expected ({method.name})")
        handlers[method.name] = handler
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
