"""What the server keeps about each training run (:class:`RunRecord`), and where: the RunStore seam.

A :class:`RunStore` puts, gets and lists run records. :class:`InMemoryRunStore` keeps them
in a dict and hands out the live records, which the run manager changes in place; they are
lost when the server stops. :class:`server.training.sqlite_store.SqliteRunStore` also writes
each record it is given to the state dir's database, and reads them back when a server
starts; both pass the shared suite in ``tests/server/test_store.py``. The run manager puts a
record again after every change it makes (``RunManager._save``).
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proto.messages import RoundProgress
from server.training.reports import per_round

if TYPE_CHECKING:
    from server.control.state import PlanRow
    from server.training.global_model import PartitionTensors
    from server.training.local_work import Work
    from server.training.rounds import RoundMachine
    from server.training.seams import RunSeams
    from server.training.spec import RunSpec

__all__ = ["InMemoryRunStore", "RunRecord", "RunStore"]


@dataclass(slots=True, kw_only=True)
class RunRecord:
    """A run the server knows about."""

    run_id: str
    spec: RunSpec
    machine: RoundMachine
    seams: RunSeams  # the members the spec chose, one per extension point
    created_at: float
    plan_id: str = ""  # the plan the run trains on; a different plan fails the run
    resumed_from: int = 0  # the checkpointed round it resumed after (0: started fresh)
    checkpoints: list[str] = field(default_factory=list)  # folders written, oldest first
    commands: dict[int, tuple[str, str, str]] = field(default_factory=dict)  # id -> (kind, client, bridge run)
    rows: dict[tuple[str, int], PlanRow] = field(default_factory=dict)  # (bridge run, partition) -> plan row
    # Bridge run -> partition -> its blocks and planned tensor names: each pipeline's own cut.
    partitions: dict[str, dict[int, PartitionTensors]] = field(default_factory=dict)
    asked: dict[str, tuple[int, Work]] = field(default_factory=dict)  # bridge run -> (round, work) of its last Train
    global_state: dict[str, Any] = field(default_factory=dict)  # merged tensors (all, or adapters) by whole-model name
    # Optimizer states by whose they are (Participation.shared_optimizer: one shared "*",
    # else each owner's), each a flat dict of optimizer/<entry>/<parameter> tensors.
    optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Round -> client -> {"uploaded": bytes, "downloaded": bytes}: encoded sizes of the
    # uploads the server read and the LoadPartitions files it wrote (round 0: the snapshot).
    traffic: dict[int, dict[str, dict[str, int]]] = field(default_factory=dict)
    # One entry per merge: round, pipelines, and per layer the update's and the model's norms
    # (server.training.signals.layer_norms), Photon's divergence signals.
    signals: list[dict[str, Any]] = field(default_factory=list)
    # What automatic recovery did, one entry per recovery: round, the client lost, why, the
    # steps redone, seconds to detect and to resume (server.training.recovery).
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    # A replay (server.training.recovery) waits for a connected plan other than the one it lost,
    # with these data owners in it, until this time (time.time(); 0: no limit).
    replaces_plan: str = ""
    owners_wanted: tuple[str, ...] = ()
    wait_for_owners_until: float = 0.0
    # Owner -> the round it trains now, step by step as its progress reports come (for live views).
    live: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Bridge run -> (its last Train sent, its round report received): the server's monotonic clock.
    train_clock: dict[str, tuple[float, float]] = field(default_factory=dict)

    def clock_train(self, bridge_run: str, *, ended: bool) -> None:
        """Note the time a pipeline's Train was sent (``ended=False``) or its round report came (``ended=True``)."""
        now = time.monotonic()
        if not ended:
            self.train_clock[bridge_run] = (now, now)
        elif bridge_run in self.train_clock:
            self.train_clock[bridge_run] = (self.train_clock[bridge_run][0], now)

    @classmethod
    def new(cls, run_id: str, spec: RunSpec, *, created_at: float) -> RunRecord:
        """A run of ``spec`` before its first round: the spec's seams and a waiting round machine."""
        from server.training.rounds import RoundMachine
        from server.training.seams import seams_for

        seams = seams_for(spec)
        machine = RoundMachine(
            rounds=spec.rounds, participation=seams.participation,
            # The starting state: a server optimizer steps from it, and changes (a sparse codec) add to it.
            snapshot_first=seams.aggregator.steps_from_start or seams.communication.sends_changes,
        )  # fmt: skip
        return cls(run_id=run_id, spec=spec, machine=machine, seams=seams, created_at=created_at)

    def follow_progress(self, owner: str, progress: RoundProgress) -> None:
        """Add an owner's progress report (network input: a report that does not fit is ignored, not trusted)."""
        now = self.live.get(owner)
        if now is None or now["round"] != progress.round:
            now = self.live[owner] = {"round": progress.round, "steps": progress.steps, "losses": [], "tokens": 0,
                                      "seconds": 0.0}  # fmt: skip
        fits = (
            progress.first_step == len(now["losses"]) and progress.steps == now["steps"]
            and len(now["losses"]) + len(progress.losses) <= progress.steps
            and all(math.isfinite(x) for x in progress.losses) and math.isfinite(progress.seconds) and progress.seconds >= 0
        )  # fmt: skip
        if not fits:
            return
        now["losses"].extend(float(x) for x in progress.losses)
        now["tokens"], now["seconds"] = int(progress.tokens), float(progress.seconds)

    def count_bytes(self, round: int, client_id: str, direction: str, size: int) -> None:
        """Add ``size`` bytes ``direction`` ("uploaded" or "downloaded") to ``client_id``'s traffic in ``round``."""
        per_client = self.traffic.setdefault(round, {}).setdefault(client_id, {"uploaded": 0, "downloaded": 0})
        per_client[direction] += size

    def traffic_json(self) -> list[dict[str, Any]]:
        """The traffic as rows: round, client, uploaded, downloaded."""
        return [
            {"round": r, "client": c, **counts}
            for r in sorted(self.traffic)
            for c, counts in sorted(self.traffic[r].items())
        ]

    def to_json(self) -> dict[str, Any]:
        """The run as the admin API shows it."""
        m = self.machine
        return {
            "run_id": self.run_id,
            "name": self.spec.name,
            "participation": self.spec.participation.mode,
            "state": str(m.phase),
            "round": m.round,
            "rounds": m.rounds,
            "error": m.error,
            "owners": sorted({p.owner for p in m.pipelines.values()}),
            "pipelines": sorted(m.pipelines),
            "plan_id": self.plan_id,
            "resumed_from": self.resumed_from,
            "history": list(m.history),
            "per_round": per_round(m.history),
            "traffic": self.traffic_json(),
            "signals": list(self.signals),
            "recoveries": list(self.recoveries),
            "live": {owner: _live_json(now) for owner, now in self.live.items()},
            "checkpoints": list(self.checkpoints),
            "created_at": self.created_at,
            "spec": self.spec.to_json(),
        }


def _live_json(now: Mapping[str, Any]) -> dict[str, Any]:
    """An owner's round in progress, with its rate and the time left at that rate."""
    done, seconds = len(now["losses"]), now["seconds"]
    rate = now["tokens"] / seconds if seconds > 0 else 0.0
    left = (now["steps"] - done) * seconds / done if done else None
    return {**now, "losses": list(now["losses"]), "done": done, "tokens_per_s": rate, "eta_s": left}


class RunStore(abc.ABC):
    """Where run records live."""

    @abc.abstractmethod
    def put(self, record: RunRecord) -> None:
        """Add ``record``, or replace the one with its run id (which keeps its place in the list)."""

    @abc.abstractmethod
    def get(self, run_id: str) -> RunRecord | None:
        """The record of ``run_id``, or None."""

    @abc.abstractmethod
    def list_runs(self) -> list[RunRecord]:
        """Every record, in the order they were first put."""


class InMemoryRunStore(RunStore):
    """Records in a dict; lost when the process ends."""

    def __init__(self) -> None:
        self._records: dict[str, RunRecord] = {}

    def put(self, record: RunRecord) -> None:
        self._records[record.run_id] = record

    def get(self, run_id: str) -> RunRecord | None:
        return self._records.get(run_id)

    def list_runs(self) -> list[RunRecord]:
        return list(self._records.values())
