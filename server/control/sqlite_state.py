"""The control plane's memory in SQLite: :class:`SqliteState`, the persistent :class:`ControlState`.

Records are stored the way they travel: messages of ``proto/messages.py`` as their protobuf
bytes (through ``proto/serde.py``), everything else as JSON. Nothing is pickled.

A state opened from a file belongs to a server that stopped: its sessions ended with it
(every live client is marked lost, its pending commands dropped, so it registers again),
and its plan's hosts stopped serving (the plan is replaced by an empty one that keeps the
generation, so new plans get new ids and never reuse an old plan's weight folders).

Client records are also kept in memory, written through to the database: the server reads
them on every call and its liveness check walks all of them four times a second, and decoding
each from its stored form cost the event loop most of its time at a thousand clients
(``bench/load.py``). A state dir belongs to one server process, so the copy cannot go stale.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import threading
import time

from proto import control_pb2 as pb
from proto.messages import Command, CommandBody, StatusReport
from proto.serde import (
    client_info_from_proto,
    client_info_to_proto,
    command_from_proto,
    command_to_proto,
    device_profile_from_proto,
    device_profile_to_proto,
    run_status_from_proto,
    run_status_to_proto,
    status_report_from_proto,
    status_report_to_proto,
    weight_header_from_proto,
    weight_header_to_proto,
)
from server.control.state import (
    LIVE_STATUSES,
    ClientRecord,
    ClientStatus,
    ControlState,
    Deployment,
    PlanRow,
    StoredUpload,
)
from server.database import Database

__all__ = ["RESTART_REASON", "SqliteState"]

RESTART_REASON = "the server restarted; the client registers again"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


def _client_to_json(record: ClientRecord) -> str:
    return json.dumps(
        {
            "client_id": record.client_id,
            "status": str(record.status),
            "session_digest": record.session_digest,
            "info": _b64(client_info_to_proto(record.info).SerializeToString()),
            "profile": _b64(device_profile_to_proto(record.profile).SerializeToString()),
            "address": record.address,
            "registered_at": record.registered_at,
            "last_seen": record.last_seen,
            "runs": [_b64(run_status_to_proto(r).SerializeToString()) for r in record.runs],
            "free_memory_bytes": record.free_memory_bytes,
            "status_reason": record.status_reason,
        }
    )


def _client_from_json(text: str) -> ClientRecord:
    d = json.loads(text)
    return ClientRecord(
        client_id=d["client_id"],
        status=ClientStatus(d["status"]),
        session_digest=d["session_digest"],
        info=client_info_from_proto(pb.ClientInfo.FromString(_unb64(d["info"]))),
        profile=device_profile_from_proto(pb.DeviceProfile.FromString(_unb64(d["profile"]))),
        address=d["address"],
        registered_at=d["registered_at"],
        last_seen=d["last_seen"],
        runs=tuple(run_status_from_proto(pb.RunStatus.FromString(_unb64(r))) for r in d["runs"]),
        free_memory_bytes=d["free_memory_bytes"],
        status_reason=d["status_reason"],
    )


def _deployment_from_json(text: str) -> Deployment:
    d = json.loads(text)
    return Deployment(
        **{
            **d,
            "rows": tuple(PlanRow(**row) for row in d["rows"]),
            "owners": tuple(d["owners"]),
            "clients": tuple(d["clients"]),
            "connected": tuple(d["connected"]),
        }
    )


def _upload_to_json(upload: StoredUpload) -> str:
    header = _b64(weight_header_to_proto(upload.header).SerializeToString())
    return json.dumps(
        {
            "client_id": upload.client_id,
            "header": header,
            "path": upload.path,
            "received_at": upload.received_at,
        }
    )


def _upload_from_json(text: str) -> StoredUpload:
    d = json.loads(text)
    header = weight_header_from_proto(pb.WeightChunk.FromString(_unb64(d["header"])))
    return StoredUpload(client_id=d["client_id"], header=header, path=d["path"], received_at=d["received_at"])


class SqliteState(ControlState):
    """Clients, commands, the plan and uploads in the state dir's database."""

    def __init__(self, database: Database) -> None:
        self.db = database
        self._end_previous_process()
        self._lock = threading.Lock()  # the merge runs in a thread; client records may be read there
        self._clients = {
            record.client_id: record
            for record in (_client_from_json(text) for (text,) in self.db.rows("SELECT record FROM clients"))
        }
        self._by_session = {r.session_digest: r.client_id for r in self._clients.values() if r.session_digest}

    def _end_previous_process(self) -> None:
        """What a stopped server left: end its sessions and its plan (see the module docstring)."""
        with self.db.transaction() as db:
            for (text,) in db.execute("SELECT record FROM clients").fetchall():
                record = _client_from_json(text)
                if record.status in LIVE_STATUSES:
                    ended = dataclasses.replace(
                        record, status=ClientStatus.LOST, status_reason=RESTART_REASON
                    )
                    db.execute(
                        "UPDATE clients SET status = ?, record = ? WHERE client_id = ?",
                        (str(ended.status), _client_to_json(ended), ended.client_id),
                    )
            db.execute("DELETE FROM commands")
            row = db.execute("SELECT deployment FROM deployment WHERE id = 1").fetchone()
            if row is not None:
                old = _deployment_from_json(row[0])
                if old.plan_id or old.state != "none":
                    empty = Deployment(
                        generation=old.generation, plan_id="", created_at=time.time(), state="none",
                        error=f"{RESTART_REASON}; the next plan follows once clients are ready",
                    )  # fmt: skip
                    db.execute(
                        "UPDATE deployment SET deployment = ? WHERE id = 1",
                        (json.dumps(dataclasses.asdict(empty)),),
                    )

    # -- clients ---------------------------------------------------------------------------

    def put_client(self, record: ClientRecord) -> None:
        with self._lock:
            self.db.execute(
                "INSERT INTO clients (client_id, session_digest, status, record) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (client_id) DO UPDATE SET session_digest = excluded.session_digest, "
                "status = excluded.status, record = excluded.record",
                (record.client_id, record.session_digest, str(record.status), _client_to_json(record)),
            )
            previous = self._clients.get(record.client_id)
            if previous is not None and self._by_session.get(previous.session_digest) == record.client_id:
                del self._by_session[previous.session_digest]
            self._clients[record.client_id] = record
            if record.session_digest:
                self._by_session[record.session_digest] = record.client_id

    def get_client(self, client_id: str) -> ClientRecord | None:
        return self._clients.get(client_id)

    def client_by_session(self, session_digest: str) -> ClientRecord | None:
        client_id = self._by_session.get(session_digest)
        return None if client_id is None else self._clients.get(client_id)

    def remove_client(self, client_id: str) -> None:
        with self._lock:
            with self.db.transaction() as db:
                db.execute("DELETE FROM clients WHERE client_id = ?", (client_id,))
                db.execute("DELETE FROM commands WHERE client_id = ?", (client_id,))
            record = self._clients.pop(client_id, None)
            if record is not None and self._by_session.get(record.session_digest) == client_id:
                del self._by_session[record.session_digest]

    def list_clients(self) -> list[ClientRecord]:
        with self._lock:
            records = list(self._clients.values())
        return sorted(records, key=lambda r: r.client_id)

    # -- commands --------------------------------------------------------------------------

    def push_command(self, client_id: str, body: CommandBody) -> Command:
        with self.db.transaction() as db:
            # Ids keep growing across restarts: a client never sees an id twice.
            db.execute(
                "INSERT INTO counters (name, value) VALUES ('command_id', 1) "
                "ON CONFLICT (name) DO UPDATE SET value = value + 1"
            )
            (command_id,) = db.execute("SELECT value FROM counters WHERE name = 'command_id'").fetchone()
            command = Command(command_id=int(command_id), body=body)
            data = command_to_proto(command).SerializeToString()
            db.execute(
                "INSERT INTO commands (command_id, client_id, command) VALUES (?, ?, ?)",
                (command_id, client_id, data),
            )
        return command

    def pending_commands(self, client_id: str, after: int = 0) -> list[Command]:
        rows = self.db.rows(
            "SELECT command FROM commands WHERE client_id = ? AND command_id > ? ORDER BY command_id",
            (client_id, after),
        )
        return [command_from_proto(pb.Command.FromString(data)) for (data,) in rows]

    def acknowledge(self, client_id: str, command_id: int) -> None:
        self.db.execute(
            "DELETE FROM commands WHERE client_id = ? AND command_id = ?", (client_id, command_id)
        )

    def drop_commands(self, client_id: str) -> None:
        self.db.execute("DELETE FROM commands WHERE client_id = ?", (client_id,))

    def record_status(self, client_id: str, report: StatusReport) -> None:
        data = status_report_to_proto(report).SerializeToString()
        self.db.execute(
            "INSERT INTO command_status (command_id, report) VALUES (?, ?) "
            "ON CONFLICT (command_id) DO UPDATE SET report = excluded.report",
            (report.command_id, data),
        )

    def command_status(self, command_id: int) -> StatusReport | None:
        rows = self.db.rows("SELECT report FROM command_status WHERE command_id = ?", (command_id,))
        return status_report_from_proto(pb.StatusReport.FromString(rows[0][0])) if rows else None

    # -- plan and uploads ------------------------------------------------------------------

    def set_deployment(self, deployment: Deployment) -> None:
        self.db.execute(
            "INSERT INTO deployment (id, deployment) VALUES (1, ?) "
            "ON CONFLICT (id) DO UPDATE SET deployment = excluded.deployment",
            (json.dumps(dataclasses.asdict(deployment)),),
        )

    def get_deployment(self) -> Deployment | None:
        rows = self.db.rows("SELECT deployment FROM deployment WHERE id = 1")
        return _deployment_from_json(rows[0][0]) if rows else None

    def add_upload(self, upload: StoredUpload) -> None:
        self.db.execute(
            "INSERT INTO uploads (run_id, upload) VALUES (?, ?)",
            (upload.header.run_id, _upload_to_json(upload)),
        )

    def list_uploads(self, run_id: str | None = None) -> list[StoredUpload]:
        if run_id is None:
            rows = self.db.rows("SELECT upload FROM uploads ORDER BY seq")
        else:
            rows = self.db.rows("SELECT upload FROM uploads WHERE run_id = ? ORDER BY seq", (run_id,))
        return [_upload_from_json(text) for (text,) in rows]
