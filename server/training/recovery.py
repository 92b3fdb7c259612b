"""Automatic recovery: a round that lost a client is replayed from its start, on a new plan.

Edge devices drop out mid-round: a stage host dies (its owner's bridge reports the peer
lost, naming its client), freezes or loses its link (its heartbeats stop, and the control
plane marks it lost), or the plan the run trains on goes away. The run manager hands each of
these to :func:`recover`, which

1. names the client lost and says why, in the run's ``recoveries`` (its history of
   incidents: the round, the client, when the loss was detected, the steps redone, and,
   once the replay trains, when it resumed);
2. stops the round on every pipeline at once (``StopRun`` to every holder of the old plan)
   and ends the lost client's session, so the coordinator replans at once with the clients
   that remain and any that join;
3. replaces the run's record by a fresh one that starts where the round started: from the
   last round checkpoint, with the optimizer states and the aggregator's moments it holds
   (the machinery of ``runs start --resume``), or from the beginning in round 1, whose
   starting state is the seeded model itself. It waits for a connected plan other than the
   lost one, with the same data owners, and then replays the round: every pipeline loads
   the starting state, and every owner trains the same batches (they follow from the round
   number and the seed). The run thus ends with the model an undisturbed run ends with.

Each round may be replayed ``[recovery] retries`` times; once they are spent the run fails,
saying what was lost and what to do. A data owner that is lost is waited for (its data is
the run's) for ``[recovery] owner_wait_s``; with parallel owners and ``[recovery]
owner_quorum`` the round instead finishes with the owners that remain (see
:func:`owners_for_replay`).

A server restart is recovered from the same way (:meth:`RunManager.continue_interrupted`
uses :func:`replay_record`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from server.control.handler import ControlHandler
from server.control.state import LIVE_STATUSES
from server.training.rounds import Phase
from server.training.store import RunRecord

__all__ = [
    "after_restart",
    "lost_holders",
    "note_resumed",
    "owners_for_replay",
    "recover",
    "replay_record",
    "steps_redone",
]

LOST_CLIENT = "lost client"
SERVER_RESTART = "server restart"


def lost_holders(record: RunRecord, handler: ControlHandler) -> list[str]:
    """The clients holding a partition of the run's pipelines whose session ended (lost or left), sorted."""
    holders = {c for p in record.machine.pipelines.values() for c in p.holders}
    gone = []
    for client_id in sorted(holders):
        client = handler.state.get_client(client_id)
        if client is None or client.status not in LIVE_STATUSES:
            gone.append(client_id)
    return gone


def steps_redone(record: RunRecord) -> int:
    """Optimizer steps the run's owners took in the round in progress: the work a replay does again."""
    m = record.machine
    done: dict[str, int] = {}
    for entry in m.history:
        if int(entry.get("round", -1)) == m.round:
            done[entry["owner"]] = done.get(entry["owner"], 0) + len(entry.get("losses", ()))
    for owner, now in record.live.items():
        if now["round"] == m.round and owner not in done:
            done[owner] = len(now["losses"])
    return sum(done.values())


def owners_for_replay(record: RunRecord, lost: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(owners the replay needs, owners it goes on without)``.

    The replay needs the round's owners back. With parallel owners and ``owner_quorum`` > 0
    a lost owner is left out when the remaining owners are at least that share of them.
    """
    owners = tuple(sorted({p.owner for p in record.machine.pipelines.values()} | set(record.owners_wanted)))
    gone = tuple(o for o in owners if o in set(lost))
    quorum = record.spec.recovery.owner_quorum
    remaining = len(owners) - len(gone)
    if (
        gone
        and quorum > 0
        and record.seams.participation.parallel
        and remaining >= max(1, math.ceil(quorum * len(owners)))
    ):
        return tuple(o for o in owners if o not in gone), gone
    return owners, ()


def replay_record(old: RunRecord, entry: dict[str, Any], owners: tuple[str, ...]) -> RunRecord:
    """A fresh record of ``old``'s run that replays from the last round it finished, after ``entry``."""
    record = RunRecord.new(old.run_id, old.spec, created_at=old.created_at)
    record.recoveries = [*old.recoveries, entry]
    record.owners_wanted = owners
    record.wait_for_owners_until = time.time() + old.spec.recovery.owner_wait_s
    record.replaces_plan = old.plan_id
    return record


def after_restart(old: RunRecord) -> RunRecord:
    """The record that continues ``old``, a run a stopped server left active (``old`` ends here)."""
    entry = {"kind": SERVER_RESTART, "round": old.machine.round, "phase": str(old.machine.phase),
             "detected_at": time.time(), "steps_redone": steps_redone(old)}  # fmt: skip
    old.machine.stop("interrupted by a server restart")
    owners, _ = owners_for_replay(old, ())
    record = replay_record(old, entry, owners)
    record.wait_for_owners_until = 0.0  # after a restart the clients come back when they can
    return record


def note_resumed(record: RunRecord) -> None:
    """The replay trains again (its first Train is sent): note when, for the recovery's time."""
    if record.recoveries and "resumed_at" not in record.recoveries[-1]:
        entry = record.recoveries[-1]
        entry["resumed_at"] = time.time()
        entry["recover_s"] = round(entry["resumed_at"] - entry["detected_at"], 6)


def recover(
    record: RunRecord,
    *,
    lost: str,
    reason: str,
    handler: ControlHandler,
    begin: Callable[[RunRecord], None],
) -> RunRecord | None:
    """Replay the round ``record`` is in after losing ``lost`` (a client id, "" when unknown); None when it fails.

    ``begin(new)`` puts the replacement record and follows the plan for it (resuming from the
    last checkpoint when there is one); it raises ValueError when it cannot.
    """
    m = record.machine
    if not m.active or m.phase == Phase.WAITING:
        return None
    retries = record.spec.recovery.retries
    tried = sum(1 for e in record.recoveries if e.get("kind") == LOST_CLIENT and e.get("round") == m.round)
    who = lost or "a client"
    if tried >= retries:
        m.failed(
            f"{who} was lost in round {m.round} ({reason}), and the round was replayed {tried} time(s) already "
            f"([recovery] retries = {retries}); bring enough clients back, then continue with "
            f"titanic-server runs start RUN_FILE --resume {record.run_id}"
        )
        return None
    owners, without = owners_for_replay(record, [lost])
    entry: dict[str, Any] = {
        "kind": LOST_CLIENT, "round": m.round, "phase": str(m.phase), "lost": lost, "reason": reason,
        "plan_id": record.plan_id, "detected_at": time.time(), "steps_redone": steps_redone(record),
        "attempt": tried + 1, "without_owners": list(without),
    }  # fmt: skip
    stopping = [(run, c) for run, p in sorted(m.pipelines.items()) for c in sorted(p.holders) if c != lost]
    m.phase, m.error = Phase.STOPPED, f"replayed after losing {who}"  # the old record ends here, quietly
    replay = replay_record(record, entry, owners)
    try:
        begin(replay)
    except ValueError as exc:
        m.phase = Phase.FAILED
        m.error = f"{who} was lost in round {m.round} ({reason}), and replaying the round failed: {exc}"
        return None
    # Stop the round everywhere now (the other pipelines train on otherwise), and make the
    # coordinator replan without the lost client at once, not after the heartbeat timeout.
    from proto.messages import StopRun

    for bridge_run, client_id in stopping:
        client = handler.state.get_client(client_id)
        if client is not None and client.status in LIVE_STATUSES:
            handler.send_command(
                client_id, StopRun(run_id=bridge_run, reason=f"round {m.round} is replayed without {who}")
            )
    if not (lost and handler.mark_lost(lost, f"lost during round {m.round} of {record.run_id}: {reason}")):
        handler.request_replan()
    return replay
