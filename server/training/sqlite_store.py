"""Run records in the state dir's SQLite database: :class:`SqliteRunStore`, the persistent RunStore.

What is kept of a run is what a restarted server needs to list it and to continue it: the
spec, the round machine's phase, round, error and history, the pipelines it trained on, the
plan id, the checkpoint folders, traffic, signals, what recovery did, and the aggregator's
state (its JSON in the row, its tensors as a safetensors blob). The global tensors and the
optimizer states are not: they live in the round checkpoints, and a run continues from its
last one (:mod:`server.training.recovery`).

The store hands out live records (like the in-memory one): the run manager changes them in
place and puts them again after each change; a put writes the row. Records read back when a
server starts are rebuilt from their spec (fresh seams, the aggregator's state loaded).
"""

from __future__ import annotations

import json
from typing import Any

from server.database import Database
from server.training.checkpoints import _decode_state, _encode_state
from server.training.rounds import Phase, PipelineInfo
from server.training.spec import spec_from_mapping
from server.training.store import RunRecord, RunStore

__all__ = ["SqliteRunStore"]


def _row(record: RunRecord) -> dict[str, Any]:
    """The JSON of a run's row (the aggregator's tensors go to the blob)."""
    m = record.machine
    return {
        "spec": record.spec.to_json(),
        "created_at": record.created_at,
        "plan_id": record.plan_id,
        "resumed_from": record.resumed_from,
        "checkpoints": list(record.checkpoints),
        "machine": {
            "phase": str(m.phase),
            "round": m.round,
            "error": m.error,
            "history": m.history,
            "pipelines": {
                run: {"owner": p.owner, "holders": {c: list(ps) for c, ps in p.holders.items()}}
                for run, p in m.pipelines.items()
            },
        },
        "traffic": record.traffic_json(),
        "signals": record.signals,
        "recoveries": record.recoveries,
    }


def _record(run_id: str, row: dict[str, Any], aggregator: dict[str, Any]) -> RunRecord:
    """A record rebuilt from its row: the spec's seams, the machine where it stood."""
    record = RunRecord.new(run_id, spec_from_mapping(row["spec"]), created_at=float(row["created_at"]))
    record.plan_id = row["plan_id"]
    record.resumed_from = int(row["resumed_from"])
    record.checkpoints = list(row["checkpoints"])
    saved = row["machine"]
    m = record.machine
    m.phase, m.round, m.error, m.history = (
        Phase(saved["phase"]),
        int(saved["round"]),
        saved["error"],
        saved["history"],
    )
    m.pipelines = {
        run: PipelineInfo(owner=p["owner"], holders={c: tuple(ps) for c, ps in p["holders"].items()})
        for run, p in saved["pipelines"].items()
    }
    for entry in row["traffic"]:
        for direction in ("uploaded", "downloaded"):
            record.count_bytes(int(entry["round"]), str(entry["client"]), direction, int(entry[direction]))
    record.signals = list(row["signals"])
    record.recoveries = list(row.get("recoveries", []))
    if aggregator:
        record.seams.aggregator.load_state_dict(aggregator)
    return record


class SqliteRunStore(RunStore):
    """Records in the ``runs`` table, and the live ones in memory."""

    def __init__(self, database: Database) -> None:
        self.db = database
        self._records: dict[str, RunRecord] = {}
        self._aggregator_marks: dict[str, tuple[int, int]] = {}  # run id -> (record, merges) last written
        self._aggregator_trees: dict[str, Any] = {}  # run id -> the JSON part of that state
        for run_id, text, blob in self.db.rows("SELECT run_id, run, aggregator FROM runs ORDER BY seq"):
            row = json.loads(text)
            self._records[run_id] = _record(run_id, row, _decode_aggregator(row.get("aggregator_tree"), blob))

    def put(self, record: RunRecord) -> None:
        from safetensors.torch import save

        # The aggregator changes only when a merge does (one signal per merge): its moments,
        # large for full fine-tuning, are written again only then.
        mark = (id(record), len(record.signals))
        if self._aggregator_marks.get(record.run_id) != mark:
            tree, tensors = _encode_state(record.seams.aggregator.state_dict())
            self._aggregator_trees[record.run_id] = tree
            blob: bytes | None = save(tensors) if tensors else b""
        else:
            blob = None
        row = {**_row(record), "aggregator_tree": self._aggregator_trees[record.run_id]}
        with self.db.transaction() as db:
            db.execute(
                "INSERT INTO runs (run_id, state, run, aggregator) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (run_id) DO UPDATE SET state = excluded.state, run = excluded.run",
                (record.run_id, str(record.machine.phase), json.dumps(row), blob or b""),
            )
            if blob is not None:
                db.execute("UPDATE runs SET aggregator = ? WHERE run_id = ?", (blob, record.run_id))
        self._aggregator_marks[record.run_id] = mark
        self._records[record.run_id] = record

    def get(self, run_id: str) -> RunRecord | None:
        return self._records.get(run_id)

    def list_runs(self) -> list[RunRecord]:
        order = [run_id for (run_id,) in self.db.rows("SELECT run_id FROM runs ORDER BY seq")]
        return [self._records[run_id] for run_id in order if run_id in self._records]


def _decode_aggregator(tree: Any, blob: bytes) -> dict[str, Any]:
    """The aggregator's state from its JSON tree and its tensors (the server's own bytes, safetensors)."""
    if not tree:
        return {}
    from safetensors.torch import load

    tensors = load(bytes(blob)) if blob else {}
    state = _decode_state(tree, tensors)
    return state if isinstance(state, dict) else {}
