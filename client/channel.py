"""The client's end of the control plane: one gRPC channel to the server, calls as methods.

Every method speaks dataclasses (``client/messages.py``) and raises :mod:`client.errors`,
never gRPC's own errors, so the daemon can decide from the class alone what to do.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import statistics
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc

from proto import control_pb2 as pb
from proto import control_pb2_grpc as pb_grpc
from proto import serde
from proto.messages import (
    ClientInfo,
    Command,
    DeviceProfile,
    Heartbeat,
    Registration,
    RunStatus,
    Session,
    StatusReport,
    WeightHeader,
)

from .errors import (
    ClientError,
    ControlCallError,
    RegistrationRefusedError,
    ServerUnavailableError,
    SessionEndedError,
    TlsVerificationError,
    WeightsError,
)

SESSION_METADATA_KEY = "x-titanic-session"
M = TypeVar("M")
T = TypeVar("T")
MIB = 1 << 20
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 4 * MIB),
    ("grpc.max_receive_message_length", 4 * MIB),
]
_CALL_TIMEOUT_S = 15.0
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
_TLS_FAILURES = ("CERTIFICATE_VERIFY_FAILED", "Tls handshake failed", "Ssl handshake failed")


def _protocol(read: Callable[[M], T], message: M) -> T:
    """``read(message)``, with a message the protocol does not allow as a ControlCallError."""
    try:
        return read(message)
    except serde.ProtocolError as exc:
        raise ControlCallError(str(exc), code=exc.code) from exc


def translate(error: grpc.aio.AioRpcError, what: str) -> ClientError:
    """The client error a failed call stands for."""
    code = error.code()
    details = error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and any(s in details for s in _TLS_FAILURES):
        return TlsVerificationError(
            f"{what}: the TLS handshake with the server failed ({details}); "
            "pass the CA that signed the server's certificate with --ca, or check that the server uses TLS"
        )
    if code in _UNREACHABLE:
        return ServerUnavailableError(f"{what}: the server is unreachable ({code.name}: {details})")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return SessionEndedError(f"{what}: {details}")
    return ControlCallError(f"{what}: {code.name}: {details}", code=code.name)


class ControlChannel:
    """A connection to the server's control plane. Use ``async with``."""

    def __init__(
        self,
        target: str,
        *,
        tls: bool = False,
        ca_pem: bytes | None = None,
        server_name: str | None = None,
    ) -> None:
        options: list[tuple[str, Any]] = list(GRPC_OPTIONS)
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls:
            credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        self._stub = pb_grpc.ControlStub(self._channel)
        self.target = target
        self.session: Session | None = None
        self._nonces = itertools.count(1)

    async def __aenter__(self) -> ControlChannel:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls in flight fail."""
        await self._channel.close(grace=None)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self.session is None:
            raise SessionEndedError("no session; register first")
        return ((SESSION_METADATA_KEY, self.session.session_token),)

    # -- session -------------------------------------------------------------------------

    async def register(
        self,
        *,
        name: str,
        join_token: str | None,
        client_key: str | None,
        info: ClientInfo,
        profile: DeviceProfile,
    ) -> Session:
        """Join the server; raises RegistrationRefusedError when it will not have us."""
        request = serde.registration_to_proto(
            Registration(name=name, join_token=join_token, client_key=client_key, info=info, profile=profile)
        )
        try:
            reply = await self._stub.Register(request, timeout=_CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            if error.code() in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.PERMISSION_DENIED,
            ):
                raise RegistrationRefusedError(
                    f"the server at {self.target} refused to register {name!r}: {error.details()}"
                ) from error
            raise translate(error, "register") from error
        self.session = serde.session_from_proto(reply)
        return self.session

    async def report_profile(self, profile: DeviceProfile) -> None:
        """Send the complete profile; the server may plan with this client from now on."""
        try:
            await self._stub.ReportProfile(
                pb.ProfileReport(profile=serde.device_profile_to_proto(profile)),
                metadata=self._metadata(),
                timeout=_CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as error:
            raise translate(error, "report profile") from error

    async def heartbeat(self, runs: list[RunStatus], free_memory_bytes: int, timeout_s: float) -> float:
        """Say we are alive; returns the interval the server wants."""
        request = serde.heartbeat_to_proto(Heartbeat(runs=tuple(runs), free_memory_bytes=free_memory_bytes))
        try:
            reply = await self._stub.Heartbeat(request, metadata=self._metadata(), timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            raise translate(error, "heartbeat") from error
        return float(reply.heartbeat_interval_s)

    async def commands(self) -> AsyncIterator[Command]:
        """The server's commands as they come; ends (SessionEndedError) when the server ends the session."""
        call = self._stub.Commands(pb.CommandsRequest(), metadata=self._metadata())
        try:
            async for message in call:
                yield _protocol(serde.command_from_proto, message)
        except grpc.aio.AioRpcError as error:
            raise translate(error, "command stream") from error
        finally:
            call.cancel()
        raise SessionEndedError("the server ended the command stream (session replaced, lost, or server stopping)")

    async def report_status(self, report: StatusReport) -> None:
        """Tell the server how a command is going."""
        try:
            await self._stub.ReportStatus(
                serde.status_report_to_proto(report), metadata=self._metadata(), timeout=_CALL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as error:
            raise translate(error, "status report") from error

    async def leave(self, reason: str, timeout_s: float = 2.0) -> None:
        """Say goodbye (best effort: a server that is gone cannot be told)."""
        try:
            await self._stub.Leave(pb.LeaveRequest(reason=reason), metadata=self._metadata(), timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            raise translate(error, "leave") from error

    # -- link measurement ----------------------------------------------------------------

    async def rtt(self, count: int) -> float:
        """Median round-trip time of ``count`` small calls on the open connection, seconds."""
        samples = []
        for _ in range(count):
            nonce = next(self._nonces)
            start = time.perf_counter()
            try:
                reply = await self._stub.Ping(pb.PingRequest(nonce=nonce), metadata=self._metadata(), timeout=10)
            except grpc.aio.AioRpcError as error:
                raise translate(error, "ping") from error
            samples.append(time.perf_counter() - start)
            if reply.nonce != nonce:
                raise ControlCallError("the server answered a ping with the wrong nonce", code="DATA_LOSS")
        return statistics.median(samples)

    async def probe_upload(self, seconds: float, chunk_bytes: int) -> tuple[int, float]:
        """Stream filler to the server for ``seconds``; returns (bytes, seconds) as the server saw them."""
        filler = os.urandom(chunk_bytes)

        async def chunks() -> AsyncIterator[pb.ProbeChunk]:
            start = time.perf_counter()
            yield pb.ProbeChunk(data=filler)  # the first chunk opens the stream; it is not counted
            while time.perf_counter() - start < seconds:
                yield pb.ProbeChunk(data=filler)

        try:
            result = await self._stub.ProbeUpload(chunks(), metadata=self._metadata(), timeout=seconds + 30)
        except grpc.aio.AioRpcError as error:
            raise translate(error, "upload probe") from error
        return int(result.bytes), float(result.seconds)

    async def probe_download(self, seconds: float, chunk_bytes: int) -> tuple[int, float]:
        """Receive filler for ``seconds``; returns (bytes after the first chunk, seconds between first and last)."""
        call = self._stub.ProbeDownload(
            pb.ProbeRequest(seconds=seconds, chunk_bytes=chunk_bytes), metadata=self._metadata(), timeout=seconds + 30
        )
        first: float | None = None
        last = 0.0
        total = 0
        try:
            async for chunk in call:
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    total += len(chunk.data)
                last = now
        except grpc.aio.AioRpcError as error:
            raise translate(error, "download probe") from error
        return total, (last - first) if first is not None else 0.0

    # -- weights -------------------------------------------------------------------------

    async def download_partition(self, run_id: str, partition: int, dest: Path) -> WeightHeader:
        """Write a partition's weights to ``dest``, checking size and sha256 against the header."""
        call = self._stub.DownloadPartition(
            pb.PartitionRequest(run_id=run_id, partition=partition), metadata=self._metadata()
        )
        digest = hashlib.sha256()
        received = 0
        try:
            messages = aiter(call)
            first = await anext(messages, None)
            if first is None:
                raise WeightsError(f"the server sent nothing for partition {partition} of run {run_id}")
            header = _protocol(serde.weight_header_from_proto, first)
            with dest.open("wb") as out:
                async for message in messages:
                    if message.WhichOneof("part") != "data":
                        raise WeightsError("the server sent a second header inside a weight stream")
                    received += len(message.data)
                    if received > header.total_bytes:
                        raise WeightsError(f"partition {partition} is longer than the {header.total_bytes} bytes announced")
                    digest.update(message.data)
                    await asyncio.to_thread(out.write, message.data)
        except grpc.aio.AioRpcError as error:
            raise translate(error, f"download of partition {partition}") from error
        if received != header.total_bytes or digest.hexdigest() != header.sha256:
            raise WeightsError(
                f"partition {partition} of run {run_id} arrived damaged ({received} of {header.total_bytes} "
                "bytes, or a sha256 mismatch); it will be fetched again"
            )
        return header

    async def upload_partition(self, header: WeightHeader, source: Path, chunk_bytes: int) -> None:
        """Send a weight file in chunks; the server checks size and sha256."""

        async def messages() -> AsyncIterator[pb.WeightChunk]:
            yield serde.weight_header_to_proto(header)
            with source.open("rb") as f:
                while data := await asyncio.to_thread(f.read, chunk_bytes):
                    yield pb.WeightChunk(data=data)

        try:
            reply = await self._stub.UploadPartition(messages(), metadata=self._metadata())
        except grpc.aio.AioRpcError as error:
            raise translate(error, f"upload of partition {header.partition}") from error
        if reply.sha256 != header.sha256:
            raise ControlCallError("the server confirmed an upload with a different sha256", code="DATA_LOSS")
