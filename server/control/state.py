"""What the control plane remembers: clients, their pending commands, the plan, uploads.

:class:`ControlState` is the interface; the handler and the coordinator only use it.
:class:`InMemoryState` keeps everything in dicts (a restart forgets it, and clients register
again); a persistent implementation can follow without touching the handler, and
``tests/server/test_state.py`` is written against the interface so it runs on every one.

Records are frozen: a state hands out values, never references to its insides.
"""

from __future__ import annotations

import abc
import enum
import itertools
from dataclasses import dataclass, field, replace
from typing import Any

from proto.messages import (
    ClientInfo,
    Command,
    CommandBody,
    DeviceProfile,
    RunStatus,
    StatusReport,
    WeightHeader,
)
from server.errors import NotFoundError


class ClientStatus(enum.StrEnum):
    """Where a registered client stands."""

    MEASURING = "measuring"  # registered; its link to the server is being measured
    READY = "ready"  # profile complete; the planner may give it work
    LOST = "lost"  # silent for longer than the heartbeat timeout
    LEFT = "left"  # said goodbye


LIVE_STATUSES = frozenset({ClientStatus.MEASURING, ClientStatus.READY})


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredUpload:
    """An upload the server verified and kept."""

    client_id: str
    header: WeightHeader
    path: str
    received_at: float = field(default=0.0)  # wall-clock seconds since the epoch


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientRecord:
    """One client as the server knows it."""

    client_id: str
    status: ClientStatus
    session_digest: str  # sha256 hex of the session token; the token itself is never stored
    info: ClientInfo = field(default_factory=ClientInfo)
    profile: DeviceProfile = field(default_factory=DeviceProfile)
    address: str = ""  # where it registered from
    registered_at: float = 0.0  # wall clock (time.time) of the registration, for display
    last_seen: float = 0.0  # the handler's clock (monotonic) at its last call
    runs: tuple[RunStatus, ...] = ()  # as of its last heartbeat or status report
    free_memory_bytes: int = 0  # as of its last heartbeat
    status_reason: str = ""  # why it is lost or left


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanRow:
    """One partition of one pipeline, the client that runs it, and why."""

    pipeline: int  # index of the pipeline; each data owner drives one
    owner_id: str  # the data owner driving that pipeline
    run_id: str  # the bridge run of that pipeline: its hosts serve under this id
    partition: int  # 0-based stage number within the pipeline
    layer_start: int  # first decoder block, inclusive
    layer_end: int  # last decoder block, exclusive
    params: int
    client_id: str
    est_compute_s: float  # the planner's estimate of its training time per step on that client
    est_transfer_s: float  # ... and of moving its weights and boundary tensors over that client's link
    why: str
    pinned: bool = False  # a data owner's first or last stage
    weights_sha256: str = ""
    weights_bytes: int = 0

    @property
    def blocks(self) -> int:
        """How many decoder blocks the partition holds."""
        return self.layer_end - self.layer_start

    @property
    def local(self) -> bool:
        """Run by the pipeline's own data owner, so not served to anyone."""
        return self.client_id == self.owner_id


@dataclass(frozen=True, slots=True, kw_only=True)
class Deployment:
    """The current plan and how far its delivery got."""

    generation: int  # grows by one with every plan (or failure to plan)
    plan_id: str  # "plan-<generation>"; empty when there is no plan
    created_at: float  # wall clock
    rows: tuple[PlanRow, ...] = ()
    owners: tuple[str, ...] = ()  # data owners, one pipeline each
    clients: tuple[str, ...] = ()  # clients the planner could choose from
    summary: dict[str, Any] = field(default_factory=dict)  # solver facts: objective, integral, ...
    error: str = ""  # why there is no plan (infeasible, no model, ...)
    # none, planned, serving (hosts listen), connected (owners reached them), failed, retired (a run
    # trained on it: the next run waits for a new plan, whose stages start from the model's weights)
    state: str = "planned"
    bridge_urls: dict[str, dict[str, str]] = field(default_factory=dict)  # run id -> client id -> host URL
    # run id -> client id -> the TLS certificate (PEM) that client reported for its host URL
    bridge_certs: dict[str, dict[str, str]] = field(default_factory=dict)
    connected: tuple[str, ...] = ()  # owners that reached every host of their pipeline

    def assignment(self) -> tuple[tuple[int, int, int, int, str], ...]:
        """(pipeline, stage, layer_start, layer_end, client) of every row: equal plans compare equal."""
        return tuple(plan_key(r) for r in self.rows)

    def run_ids(self) -> list[str]:
        """The bridge runs of this plan, one per pipeline."""
        return sorted({r.run_id for r in self.rows})


def plan_key(row: PlanRow) -> tuple[int, int, int, int, str]:
    """What makes two rows the same assignment."""
    return (row.pipeline, row.partition, row.layer_start, row.layer_end, row.client_id)


class ControlState(abc.ABC):
    """The control plane's memory. Methods are synchronous and never block on I/O for long."""

    # -- clients -------------------------------------------------------------------------

    @abc.abstractmethod
    def put_client(self, record: ClientRecord) -> None:
        """Insert a client, or replace the record with the same id."""

    @abc.abstractmethod
    def get_client(self, client_id: str) -> ClientRecord | None:
        """The client with this id, if any."""

    @abc.abstractmethod
    def client_by_session(self, session_digest: str) -> ClientRecord | None:
        """The client whose current session has this digest, if any."""

    @abc.abstractmethod
    def remove_client(self, client_id: str) -> None:
        """Forget a client and its pending commands (nothing happens when unknown)."""

    @abc.abstractmethod
    def list_clients(self) -> list[ClientRecord]:
        """Every client ever registered (lost and departed ones too), by id."""

    def update_client(self, client_id: str, **changes: Any) -> ClientRecord:
        """Change fields of a client's record; returns the new record."""
        record = self.get_client(client_id)
        if record is None:
            raise NotFoundError(f"no client {client_id!r} is registered")
        updated = replace(record, **changes)
        self.put_client(updated)
        return updated

    # -- commands ------------------------------------------------------------------------

    @abc.abstractmethod
    def push_command(self, client_id: str, body: CommandBody) -> Command:
        """Queue a command for a client; ids grow across all clients."""

    @abc.abstractmethod
    def pending_commands(self, client_id: str, after: int = 0) -> list[Command]:
        """Queued, unacknowledged commands of a client with ids above ``after``, oldest first."""

    @abc.abstractmethod
    def acknowledge(self, client_id: str, command_id: int) -> None:
        """The client has the command; it is not sent again."""

    @abc.abstractmethod
    def drop_commands(self, client_id: str) -> None:
        """Forget a client's pending commands (its session ended)."""

    @abc.abstractmethod
    def record_status(self, client_id: str, report: StatusReport) -> None:
        """Keep the latest status report of a command."""

    @abc.abstractmethod
    def command_status(self, command_id: int) -> StatusReport | None:
        """The latest status report of a command, if any."""

    # -- plan and uploads ----------------------------------------------------------------

    @abc.abstractmethod
    def set_deployment(self, deployment: Deployment) -> None:
        """Replace the current plan."""

    @abc.abstractmethod
    def get_deployment(self) -> Deployment | None:
        """The current plan, if one was ever made."""

    @abc.abstractmethod
    def add_upload(self, upload: StoredUpload) -> None:
        """Remember a verified upload."""

    @abc.abstractmethod
    def list_uploads(self, run_id: str | None = None) -> list[StoredUpload]:
        """Uploads, oldest first, optionally of one run."""


class InMemoryState(ControlState):
    """Everything in dicts; lost when the process ends."""

    def __init__(self) -> None:
        self._clients: dict[str, ClientRecord] = {}
        self._by_session: dict[str, str] = {}
        self._commands: dict[str, dict[int, Command]] = {}
        self._status: dict[int, StatusReport] = {}
        self._ids = itertools.count(1)
        self._deployment: Deployment | None = None
        self._uploads: list[StoredUpload] = []

    def put_client(self, record: ClientRecord) -> None:
        old = self._clients.get(record.client_id)
        if old is not None:
            self._by_session.pop(old.session_digest, None)
        self._clients[record.client_id] = record
        self._by_session[record.session_digest] = record.client_id

    def get_client(self, client_id: str) -> ClientRecord | None:
        return self._clients.get(client_id)

    def client_by_session(self, session_digest: str) -> ClientRecord | None:
        client_id = self._by_session.get(session_digest)
        return None if client_id is None else self._clients[client_id]

    def remove_client(self, client_id: str) -> None:
        record = self._clients.pop(client_id, None)
        if record is not None:
            self._by_session.pop(record.session_digest, None)
        self._commands.pop(client_id, None)

    def list_clients(self) -> list[ClientRecord]:
        return [self._clients[k] for k in sorted(self._clients)]

    def push_command(self, client_id: str, body: CommandBody) -> Command:
        command = Command(command_id=next(self._ids), body=body)
        self._commands.setdefault(client_id, {})[command.command_id] = command
        return command

    def pending_commands(self, client_id: str, after: int = 0) -> list[Command]:
        queue = self._commands.get(client_id, {})
        return [queue[i] for i in sorted(queue) if i > after]

    def acknowledge(self, client_id: str, command_id: int) -> None:
        self._commands.get(client_id, {}).pop(command_id, None)

    def drop_commands(self, client_id: str) -> None:
        self._commands.pop(client_id, None)

    def record_status(self, client_id: str, report: StatusReport) -> None:
        self._status[report.command_id] = report

    def command_status(self, command_id: int) -> StatusReport | None:
        return self._status.get(command_id)

    def set_deployment(self, deployment: Deployment) -> None:
        self._deployment = deployment

    def get_deployment(self) -> Deployment | None:
        return self._deployment

    def add_upload(self, upload: StoredUpload) -> None:
        self._uploads.append(upload)

    def list_uploads(self, run_id: str | None = None) -> list[StoredUpload]:
        return [u for u in self._uploads if run_id is None or u.header.run_id == run_id]
