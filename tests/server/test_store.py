"""The RunStore contract, one suite run against every implementation."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from server.training.rounds import RoundMachine
from server.training.seams import seams_for
from server.training.spec import RunSpec
from server.training.store import InMemoryRunStore, RunRecord, RunStore

IMPLEMENTATIONS: dict[str, Callable[[], RunStore]] = {
    "memory": InMemoryRunStore,
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def store(request: pytest.FixtureRequest) -> RunStore:
    return IMPLEMENTATIONS[request.param]()


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
