"""One suite for every ControlState implementation (in memory, SQLite), and what SQLite keeps across a restart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from proto.messages import (
    ClientInfo,
    CommandState,
    DeviceProfile,
    RunState,
    RunStatus,
    StatusReport,
    StopRun,
    WeightHeader,
)
from server.control.sqlite_state import RESTART_REASON, SqliteState
from server.control.state import (
    ClientRecord,
    ClientStatus,
    ControlState,
    Deployment,
    InMemoryState,
    PlanRow,
    StoredUpload,
)
from server.database import DATABASE_FILE, Database
from server.errors import NotFoundError

IMPLEMENTATIONS: dict[str, Callable[[Path], ControlState]] = {
    "memory": lambda _: InMemoryState(),
    "sqlite": lambda folder: SqliteState(Database(folder / DATABASE_FILE)),
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def state(request: pytest.FixtureRequest, tmp_path: Path) -> ControlState:
    return IMPLEMENTATIONS[request.param](tmp_path)


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


def test_remove_client_forgets_it_and_its_commands(state: ControlState) -> None:
    """A removed client is unknown by id and session and its pending commands are gone; others stay."""
    state.put_client(record("a", "sa"))
    state.put_client(record("b", "sb"))
    state.push_command("a", StopRun(run_id="r"))
    state.push_command("b", StopRun(run_id="r"))
    state.remove_client("a")
    state.remove_client("nobody")  # unknown: nothing happens
    assert state.get_client("a") is None and state.client_by_session("sa") is None
    assert state.pending_commands("a") == []
    assert [c.client_id for c in state.list_clients()] == ["b"] and len(state.pending_commands("b")) == 1


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


def test_a_full_client_record_comes_back_equal(state: ControlState) -> None:
    """Every field of a client, its profile, info and runs included, survives the store."""
    full = ClientRecord(
        client_id="a", status=ClientStatus.READY, session_digest="d" * 64,
        info=ClientInfo(version="1.2", hostname="h", has_data=True),
        profile=DeviceProfile(flops_per_s=1e9, memory_bytes=2**30, upload_bytes_per_s=1e6, rtt_s=0.01),
        address="ipv4:127.0.0.1:1", registered_at=12.5, last_seen=3.25,
        runs=(RunStatus(run_id="plan-1-p0", state=RunState.SERVING, bridge_url="ws://x"),),
        free_memory_bytes=5, status_reason="",
    )  # fmt: skip
    state.put_client(full)
    assert state.get_client("a") == full and state.list_clients() == [full]


def test_a_plan_with_rows_comes_back_equal(state: ControlState) -> None:
    """A deployment's rows, URLs and summary survive the store."""
    row = PlanRow(pipeline=0, owner_id="o", run_id="plan-3-p0", partition=1, layer_start=0, layer_end=2, params=10,
                  client_id="h", est_compute_s=0.5, est_transfer_s=0.25, why="fastest")  # fmt: skip
    deployment = Deployment(generation=3, plan_id="plan-3", created_at=1.0, rows=(row,), owners=("o",), clients=("o", "h"),
                            summary={"objective": 1.5}, state="connected", bridge_urls={"plan-3-p0": {"h": "ws://h"}},
                            connected=("o",))  # fmt: skip
    state.set_deployment(deployment)
    assert state.get_deployment() == deployment


def open_sqlite(folder: Path) -> SqliteState:
    return SqliteState(Database(folder / DATABASE_FILE))


def test_sqlite_keeps_clients_and_uploads_across_a_restart(tmp_path: Path) -> None:
    """A reopened database lists the same clients and uploads; live sessions ended with the old server."""
    first = open_sqlite(tmp_path)
    first.put_client(record("a", "sa"))
    first.put_client(record("b", "sb", ClientStatus.LEFT))
    header = WeightHeader(run_id="r1", partition=0, total_bytes=1, sha256="0" * 64, round=2)
    first.add_upload(StoredUpload(client_id="a", header=header, path="/x", received_at=4.0))
    first.db.close()
    second = open_sqlite(tmp_path)
    a, b = second.get_client("a"), second.get_client("b")
    assert a is not None and a.status == ClientStatus.LOST and a.status_reason == RESTART_REASON
    assert b is not None and b.status == ClientStatus.LEFT
    assert second.list_uploads("r1") == [StoredUpload(client_id="a", header=header, path="/x", received_at=4.0)]


def test_sqlite_memory_copy_and_database_agree(tmp_path: Path) -> None:
    """Records are served from memory; every change reaches the file (a reopened state sees the same clients)."""
    first = open_sqlite(tmp_path)
    for name in ("a", "b", "c"):
        first.put_client(record(name, f"s{name}", ClientStatus.LEFT))
    first.update_client("a", session_digest="s2", last_seen=7.0)
    first.remove_client("b")
    assert first.client_by_session("sa") is None and first.client_by_session("sb") is None
    held = first.list_clients()
    first.db.close()
    second = open_sqlite(tmp_path)
    assert second.list_clients() == held
    assert second.client_by_session("s2") == held[0] and second.get_client("b") is None


def test_sqlite_command_ids_keep_growing_and_old_commands_are_dropped_on_restart(tmp_path: Path) -> None:
    """After a restart no pending command of the old sessions is delivered, and new ids are above every old one."""
    first = open_sqlite(tmp_path)
    old = first.push_command("a", StopRun(run_id="r1"))
    first.db.close()
    second = open_sqlite(tmp_path)
    assert second.pending_commands("a") == []
    assert second.push_command("a", StopRun(run_id="r2")).command_id > old.command_id


def test_sqlite_ends_the_old_plan_but_keeps_its_generation(tmp_path: Path) -> None:
    """A plan of the stopped server is gone after a restart; the generation stays, so new plan ids are new."""
    first = open_sqlite(tmp_path)
    first.set_deployment(Deployment(generation=4, plan_id="plan-4", created_at=0.0, state="connected"))
    first.db.close()
    current = open_sqlite(tmp_path).get_deployment()
    assert current is not None and current.generation == 4 and current.plan_id == "" and current.state == "none"


def test_the_database_refuses_a_newer_schema(tmp_path: Path) -> None:
    """A file migrated by a newer server is refused with what to do, not misread."""
    from server.database import MIGRATIONS, DatabaseError

    db = Database(tmp_path / DATABASE_FILE)
    assert db.version == len(MIGRATIONS)
    db.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS) + 1,))
    db.close()
    with pytest.raises(DatabaseError, match="newer than this server"):
        Database(tmp_path / DATABASE_FILE)


def test_the_database_migrates_an_older_file_step_by_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening a file at an older version runs only the migrations above it, and records the new version."""
    import server.database as database

    Database(tmp_path / DATABASE_FILE).close()
    extra = ("CREATE TABLE added_later (x INTEGER)",)
    monkeypatch.setattr(database, "MIGRATIONS", (*database.MIGRATIONS, extra))
    db = Database(tmp_path / DATABASE_FILE)
    assert db.version == len(database.MIGRATIONS)
    assert db.rows("SELECT name FROM sqlite_master WHERE name = 'added_later'") == [("added_later",)]
