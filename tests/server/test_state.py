"""One suite for every ControlState implementation (today: in memory)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from proto.messages import CommandState, StatusReport, StopRun, WeightHeader
from server.control.state import (
    ClientRecord,
    ClientStatus,
    ControlState,
    Deployment,
    InMemoryState,
    StoredUpload,
)
from server.errors import NotFoundError

IMPLEMENTATIONS: list[Callable[[], ControlState]] = [InMemoryState]


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda f: f.__name__)
def state(request: pytest.FixtureRequest) -> ControlState:
    return request.param()


def record(client_id: str, session: str = "s1", status: ClientStatus = ClientStatus.READY) -> ClientRecord:
    return ClientRecord(client_id=client_id, status=status, session_digest=session)


def test_put_and_get_client(state: ControlState) -> None:
    """A stored client comes back equal, by id and by session."""
    state.put_client(record("a", "sa"))
    assert state.get_client("a") == record("a", "sa")
    assert state.client_by_session("sa") == record("a", "sa")
    assert state.get_client("b") is None


def test_replacing_a_client_forgets_its_old_session(state: ControlState) -> None:
    """A new session of the same client makes the old session unknown."""
    state.put_client(record("a", "old"))
    state.put_client(record("a", "new"))
    assert state.client_by_session("old") is None
    assert state.client_by_session("new") is not None


def test_list_clients_is_sorted_by_id(state: ControlState) -> None:
    """Clients are listed by id, whatever the order of registration."""
    for name in ("c", "a", "b"):
        state.put_client(record(name, f"s{name}"))
    assert [c.client_id for c in state.list_clients()] == ["a", "b", "c"]


def test_update_client_changes_only_named_fields(state: ControlState) -> None:
    """update_client returns and stores the changed record."""
    state.put_client(record("a"))
    updated = state.update_client("a", status=ClientStatus.LOST, status_reason="quiet")
    assert updated.status == ClientStatus.LOST and updated.session_digest == "s1"
    assert state.get_client("a") == updated


def test_update_of_unknown_client_raises(state: ControlState) -> None:
    """Updating a client that never registered is a NotFoundError."""
    with pytest.raises(NotFoundError):
        state.update_client("ghost", status=ClientStatus.LOST)


def test_commands_are_queued_in_order_with_growing_ids(state: ControlState) -> None:
    """Command ids grow across clients and pending commands come oldest first."""
    first = state.push_command("a", StopRun(run_id="r1"))
    other = state.push_command("b", StopRun(run_id="r2"))
    second = state.push_command("a", StopRun(run_id="r3"))
    assert first.command_id < other.command_id < second.command_id
    assert state.pending_commands("a") == [first, second]
    assert state.pending_commands("a", after=first.command_id) == [second]


def test_acknowledged_commands_are_not_pending(state: ControlState) -> None:
    """An acknowledged command leaves the queue; dropping clears the rest."""
    first = state.push_command("a", StopRun(run_id="r1"))
    second = state.push_command("a", StopRun(run_id="r2"))
    state.acknowledge("a", first.command_id)
    assert state.pending_commands("a") == [second]
    state.drop_commands("a")
    assert state.pending_commands("a") == []


def test_latest_status_report_wins(state: ControlState) -> None:
    """command_status returns the last report of a command."""
    state.record_status("a", StatusReport(command_id=7, state=CommandState.ACCEPTED))
    state.record_status("a", StatusReport(command_id=7, state=CommandState.DONE))
    report = state.command_status(7)
    assert report is not None and report.state == CommandState.DONE
    assert state.command_status(8) is None


def test_deployment_is_replaced(state: ControlState) -> None:
    """The state holds one current deployment."""
    assert state.get_deployment() is None
    state.set_deployment(Deployment(generation=1, plan_id="plan-1", created_at=0.0))
    state.set_deployment(Deployment(generation=2, plan_id="plan-2", created_at=1.0))
    current = state.get_deployment()
    assert current is not None and current.plan_id == "plan-2"


def test_uploads_filter_by_run(state: ControlState) -> None:
    """Uploads are listed oldest first, optionally of one run."""
    for run in ("r1", "r2", "r1"):
        header = WeightHeader(run_id=run, partition=0, total_bytes=1, sha256="0" * 64)
        state.add_upload(StoredUpload(client_id="a", header=header, path=f"/x/{run}"))
    assert [u.header.run_id for u in state.list_uploads()] == ["r1", "r2", "r1"]
    assert len(state.list_uploads("r1")) == 2
