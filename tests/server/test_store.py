"""The RunStore contract, one suite run against every implementation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from server.database import DATABASE_FILE, Database
from server.training.rounds import Phase, PipelineInfo, RoundMachine
from server.training.seams import seams_for
from server.training.spec import RunSpec, spec_from_mapping
from server.training.sqlite_store import SqliteRunStore
from server.training.store import InMemoryRunStore, RunRecord, RunStore

IMPLEMENTATIONS: dict[str, Callable[[Path], RunStore]] = {
    "memory": lambda _: InMemoryRunStore(),
    "sqlite": lambda folder: SqliteRunStore(Database(folder / DATABASE_FILE)),
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> RunStore:
    return IMPLEMENTATIONS[request.param](tmp_path)


def record(run_id: str, name: str = "") -> RunRecord:
    spec = RunSpec(name=name, rounds=2)
    return RunRecord(run_id=run_id, spec=spec, machine=RoundMachine(rounds=2), seams=seams_for(spec), created_at=1.0)


def test_an_empty_store_lists_nothing(store: RunStore) -> None:
    """A new store has no runs."""
    assert store.list_runs() == [] and store.get("run-1") is None


def test_a_put_record_is_got_back_by_id(store: RunStore) -> None:
    """get returns what put stored, by run id; other ids are None."""
    store.put(record("run-1", "first"))
    got = store.get("run-1")
    assert got is not None and got.run_id == "run-1" and got.spec.name == "first"
    assert store.get("run-2") is None


def test_runs_are_listed_in_the_order_they_were_first_put(store: RunStore) -> None:
    """list_runs is oldest first, and putting a run again keeps its place."""
    for run_id in ("run-2", "run-1", "run-3"):
        store.put(record(run_id))
    store.put(record("run-2", "again"))
    assert [r.run_id for r in store.list_runs()] == ["run-2", "run-1", "run-3"]


def test_putting_a_run_again_replaces_it(store: RunStore) -> None:
    """A second put of the same id replaces the record instead of adding one."""
    store.put(record("run-1", "old"))
    store.put(record("run-1", "new"))
    got = store.get("run-1")
    assert got is not None and got.spec.name == "new" and len(store.list_runs()) == 1


def test_a_record_keeps_its_traffic(store: RunStore) -> None:
    """Bytes counted on a record come back with it, per round and client."""
    run = record("run-1")
    run.count_bytes(1, "alice", "uploaded", 10)
    run.count_bytes(1, "alice", "uploaded", 5)
    run.count_bytes(1, "alice", "downloaded", 7)
    store.put(run)
    got = store.get("run-1")
    assert got is not None
    assert got.traffic_json() == [{"round": 1, "client": "alice", "uploaded": 15, "downloaded": 7}]


def test_a_record_is_listed_with_its_state_and_history(store: RunStore) -> None:
    """What runs list shows of a record (state, round, history, checkpoints) is what was put."""
    run = record("run-1")
    run.machine.phase, run.machine.round, run.machine.error = Phase.FAILED, 2, "helper0 was lost"
    run.machine.history.append({"round": 1, "owner": "alice", "losses": [1.0, 0.5], "ppl": 2.0, "val_loss": 0.69, "val_tokens": 64})
    run.checkpoints.append("/ckpt/run-1/round-1")
    run.recoveries.append({"round": 2, "lost": "helper0"})
    store.put(run)
    (got,) = store.list_runs()
    shown = got.to_json()
    assert shown["state"] == "failed" and shown["round"] == 2 and shown["error"] == "helper0 was lost"
    assert shown["history"] == run.machine.history and shown["history"][0]["losses"] == [1.0, 0.5]
    assert shown["checkpoints"] == ["/ckpt/run-1/round-1"] and shown["recoveries"] == [{"round": 2, "lost": "helper0"}]


def test_sqlite_reads_every_run_back_after_a_restart(tmp_path: Path) -> None:
    """A new store on the same file lists every run, in order, with its spec, machine, traffic and signals."""
    first = SqliteRunStore(Database(tmp_path / DATABASE_FILE))
    done, running = record("run-1", "a"), record("run-2", "b")
    done.machine.phase, done.machine.round = Phase.DONE, 2
    running.machine.phase, running.machine.round = Phase.TRAINING, 1
    running.machine.pipelines = {"plan-1-p0": PipelineInfo(owner="alice", holders={"alice": (0, 2), "h": (1,)})}
    running.plan_id, running.resumed_from = "plan-1", 0
    running.count_bytes(1, "h", "downloaded", 9)
    running.signals.append({"round": 1, "model": {"total": 2.0}})
    for run in (done, running):
        first.put(run)
    first.db.close()
    second = SqliteRunStore(Database(tmp_path / DATABASE_FILE))
    assert [r.run_id for r in second.list_runs()] == ["run-1", "run-2"]
    got = second.get("run-2")
    assert got is not None and got.machine.phase == Phase.TRAINING and got.machine.active and got.plan_id == "plan-1"
    assert got.spec == running.spec and got.machine.pipelines == running.machine.pipelines
    assert got.to_json()["traffic"] == running.to_json()["traffic"] and got.signals == running.signals
    old = second.get("run-1")
    assert old is not None and old.machine.phase == Phase.DONE and not old.machine.active


def test_sqlite_keeps_the_server_optimizer_moments(tmp_path: Path) -> None:
    """FedAdam's moments and round count come back after a restart, tensors bit for bit."""
    import torch

    from server.training.aggregation import ClientUpdate

    spec = spec_from_mapping({"rounds": 2, "participation": {"mode": "parallel"}, "aggregation": {"rule": "fedadam"}})
    run = RunRecord.new("run-1", spec, created_at=1.0)
    start = {"w": torch.zeros(3)}
    run.seams.aggregator.aggregate(start, [ClientUpdate(state={"w": torch.tensor([1.0, 2.0, 3.0])}, num_samples=1)])
    first = SqliteRunStore(Database(tmp_path / DATABASE_FILE))
    first.put(run)
    first.db.close()
    got = SqliteRunStore(Database(tmp_path / DATABASE_FILE)).get("run-1")
    assert got is not None
    want, have = run.seams.aggregator.state_dict(), got.seams.aggregator.state_dict()
    assert have["rounds"] == want["rounds"] == 1
    for buffer in ("m", "v"):
        assert torch.equal(have[buffer]["w"], want[buffer]["w"])


def test_progress_reports_build_the_live_round_and_bad_ones_are_ignored() -> None:
    """Step losses arrive in order and extend the owner's live curve; gaps, overflow and NaN are not taken."""
    from proto.messages import RoundProgress
    from server.training.store import RunRecord

    record = RunRecord.__new__(RunRecord)
    record.live = {}
    record.follow_progress("alice", RoundProgress(round=2, first_step=0, losses=(3.0, 2.5), steps=4, tokens=64, seconds=1.0))
    record.follow_progress("alice", RoundProgress(round=2, first_step=5, losses=(1.0,), steps=4, tokens=96, seconds=1.5))
    record.follow_progress("alice", RoundProgress(round=2, first_step=2, losses=(float("nan"),), steps=4, tokens=96, seconds=1.5))
    record.follow_progress("alice", RoundProgress(round=2, first_step=2, losses=(2.0, 1.0, 0.5), steps=4, tokens=96, seconds=1.5))
    assert record.live["alice"]["losses"] == [3.0, 2.5]
    record.follow_progress("alice", RoundProgress(round=2, first_step=2, losses=(2.0,), steps=4, tokens=96, seconds=1.5))
    assert record.live["alice"]["losses"] == [3.0, 2.5, 2.0] and record.live["alice"]["tokens"] == 96
    record.follow_progress("alice", RoundProgress(round=3, first_step=0, losses=(1.5,), steps=4, tokens=32, seconds=0.5))
    assert record.live["alice"]["round"] == 3 and record.live["alice"]["losses"] == [1.5]
