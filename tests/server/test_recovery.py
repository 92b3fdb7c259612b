"""Automatic recovery without processes: who is lost, what is redone, the retry budget, the owners a replay needs."""

from __future__ import annotations

import pytest

from proto.messages import StopRun
from server.control.handler import ControlHandler
from server.control.state import ClientRecord, ClientStatus
from server.training import recovery
from server.training.rounds import Phase, PipelineInfo
from server.training.spec import spec_from_mapping
from server.training.store import RunRecord


def training_run(mode: str = "single", **recovery_keys: object) -> RunRecord:
    """A run in round 2: alice's pipeline holds a helper, and (unless single) bob's another."""
    spec = spec_from_mapping({"rounds": 3, "participation": {"mode": mode}, "recovery": recovery_keys})
    record = RunRecord.new("run-1", spec, created_at=1.0)
    m = record.machine
    m.phase, m.round, record.plan_id = Phase.TRAINING, 2, "plan-4"
    m.pipelines = {"plan-4-p0": PipelineInfo(owner="alice", holders={"alice": (0, 2), "h0": (1,)})}
    if mode != "single":
        m.pipelines["plan-4-p1"] = PipelineInfo(owner="bob", holders={"bob": (0, 2), "h1": (1,)})
    return record


def join(handler: ControlHandler, *names: str) -> None:
    for name in names:
        handler.state.put_client(
            ClientRecord(client_id=name, status=ClientStatus.READY, session_digest=f"s-{name}")
        )


def test_steps_redone_counts_the_round_in_progress() -> None:
    """Finished turns of the round count whole, an owner still training counts its live steps, older rounds not at all."""
    record = training_run("parallel")
    record.machine.history = [{"round": 1, "owner": "alice", "losses": [1.0] * 5},
                              {"round": 2, "owner": "alice", "losses": [1.0] * 5}]  # fmt: skip
    record.live = {"alice": {"round": 2, "losses": [1.0] * 5}, "bob": {"round": 2, "losses": [1.0] * 3}}
    assert recovery.steps_redone(record) == 8


def test_lost_holders_are_the_plan_clients_whose_session_ended(handler: ControlHandler) -> None:
    """A lost or departed holder is named; live ones and clients outside the run are not."""
    record = training_run("parallel")
    join(handler, "alice", "bob", "h0", "h1", "spare")
    handler.state.update_client("h1", status=ClientStatus.LOST)
    handler.state.update_client("spare", status=ClientStatus.LEFT)
    assert recovery.lost_holders(record, handler) == ["h1"]


def test_a_replay_starts_afresh_waits_for_a_new_plan_and_stops_the_old_round(handler: ControlHandler) -> None:
    """recover() ends the old record, begins one with the loss in its recoveries, stops every old pipeline, and ends the lost session."""
    record = training_run("parallel")
    record.live = {"alice": {"round": 2, "losses": [2.0, 1.0]}}
    join(handler, "alice", "bob", "h0", "h1")
    begun: list[RunRecord] = []
    replay = recovery.recover(record, lost="h0", reason="peer went away", handler=handler, begin=begun.append)
    assert replay is not None and begun == [replay] and record.machine.phase == Phase.STOPPED
    assert replay.machine.phase == Phase.WAITING and replay.replaces_plan == "plan-4"
    assert replay.owners_wanted == ("alice", "bob") and replay.wait_for_owners_until > 0
    (entry,) = replay.recoveries
    assert (
        entry["lost"] == "h0" and entry["round"] == 2 and entry["steps_redone"] == 2 and entry["attempt"] == 1
    )
    h0 = handler.state.get_client("h0")
    assert h0 is not None and h0.status == ClientStatus.LOST and "peer went away" in h0.status_reason
    stopped = {(c, cmd.body.run_id) for c in ("alice", "bob", "h1") for cmd in handler.state.pending_commands(c)
               if isinstance(cmd.body, StopRun)}  # fmt: skip
    assert stopped == {("alice", "plan-4-p0"), ("bob", "plan-4-p1"), ("h1", "plan-4-p1")}


def test_the_retry_budget_is_per_round_and_its_end_fails_the_run(handler: ControlHandler) -> None:
    """With retries = 1 the second loss in the same round fails the run, saying what was lost and how to continue."""
    record = training_run(retries=1)
    join(handler, "alice", "h0")
    replay = recovery.recover(record, lost="h0", reason="gone", handler=handler, begin=lambda r: None)
    assert replay is not None
    replay.machine.phase, replay.machine.round = Phase.TRAINING, 2
    assert (
        recovery.recover(replay, lost="h0", reason="gone again", handler=handler, begin=lambda r: None)
        is None
    )
    assert replay.machine.phase == Phase.FAILED
    assert "h0 was lost in round 2" in replay.machine.error and "--resume run-1" in replay.machine.error
    replay.machine.phase, replay.machine.round = Phase.TRAINING, 3  # a later round has its own budget
    assert (
        recovery.recover(replay, lost="h0", reason="gone", handler=handler, begin=lambda r: None) is not None
    )


def test_no_retries_fail_at_once(handler: ControlHandler) -> None:
    """retries = 0: a lost client fails the run as before recovery existed."""
    record = training_run(retries=0)
    assert recovery.recover(record, lost="h0", reason="gone", handler=handler, begin=lambda r: None) is None
    assert record.machine.phase == Phase.FAILED


@pytest.mark.parametrize(
    ("mode", "quorum", "needed", "without"),
    [
        ("parallel", 0.0, ("alice", "bob"), ()),  # no quorum: wait for the lost owner
        ("parallel", 0.5, ("alice",), ("bob",)),  # one of two remains: half, enough
        ("parallel", 1.0, ("alice", "bob"), ()),  # every owner needed
        ("sequential", 0.5, ("alice", "bob"), ()),  # owners in turn train one model: no quorum
    ],
)
def test_a_lost_owner_is_waited_for_unless_the_quorum_lets_the_round_go_on(
    mode: str, quorum: float, needed: tuple[str, ...], without: tuple[str, ...]
) -> None:
    """owners_for_replay keeps every owner, or drops the lost one when parallel owners reach the quorum without it."""
    record = training_run(mode, owner_quorum=quorum)
    assert recovery.owners_for_replay(record, ["bob"]) == (needed, without)


def test_recovery_settings_are_checked() -> None:
    """Bad [recovery] values are refused with the range they must be in."""
    with pytest.raises(ValueError, match="owner_quorum must be in"):
        spec_from_mapping({"recovery": {"owner_quorum": 1.5}})
    with pytest.raises(ValueError, match="retries must be an integer >= 0"):
        spec_from_mapping({"recovery": {"retries": -1}})


def test_a_run_a_restart_interrupted_continues_with_its_owners_and_no_deadline() -> None:
    """after_restart ends the old record and returns one that waits, without a time limit, for the same owners."""
    old = training_run("parallel")
    record = recovery.after_restart(old)
    assert old.machine.phase == Phase.STOPPED and record.machine.phase == Phase.WAITING
    assert record.owners_wanted == ("alice", "bob") and record.wait_for_owners_until == 0.0
    assert record.recoveries == [{**record.recoveries[0], "kind": "server restart", "round": 2}]
