"""The control handler without gRPC: joining, liveness, commands, probes and weights."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from pathlib import Path

import pytest

from proto.messages import (
    CommandState,
    Heartbeat,
    RunState,
    RunStatus,
    StatusReport,
    StopRun,
    WeightHeader,
)
from server.control.handler import ControlHandler
from server.control.state import ClientRecord, ClientStatus
from server.errors import (
    AuthenticationError,
    ForbiddenError,
    IntegrityError,
    InvalidRequestError,
    LimitExceededError,
)

from .conftest import ALICE_KEY, FakeClock, RecordingListener, full_profile, registration


async def chunks(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def join(handler: ControlHandler, name: str = "c1", *, ready: bool = True, owner: bool = False) -> tuple[str, ClientRecord]:
    """Register a client (and report its full profile); returns its session token and record."""
    result = handler.register(registration(name, owner=owner))
    client = handler.authenticate(result.session_token)
    if ready:
        handler.report_profile(client, full_profile())
        client = handler.authenticate(result.session_token)
    return result.session_token, client


def test_register_with_join_token_opens_a_session(handler: ControlHandler) -> None:
    """A valid join token gives a session that authenticates as that client, measuring."""
    result = handler.register(registration("c1"))
    client = handler.authenticate(result.session_token)
    assert client.client_id == "c1" and client.status == ClientStatus.MEASURING
    assert result.heartbeat_timeout_s == handler.settings.heartbeat_timeout_s


def test_register_with_wrong_join_token_is_refused(handler: ControlHandler) -> None:
    """A wrong join token raises AuthenticationError naming the token."""
    with pytest.raises(AuthenticationError, match="join token is not valid"):
        handler.register(registration("c1", token="not-the-token"))


def test_register_without_credential_is_refused(handler: ControlHandler) -> None:
    """A registration with neither token nor key is refused."""
    with pytest.raises(AuthenticationError, match="needs a join token"):
        handler.register(registration("c1", token=None))


def test_keyed_client_registers_with_its_key(handler: ControlHandler) -> None:
    """A client the server knows by key registers with that key."""
    result = handler.register(registration("alice", token=None, key=ALICE_KEY))
    assert result.client_id == "alice"


def test_wrong_key_is_refused(handler: ControlHandler) -> None:
    """A known name with a wrong key, or an unknown name with a key, is refused."""
    with pytest.raises(AuthenticationError, match="unknown to this server or its key is wrong"):
        handler.register(registration("alice", token=None, key="wrong-key-123"))
    with pytest.raises(AuthenticationError):
        handler.register(registration("bob", token=None, key=ALICE_KEY))


def test_join_token_cannot_take_a_keyed_name(handler: ControlHandler) -> None:
    """The join token does not let a client register under a keyed client's name."""
    with pytest.raises(AuthenticationError, match="belongs to a keyed client"):
        handler.register(registration("alice"))


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "../etc"])
def test_bad_names_are_refused(handler: ControlHandler, name: str) -> None:
    """Names outside [A-Za-z0-9._-]{1,64} are invalid requests."""
    with pytest.raises(InvalidRequestError):
        handler.register(registration(name))


def test_profile_without_flops_is_refused(handler: ControlHandler) -> None:
    """A registration whose profile has no FLOP/s is an invalid request."""
    bad = replace(registration("c1"), profile=replace(full_profile(), flops_per_s=0.0))
    with pytest.raises(InvalidRequestError, match="FLOP/s"):
        handler.register(bad)


def test_unknown_session_is_refused(handler: ControlHandler) -> None:
    """A token the server never issued (or none) does not authenticate."""
    with pytest.raises(AuthenticationError):
        handler.authenticate("made-up")
    with pytest.raises(AuthenticationError):
        handler.authenticate(None)


def test_registering_again_ends_the_old_session(handler: ControlHandler) -> None:
    """A second registration under the same name invalidates the first session."""
    old, _ = join(handler, "c1")
    join(handler, "c1")
    with pytest.raises(AuthenticationError):
        handler.authenticate(old)


def test_report_profile_makes_client_ready_and_notifies(handler: ControlHandler, listener: RecordingListener) -> None:
    """A complete profile makes the client ready and tells the listener."""
    _, client = join(handler, "c1", ready=False)
    handler.report_profile(client, full_profile())
    assert handler.state.get_client("c1").status == ClientStatus.READY  # type: ignore[union-attr]
    assert listener.changes == 1


def test_profile_without_link_cannot_make_ready(handler: ControlHandler) -> None:
    """A profile lacking bandwidth is refused by report_profile."""
    _, client = join(handler, "c1", ready=False)
    with pytest.raises(InvalidRequestError, match="bandwidth"):
        handler.report_profile(client, replace(full_profile(), upload_bytes_per_s=0.0))


def test_silent_client_is_lost_after_timeout(handler: ControlHandler, clock: FakeClock, listener: RecordingListener) -> None:
    """No call for longer than the timeout marks a ready client lost and notifies once."""
    token, _ = join(handler, "c1")
    before = listener.changes
    clock.advance(handler.settings.heartbeat_timeout_s - 0.1)
    assert handler.expire() == []
    clock.advance(0.2)
    assert handler.expire() == ["c1"]
    assert handler.state.get_client("c1").status == ClientStatus.LOST  # type: ignore[union-attr]
    assert listener.changes == before + 1
    with pytest.raises(AuthenticationError, match="lost"):
        handler.authenticate(token)


def test_heartbeat_keeps_client_alive(handler: ControlHandler, clock: FakeClock) -> None:
    """Heartbeats within the timeout keep a client from being lost, and store its runs."""
    token, _ = join(handler, "c1")
    for _ in range(5):
        clock.advance(handler.settings.heartbeat_timeout_s * 0.8)
        client = handler.authenticate(token)
        handler.heartbeat(client, Heartbeat(runs=(RunStatus(run_id="r1", state=RunState.SERVING),)))
    assert handler.expire() == []
    assert handler.state.get_client("c1").runs[0].run_id == "r1"  # type: ignore[union-attr]


def test_heartbeat_with_bad_run_id_is_refused(handler: ControlHandler) -> None:
    """A run id with characters outside [A-Za-z0-9._-] is an invalid request."""
    _, client = join(handler, "c1")
    with pytest.raises(InvalidRequestError):
        handler.heartbeat(client, Heartbeat(runs=(RunStatus(run_id="a/b"),)))


def test_leave_stops_planning_with_client(handler: ControlHandler, listener: RecordingListener) -> None:
    """A client that leaves is marked left and the listener hears of it."""
    token, client = join(handler, "c1")
    before = listener.changes
    handler.leave(client, "bye")
    assert handler.state.get_client("c1").status == ClientStatus.LEFT  # type: ignore[union-attr]
    assert listener.changes == before + 1
    with pytest.raises(AuthenticationError):
        handler.authenticate(token)


async def test_command_stream_delivers_queued_and_new_commands(handler: ControlHandler) -> None:
    """Commands queued before and after the stream opens arrive in order."""
    _, client = join(handler, "c1")
    handler.send_command("c1", StopRun(run_id="r1"))
    stream = handler.commands(client)
    first = await asyncio.wait_for(anext(stream), 1)
    handler.send_command("c1", StopRun(run_id="r2"))
    second = await asyncio.wait_for(anext(stream), 1)
    assert [first.body.run_id, second.body.run_id] == ["r1", "r2"]  # type: ignore[union-attr]
    await stream.aclose()


async def test_command_stream_ends_when_client_is_lost(handler: ControlHandler, clock: FakeClock) -> None:
    """A waiting stream ends once its client is marked lost."""
    _, client = join(handler, "c1")
    stream = handler.commands(client)
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.01)
    clock.advance(handler.settings.heartbeat_timeout_s + 1)
    handler.expire()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, 1)


async def test_newer_stream_replaces_older(handler: ControlHandler) -> None:
    """Opening a second stream for the same session ends the first one."""
    _, client = join(handler, "c1")
    old = handler.commands(client)
    waiting = asyncio.ensure_future(anext(old))
    await asyncio.sleep(0.01)
    new = handler.commands(client)
    handler.send_command("c1", StopRun(run_id="r1"))
    delivered = await asyncio.wait_for(anext(new), 1)
    assert delivered.body.run_id == "r1"  # type: ignore[union-attr]
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, 1)


def test_acknowledged_command_is_not_resent(handler: ControlHandler, listener: RecordingListener) -> None:
    """A status report acknowledges its command and reaches the listener."""
    _, client = join(handler, "c1")
    command = handler.send_command("c1", StopRun(run_id="r1"))
    handler.report_status(client, StatusReport(command_id=command.command_id, state=CommandState.ACCEPTED))
    assert handler.state.pending_commands("c1") == []
    assert listener.reports[-1][0] == "c1"


def test_status_report_updates_the_clients_runs(handler: ControlHandler) -> None:
    """A report carrying a run replaces that run in the client's record."""
    _, client = join(handler, "c1")
    run = RunStatus(run_id="r1", state=RunState.SERVING, bridge_url="ws://127.0.0.1:1")
    handler.report_status(client, StatusReport(command_id=1, state=CommandState.DONE, run=run))
    assert handler.state.get_client("c1").runs == (run,)  # type: ignore[union-attr]


def test_an_oversized_host_certificate_is_refused(handler: ControlHandler) -> None:
    """A certificate too large to be a host's is refused whole (never truncated into another one)."""
    _, client = join(handler, "c1")
    run = RunStatus(run_id="r1", state=RunState.SERVING, bridge_url="wss://127.0.0.1:1", bridge_cert_pem="x" * 20000)
    with pytest.raises(InvalidRequestError, match="certificate"):
        handler.report_status(client, StatusReport(command_id=1, state=CommandState.DONE, run=run))
    assert handler.state.get_client("c1").runs == ()  # type: ignore[union-attr]


async def test_upload_probe_counts_bytes_after_first_chunk(handler: ControlHandler) -> None:
    """The probe result excludes the first chunk, which opened the stream."""
    _, client = join(handler, "c1")
    result = await handler.probe_upload(client, chunks([b"x" * 1000] * 5))
    assert result.bytes == 4000 and result.seconds >= 0


async def test_upload_probe_refuses_oversize_chunks(handler: ControlHandler) -> None:
    """A probe chunk above max_chunk_bytes is over the limit."""
    _, client = join(handler, "c1")
    with pytest.raises(LimitExceededError):
        await handler.probe_upload(client, chunks([b"x" * (handler.settings.max_chunk_bytes + 1)]))


async def test_download_probe_is_capped(handler: ControlHandler) -> None:
    """A download probe stops at probe_max_bytes even when asked for longer."""
    _, client = join(handler, "c1")
    total = 0
    async for chunk in handler.probe_download(client, 60.0, 0):
        total += len(chunk)
    assert total <= handler.settings.probe_max_bytes + handler.settings.max_chunk_bytes


async def test_download_probe_needs_positive_duration(handler: ControlHandler) -> None:
    """A probe of zero or NaN seconds is an invalid request."""
    _, client = join(handler, "c1")
    for seconds in (0.0, float("nan")):
        with pytest.raises(InvalidRequestError):
            async for _ in handler.probe_download(client, seconds, 0):
                pass


async def test_weights_go_only_to_the_assigned_client(handler: ControlHandler, tmp_path: Path) -> None:
    """A partition's weights stream to its client in chunks, and are forbidden to others."""
    _, owner = join(handler, "c1")
    _, other = join(handler, "c2")
    data = bytes(range(256)) * 1000
    source = tmp_path / "stage.safetensors"
    source.write_bytes(data)
    handler.weights.add("r1", 0, source, clients=["c1"])
    header, stream = handler.partition_weights(owner, "r1", 0)
    received = [chunk async for chunk in stream]
    assert b"".join(received) == data and header.sha256 == hashlib.sha256(data).hexdigest()
    assert max(len(c) for c in received) <= handler.weights.chunk_bytes
    with pytest.raises(ForbiddenError):
        handler.partition_weights(other, "r1", 0)


async def test_upload_with_wrong_digest_is_rejected(handler: ControlHandler) -> None:
    """Bytes that do not hash to the announced sha256 are not kept."""
    _, client = join(handler, "c1")
    handler.expect_upload("c1", "r1", 1, 0, max_bytes=100)
    header = WeightHeader(run_id="r1", partition=1, total_bytes=4, sha256="0" * 64)
    with pytest.raises(IntegrityError, match="sha256"):
        await handler.upload_partition(client, header, chunks([b"abcd"]))
    assert handler.state.list_uploads() == []


async def test_upload_longer_than_announced_is_rejected(handler: ControlHandler) -> None:
    """An upload that sends more bytes than its header said is rejected."""
    _, client = join(handler, "c1")
    data = b"abcdef"
    handler.expect_upload("c1", "r1", 1, 0, max_bytes=100)
    header = WeightHeader(run_id="r1", partition=1, total_bytes=3, sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(IntegrityError, match="more than"):
        await handler.upload_partition(client, header, chunks([data]))


async def test_upload_is_kept_when_it_checks_out(handler: ControlHandler) -> None:
    """A correct upload is stored and listed."""
    _, client = join(handler, "c1")
    data = b"weights" * 100
    handler.expect_upload("c1", "r1", 2, 3, max_bytes=len(data))
    header = WeightHeader(run_id="r1", partition=2, total_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), round=3)
    receipt = await handler.upload_partition(client, header, chunks([data[:300], data[300:]]))
    (upload,) = handler.state.list_uploads("r1")
    assert receipt.sha256 == header.sha256 and Path(upload.path).read_bytes() == data


async def test_upload_over_limit_is_refused(handler: ControlHandler) -> None:
    """An upload announcing more than max_upload_bytes is refused before reading."""
    _, client = join(handler, "c1")
    handler.expect_upload("c1", "r1", 0, 0, max_bytes=handler.settings.max_upload_bytes * 2)
    header = WeightHeader(run_id="r1", partition=0, total_bytes=handler.settings.max_upload_bytes + 1, sha256="0" * 64)
    with pytest.raises(LimitExceededError):
        await handler.upload_partition(client, header, chunks([]))
