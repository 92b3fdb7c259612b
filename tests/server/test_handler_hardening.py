"""The control handler against rogue clients: uploads nobody asked for, quotas, expiry, foreign reports, bad profiles."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace

import pytest

from proto.messages import CommandState, RunState, RunStatus, StatusReport, WeightHeader
from server.control.handler import ControlHandler
from server.control.state import Deployment, PlanRow
from server.errors import ForbiddenError, InvalidRequestError, LimitExceededError

from .conftest import FakeClock, RecordingListener, full_profile
from .test_handler import join


async def chunks(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def header_of(data: bytes, *, run_id: str = "r1", partition: int = 0, round: int = 1) -> WeightHeader:
    return WeightHeader(
        run_id=run_id,
        partition=partition,
        total_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        round=round,
    )


async def test_upload_nobody_asked_for_is_forbidden_before_anything_is_written(
    handler: ControlHandler,
) -> None:
    """A well-formed upload for a run, partition or round the server did not ask this client for writes nothing."""
    _, client = join(handler, "c1")
    data = b"x" * 1000
    handler.expect_upload("c2", "r1", 0, 1, max_bytes=4096)  # another client's
    for header in (header_of(data, run_id="no-such-run"), header_of(data), header_of(data, round=2)):
        with pytest.raises(ForbiddenError, match="did not ask"):
            await handler.upload_partition(client, header, chunks([data]))
    assert handler.state.list_uploads() == []
    assert list((handler.weights.root / "uploads").iterdir()) == []


async def test_upload_over_the_expected_size_is_refused_before_reading(handler: ControlHandler) -> None:
    """An upload announcing more than the partition can need is refused and nothing is written."""
    _, client = join(handler, "c1")
    handler.expect_upload("c1", "r1", 0, 1, max_bytes=100)
    data = b"x" * 101
    with pytest.raises(LimitExceededError, match="expected"):
        await handler.upload_partition(client, header_of(data), chunks([data]))
    assert list((handler.weights.root / "uploads").iterdir()) == []


async def test_an_expected_upload_is_taken_once(handler: ControlHandler) -> None:
    """The asked-for upload is kept; the same upload again is forbidden, and so is one of a forgotten run."""
    _, client = join(handler, "c1")
    handler.expect_upload("c1", "r1", 0, 1, max_bytes=100)
    handler.expect_upload("c1", "r2", 0, 1, max_bytes=100)
    data = b"y" * 50
    await handler.upload_partition(client, header_of(data), chunks([data]))
    assert len(handler.state.list_uploads("r1")) == 1
    with pytest.raises(ForbiddenError):
        await handler.upload_partition(client, header_of(data), chunks([data]))
    handler.forget_uploads("r2")
    with pytest.raises(ForbiddenError):
        await handler.upload_partition(client, header_of(data, run_id="r2"), chunks([data]))


async def test_a_client_has_a_quota_of_open_transfers(handler: ControlHandler) -> None:
    """With max_streams_per_client transfers open, another probe or upload of that client is refused; others' are not."""
    _, client = join(handler, "c1")
    _, other = join(handler, "c2")
    held = [handler.byte_stream(client) for _ in range(handler.settings.max_streams_per_client)]
    for stream in held:
        stream.__enter__()
    with pytest.raises(LimitExceededError, match="transfers open"):
        await handler.probe_upload(client, chunks([b"a"]))
    handler.expect_upload("c1", "r1", 0, 1, max_bytes=100)
    with pytest.raises(LimitExceededError, match="transfers open"):
        await handler.upload_partition(client, header_of(b"z"), chunks([b"z"]))
    assert (await handler.probe_upload(other, chunks([b"a", b"bc"]))).bytes == 2
    for stream in held:
        stream.__exit__(None, None, None)
    assert (await handler.probe_upload(client, chunks([b"a", b"bc"]))).bytes == 2


def test_lost_clients_leave_the_registry(handler: ControlHandler, clock: FakeClock) -> None:
    """A lost client is kept for forget_after_s (visible as lost), then forgotten; the name can join again."""
    join(handler, "c1")
    clock.advance(handler.settings.heartbeat_timeout_s + 1)
    assert handler.expire() == ["c1"]
    assert handler.state.get_client("c1") is not None
    clock.advance(handler.settings.forget_after_s)
    handler.expire()
    assert handler.state.list_clients() == []
    join(handler, "c1")
    assert [c.client_id for c in handler.state.list_clients()] == ["c1"]


def _plan(*clients: str) -> Deployment:
    rows = tuple(
        PlanRow(pipeline=0, owner_id=clients[0], run_id="plan-1-p0", partition=i, layer_start=i, layer_end=i + 1,
                params=1, client_id=c, est_compute_s=0.0, est_transfer_s=0.0, why="")
        for i, c in enumerate(clients)
    )  # fmt: skip
    return Deployment(generation=1, plan_id="plan-1", created_at=0.0, rows=rows, owners=(clients[0],))


def test_only_participants_report_on_a_plan_run(handler: ControlHandler, listener: RecordingListener) -> None:
    """A client with no part in a run of the plan cannot fail it; a participant can."""
    _, outsider = join(handler, "mallory")
    _, host = join(handler, "host")
    handler.state.set_deployment(_plan("owner", "host"))
    failed = StatusReport(command_id=1, state=CommandState.FAILED, message="boom",
                          run=RunStatus(run_id="plan-1-p0", state=RunState.FAILED))  # fmt: skip
    with pytest.raises(ForbiddenError, match="no part"):
        handler.report_status(outsider, failed)
    assert listener.reports == []
    handler.report_status(host, failed)
    assert [c for c, _ in listener.reports] == ["host"]


@pytest.mark.parametrize("command_id", [0, 2**63, 2**64 - 1])
def test_a_report_on_an_impossible_command_id_is_refused(
    handler: ControlHandler, listener: RecordingListener, command_id: int
) -> None:
    """Ids start at 1 and fit SQLite's integers; bench/fuzz.py met UNKNOWN ("int too large") for 2^64 - 1."""
    _, client = join(handler, "c1")
    with pytest.raises(InvalidRequestError, match="command_id"):
        handler.report_status(client, StatusReport(command_id=command_id, state=CommandState.ACCEPTED))
    assert listener.reports == [] and handler.state.command_status(command_id) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("flops_per_s", 5e-324),
        ("flops_per_s", 1e30),
        ("upload_bytes_per_s", 5e-324),
        ("download_bytes_per_s", float("inf")),
        ("rtt_s", 1e9),
        ("capacity", 10**9),
    ],
)
def test_implausible_profiles_are_refused_with_the_reason(
    handler: ControlHandler, field: str, value: float
) -> None:
    """A profile value no device has is refused, naming the field and the plausible range."""
    _, client = join(handler, "c1", ready=False)
    with pytest.raises(InvalidRequestError, match=f"{field} is .*outside"):
        handler.report_profile(client, replace(full_profile(), **{field: value}))
