"""The control plane's logic, independent of gRPC.

:class:`ControlHandler` does what each RPC means: it checks credentials and inputs, keeps the
registry in a :class:`~server.control.state.ControlState`, feeds command streams, and tells a
:class:`ControlListener` (the coordinator) when the set of usable clients changes or a client
reports progress. It raises :mod:`server.errors`; the servicer maps those to status codes.

Everything arriving from a client is checked explicitly: names, numbers, chunk sizes, totals.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol

from proto.messages import (
    PROTOCOL_VERSION,
    Command,
    CommandBody,
    CommandState,
    DeviceProfile,
    Heartbeat,
    ProbeResult,
    Registration,
    RunStatus,
    Session,
    StatusReport,
    UploadReceipt,
    WeightHeader,
)
from server.config import AuthSettings, ControlSettings
from server.control.state import LIVE_STATUSES, ClientRecord, ClientStatus, ControlState, StoredUpload
from server.control.weights import WeightStore
from server.errors import (
    AuthenticationError,
    ForbiddenError,
    InvalidRequestError,
    LimitExceededError,
)

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_RUN_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_MAX_RUNS_REPORTED = 64
_MAX_TEXT = 4096  # longest free-text field kept from a client
_MAX_CERT_PEM = 16384  # a stage host's TLS certificate (PEM); a P-256 one is under 1 KiB
# A probe may run a little past its nominal length: the last chunk is in flight when time is up.
_PROBE_GRACE_S = 2.0
# What a real device can report; a value outside is a bug or a lie, and planning on it helps nobody.
# (The fastest accelerators do ~1e15 FLOP/s; a link of 1e12 B/s is 8 Tbit/s.)
PROFILE_BOUNDS: dict[str, tuple[float, float]] = {
    "flops_per_s": (1e3, 1e17),
    "upload_bytes_per_s": (1e2, 1e12),
    "download_bytes_per_s": (1e2, 1e12),
    "rtt_s": (1e-7, 60.0),
    "memory_bytes": (0, 1 << 50),
    "gpu_memory_bytes": (0, 1 << 50),
    "capacity": (1, 1024),
}


@dataclass(frozen=True, slots=True)
class UploadGrant:
    """An upload the server asked a client for: which partition of which run and round, and its largest size."""

    client_id: str
    run_id: str
    partition: int
    round: int


class ControlListener(Protocol):
    """Who wants to know about changes (the coordinator)."""

    def membership_changed(self) -> None:
        """The set of ready clients, or one of their profiles, changed."""

    def status_reported(self, client_id: str, report: StatusReport) -> None:
        """A client reported progress on a command."""


def session_digest(token: str) -> str:
    """What the state keeps of a session token."""
    return hashlib.sha256(token.encode()).hexdigest()


def _same_secret(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class ControlHandler:
    """Does the work of every control RPC against ``state``."""

    def __init__(
        self,
        state: ControlState,
        *,
        settings: ControlSettings,
        auth: AuthSettings,
        weights: WeightStore,
        listener: ControlListener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state = state
        self.settings = settings
        self.auth = auth
        self.weights = weights
        self.listener = listener
        self.clock = clock
        self._wakeups: dict[str, asyncio.Event] = {}
        self._stream_epochs: dict[str, int] = {}
        self._upload_grants: dict[UploadGrant, int] = {}  # -> most bytes the upload may have
        self._streams: dict[str, int] = {}  # client id -> byte streams (probes, transfers) open now
        # Probe filler: random, so no layer on the way can compress it.
        self._filler = os.urandom(settings.max_chunk_bytes)

    # -- joining -------------------------------------------------------------------------

    def register(self, registration: Registration) -> Session:
        """Let a client in (a new session, replacing any earlier one under the same name)."""
        if registration.protocol_version != PROTOCOL_VERSION:
            raise InvalidRequestError(
                f"this server speaks control protocol {PROTOCOL_VERSION}, the client "
                f"{registration.protocol_version}; install matching versions of titanic"
            )
        if not _NAME.match(registration.name):
            raise InvalidRequestError(
                f"client name {registration.name!r} is not allowed; use 1-64 characters of [A-Za-z0-9._-]"
            )
        self._check_credential(registration)
        _check_profile(registration.profile, need_link=False)
        token = secrets.token_urlsafe(32)
        previous = self.state.get_client(registration.name)
        record = ClientRecord(
            client_id=registration.name,
            status=ClientStatus.MEASURING,
            session_digest=session_digest(token),
            info=registration.info,
            profile=registration.profile,
            address=registration.address,
            registered_at=time.time(),
            last_seen=self.clock(),
        )
        self.state.put_client(record)
        self.state.drop_commands(record.client_id)
        self._wake(record.client_id)  # ends the previous session's command stream
        log.info("client %s registered from %s", record.client_id, record.address or "?")
        if previous is not None and previous.status == ClientStatus.READY:
            self._membership_changed()
        return Session(
            client_id=record.client_id,
            session_token=token,
            heartbeat_interval_s=self.settings.heartbeat_interval_s,
            heartbeat_timeout_s=self.settings.heartbeat_timeout_s,
            max_chunk_bytes=self.settings.max_chunk_bytes,
            probe_max_seconds=self.settings.probe_max_seconds,
        )

    def _check_credential(self, registration: Registration) -> None:
        name = registration.name
        if registration.client_key is not None:
            expected = self.auth.client_keys.get(name)
            if expected is None or not _same_secret(expected, registration.client_key):
                raise AuthenticationError(
                    f"client {name!r} is unknown to this server or its key is wrong; the operator "
                    "lists known clients and their keys under [auth.client_keys]"
                )
            return
        if registration.join_token is None:
            raise AuthenticationError("registration needs a join token (--token) or a client key (--key)")
        if name in self.auth.client_keys:
            raise AuthenticationError(f"the name {name!r} belongs to a keyed client; register with its key")
        if not any(_same_secret(t, registration.join_token) for t in self.auth.join_tokens):
            raise AuthenticationError(
                "the join token is not valid for this server; ask its operator for the current token"
            )

    def authenticate(self, session_token: str | None, *, touch: bool = True) -> ClientRecord:
        """The live client a session token belongs to; marks it seen unless ``touch`` is False."""
        if not session_token:
            raise AuthenticationError("this call needs a session; register first")
        record = self.state.client_by_session(session_digest(session_token))
        if record is None:
            raise AuthenticationError(
                "unknown session (the server restarted or the client registered again); register again"
            )
        if record.status not in LIVE_STATUSES:
            raise AuthenticationError(
                f"the session of {record.client_id!r} has ended ({record.status}: {record.status_reason}); "
                "register again"
            )
        return self.state.update_client(record.client_id, last_seen=self.clock()) if touch else record

    def report_profile(self, client: ClientRecord, profile: DeviceProfile) -> None:
        """Store a complete profile; the client becomes ready for planning."""
        _check_profile(profile, need_link=True)
        changed = client.status != ClientStatus.READY or client.profile != profile
        self.state.update_client(client.client_id, profile=profile, status=ClientStatus.READY)
        log.info(
            "client %s ready: %.3g FLOP/s, %.3g MB/s up, %.3g MB/s down, rtt %.1f ms",
            client.client_id,
            profile.flops_per_s,
            profile.upload_bytes_per_s / 1e6,
            profile.download_bytes_per_s / 1e6,
            profile.rtt_s * 1e3,
        )
        if changed:
            self._membership_changed()

    def leave(self, client: ClientRecord, reason: str) -> None:
        """The client says goodbye; it is no longer planned for."""
        self._end_session(client, ClientStatus.LEFT, reason[:_MAX_TEXT] or "left")

    # -- liveness ------------------------------------------------------------------------

    def heartbeat(self, client: ClientRecord, beat: Heartbeat) -> float:
        """Record a heartbeat; returns the interval the client should keep."""
        runs = _check_runs(beat.runs)
        self.state.update_client(
            client.client_id, runs=runs, free_memory_bytes=beat.free_memory_bytes, last_seen=self.clock()
        )
        return self.settings.heartbeat_interval_s

    def expire(self) -> list[str]:
        """Mark clients silent for longer than the timeout as lost; returns their ids."""
        deadline = self.clock() - self.settings.heartbeat_timeout_s
        lost = [c for c in self.state.list_clients() if c.status in LIVE_STATUSES and c.last_seen < deadline]
        for client in lost:
            log.warning("client %s lost: no heartbeat for %.1f s", client.client_id, self.clock() - client.last_seen)
            self._end_session(
                client, ClientStatus.LOST, f"no heartbeat for {self.settings.heartbeat_timeout_s:g} s", notify=False
            )
        if lost:
            self._membership_changed()
        self._forget_departed()
        return [c.client_id for c in lost]

    def _forget_departed(self) -> None:
        """Drop clients lost or gone for longer than ``forget_after_s``: the registry does not grow forever."""
        deadline = self.clock() - self.settings.forget_after_s
        for client in self.state.list_clients():
            if client.status not in LIVE_STATUSES and client.last_seen < deadline:
                self.state.remove_client(client.client_id)
                self._wakeups.pop(client.client_id, None)
                self._stream_epochs.pop(client.client_id, None)
                log.info("client %s forgotten (%s %.0f s ago)", client.client_id, client.status, self.clock() - client.last_seen)

    def mark_lost(self, client_id: str, reason: str) -> bool:
        """End a live client's session as lost (a peer reported it gone); returns whether it was live.

        Planning then leaves it out at once instead of after the heartbeat timeout; if it is
        still alive it registers again, as after any lost session.
        """
        client = self.state.get_client(client_id)
        if client is None or client.status not in LIVE_STATUSES:
            return False
        log.warning("client %s lost: %s", client_id, reason)
        self._end_session(client, ClientStatus.LOST, reason[:_MAX_TEXT])
        return True

    def request_replan(self) -> None:
        """Ask the listeners to plan again although no client came or went (a run lost its plan's pipelines)."""
        self._membership_changed()

    def _end_session(self, client: ClientRecord, status: ClientStatus, reason: str, *, notify: bool = True) -> None:
        was_ready = client.status == ClientStatus.READY
        self.state.update_client(client.client_id, status=status, status_reason=reason)
        self.state.drop_commands(client.client_id)
        self._wake(client.client_id)
        if notify and was_ready:
            self._membership_changed()

    # -- commands ------------------------------------------------------------------------

    def send_command(self, client_id: str, body: CommandBody) -> Command:
        """Queue a command for a client; its command stream delivers it."""
        command = self.state.push_command(client_id, body)
        self._wake(client_id)
        return command

    def commands(self, client: ClientRecord) -> AsyncIterator[Command]:
        """The commands of ``client``'s session as they come; ends when the session ends.

        A newer stream of the same client ends an older one (from the moment this is
        called), so a client that reopened its stream never has two readers.
        """
        epoch = self._stream_epochs.get(client.client_id, 0) + 1
        self._stream_epochs[client.client_id] = epoch
        self._wake(client.client_id)
        return self._command_stream(client, epoch)

    async def _command_stream(self, client: ClientRecord, epoch: int) -> AsyncIterator[Command]:
        client_id = client.client_id
        event = self._wakeups.setdefault(client_id, asyncio.Event())
        sent = 0
        while True:
            event.clear()
            current = self.state.get_client(client_id)
            if (
                current is None
                or current.session_digest != client.session_digest
                or current.status not in LIVE_STATUSES
                or self._stream_epochs.get(client_id) != epoch
            ):
                return
            pending = self.state.pending_commands(client_id, after=sent)
            for command in pending:
                yield command
                sent = command.command_id
            if not pending:
                await event.wait()

    def report_status(self, client: ClientRecord, report: StatusReport) -> None:
        """Record a client's progress on a command and pass it on."""
        if not 0 < report.command_id < 2**63:  # ids are issued from 1 and stored as SQLite integers
            raise InvalidRequestError(
                f"a status report must name the command it is about (0 < command_id < 2^63), got {report.command_id}"
            )
        report = replace(report, message=report.message[:_MAX_TEXT])
        if report.run is not None:
            self._check_participant(client, report.run.run_id)
        if report.state in (CommandState.ACCEPTED, CommandState.DONE, CommandState.FAILED):
            self.state.acknowledge(client.client_id, report.command_id)
        if report.run is not None:
            (run,) = _check_runs((report.run,))
            others = tuple(r for r in client.runs if r.run_id != run.run_id)
            self.state.update_client(client.client_id, runs=(*others, run)[-_MAX_RUNS_REPORTED:])
        self.state.record_status(client.client_id, report)
        if self.listener is not None:
            self.listener.status_reported(client.client_id, report)

    def _check_participant(self, client: ClientRecord, run_id: str) -> None:
        """A run of the current plan hears only from the clients the plan gave it."""
        deployment = self.state.get_deployment()
        if deployment is None or run_id not in deployment.run_ids():
            return
        if client.client_id not in {r.client_id for r in deployment.rows if r.run_id == run_id}:
            raise ForbiddenError(f"client {client.client_id!r} has no part in run {run_id!r}; it cannot report on it")

    def _wake(self, client_id: str) -> None:
        event = self._wakeups.get(client_id)
        if event is not None:
            event.set()

    def _membership_changed(self) -> None:
        if self.listener is not None:
            self.listener.membership_changed()

    # -- per-client quota on byte streams ---------------------------------------------------

    @contextlib.contextmanager
    def byte_stream(self, client: ClientRecord) -> Iterator[None]:
        """Hold one of the client's ``max_streams_per_client`` byte streams for the duration."""
        open_now = self._streams.get(client.client_id, 0)
        if open_now >= self.settings.max_streams_per_client:
            raise LimitExceededError(
                f"client {client.client_id!r} has {open_now} transfers open already, the most one client may have; "
                "wait for one to finish"
            )
        self._streams[client.client_id] = open_now + 1
        try:
            yield
        finally:
            left = self._streams[client.client_id] - 1
            if left:
                self._streams[client.client_id] = left
            else:
                del self._streams[client.client_id]

    # -- probes --------------------------------------------------------------------------

    async def probe_upload(self, client: ClientRecord, chunks: AsyncIterator[bytes]) -> ProbeResult:
        """Receive an upload probe; returns what arrived after the first chunk, and over how long."""
        first: float | None = None
        last = 0.0
        total = 0
        limit_s = self.settings.probe_max_seconds + _PROBE_GRACE_S
        with self.byte_stream(client):
            async for chunk in chunks:
                now = time.perf_counter()
                if len(chunk) > self.settings.max_chunk_bytes:
                    raise LimitExceededError(f"probe chunks may be at most {self.settings.max_chunk_bytes} bytes")
                if first is None:
                    first = now
                else:
                    total += len(chunk)
                last = now
                if total > self.settings.probe_max_bytes or now - first > limit_s:
                    raise LimitExceededError(
                        f"a probe may move at most {self.settings.probe_max_bytes} bytes in "
                        f"{self.settings.probe_max_seconds:g} s"
                    )
        if first is None:
            raise InvalidRequestError("an upload probe needs at least one chunk")
        return ProbeResult(bytes=total, seconds=last - first)

    async def probe_download(self, client: ClientRecord, seconds: float, chunk_bytes: int) -> AsyncIterator[bytes]:
        """Stream filler for ``seconds`` (capped by the settings) in chunks of ``chunk_bytes``."""
        if not math.isfinite(seconds) or seconds <= 0:
            raise InvalidRequestError(f"a download probe needs a positive duration, got {seconds}")
        seconds = min(seconds, self.settings.probe_max_seconds)
        size = min(chunk_bytes or self.settings.max_chunk_bytes, self.settings.max_chunk_bytes)
        chunk = self._filler[:size]
        sent = 0
        with self.byte_stream(client):
            start = time.perf_counter()
            while time.perf_counter() - start < seconds and sent < self.settings.probe_max_bytes:
                yield chunk
                sent += len(chunk)

    # -- weights -------------------------------------------------------------------------

    def partition_weights(self, client: ClientRecord, run_id: str, partition: int) -> tuple[WeightHeader, AsyncIterator[bytes]]:
        """The header and chunks of a partition the client was assigned."""
        stored = self.weights.get(run_id, partition, client_id=client.client_id)
        header = WeightHeader(run_id=run_id, partition=partition, total_bytes=stored.size, sha256=stored.sha256)
        return header, self.weights.read_chunks(stored)

    def expect_upload(self, client_id: str, run_id: str, partition: int, round: int, *, max_bytes: int) -> None:
        """Let ``client_id`` upload ``partition`` of ``run_id`` for ``round`` once, of at most ``max_bytes``."""
        self._upload_grants[UploadGrant(client_id, run_id, partition, round)] = max_bytes

    def expected_upload(self, client_id: str, run_id: str, partition: int, round: int) -> int | None:
        """The most bytes the server takes of that upload, or None when it did not ask for it."""
        return self._upload_grants.get(UploadGrant(client_id, run_id, partition, round))

    def forget_uploads(self, run_id: str) -> None:
        """Withdraw the uploads still expected for ``run_id`` (it ended)."""
        for grant in [g for g in self._upload_grants if g.run_id == run_id]:
            del self._upload_grants[grant]

    def _granted(self, client: ClientRecord, header: WeightHeader) -> UploadGrant:
        """The grant an upload's header matches; raised before anything is read or written."""
        if not _RUN_ID.match(header.run_id):
            raise InvalidRequestError(f"run id {header.run_id!r} is not valid")
        grant = UploadGrant(client.client_id, header.run_id, header.partition, header.round)
        max_bytes = self._upload_grants.get(grant)
        if max_bytes is None:
            raise ForbiddenError(
                f"the server did not ask {client.client_id!r} for partition {header.partition} of run "
                f"{header.run_id!r} (round {header.round}); only the holder of a partition of an active run uploads it"
            )
        if header.total_bytes > max_bytes:
            raise LimitExceededError(
                f"an upload of {header.total_bytes} bytes is more than the {max_bytes} bytes expected of "
                f"partition {header.partition} of run {header.run_id!r}"
            )
        return grant

    async def upload_partition(
        self, client: ClientRecord, header: WeightHeader, chunks: AsyncIterator[bytes]
    ) -> UploadReceipt:
        """Receive weights (or an update) the server asked for; kept only when size and digest match."""
        grant = self._granted(client, header)

        async def checked() -> AsyncIterator[bytes]:
            async for chunk in chunks:
                if len(chunk) > self.settings.max_chunk_bytes:
                    raise LimitExceededError(f"chunks may be at most {self.settings.max_chunk_bytes} bytes")
                yield chunk

        with self.byte_stream(client):
            path = await self.weights.receive_upload(
                header, checked(), client_id=client.client_id, max_bytes=self.settings.max_upload_bytes
            )
        self._upload_grants.pop(grant, None)
        self.state.add_upload(
            StoredUpload(client_id=client.client_id, header=header, path=str(path), received_at=time.time())
        )
        return UploadReceipt(sha256=header.sha256, total_bytes=header.total_bytes)


def _check_profile(profile: DeviceProfile, *, need_link: bool) -> None:
    if profile.flops_per_s == 0:
        raise InvalidRequestError("the profile has no FLOP/s; measure it (or declare it) before registering")
    for name, (low, high) in PROFILE_BOUNDS.items():
        value = getattr(profile, name)
        if value == 0 and name in ("upload_bytes_per_s", "download_bytes_per_s", "rtt_s"):
            continue  # not measured yet
        if not (math.isfinite(value) and low <= value <= high):
            raise InvalidRequestError(
                f"profile field {name} is {value}, outside what a device can have ({low:g}..{high:g}); "
                "measure it again or declare a real value"
            )
    if profile.device not in ("cpu", "cuda", "mps"):
        raise InvalidRequestError(f"profile device must be cpu, cuda or mps, got {profile.device!r}")
    if need_link and not profile.has_link:
        raise InvalidRequestError("the profile lacks upload and download bandwidth; measure the link first")
    if need_link and profile.training_memory_bytes <= 0:
        raise InvalidRequestError(f"the profile has no free memory on its training device ({profile.device})")


def _check_runs(runs: tuple[RunStatus, ...]) -> tuple[RunStatus, ...]:
    if len(runs) > _MAX_RUNS_REPORTED:
        raise InvalidRequestError(f"at most {_MAX_RUNS_REPORTED} runs may be reported at once")
    for run in runs:
        if not _RUN_ID.match(run.run_id):
            raise InvalidRequestError(f"run id {run.run_id!r} is not valid")
        if len(run.bridge_cert_pem) > _MAX_CERT_PEM:
            raise InvalidRequestError(f"run {run.run_id}: the host certificate is over {_MAX_CERT_PEM} characters")
    return tuple(replace(r, message=r.message[:_MAX_TEXT], bridge_url=r.bridge_url[:_MAX_TEXT]) for r in runs)
