"""Drives training runs over the control plane: the I/O around :class:`server.training.rounds.RoundMachine`.

A run waits for the coordinator's plan to be connected (one pipeline per data owner, each
cut its own way), tells every client holding partitions how the run trains (``PrepareRun``),
then follows the machine: ``Train`` to the owners (what each trains comes from the run's
local work), ``Upload`` of what every partition trains, a merge of each partition's copies
with the run's aggregator, ``LoadPartitions`` of the merged partitions where a pipeline needs
them, and after each round a checkpoint with :class:`~server.training.checkpoints.CheckpointStore`
(a folder ``from_pretrained`` loads, or a PEFT adapter folder when the run's finetune mode
trains adapters). The owner answers ``Train`` with a round report, checked here as network
input (:mod:`server.training.reports`) before it joins the run's history.

The run holds one member of each extension point (:class:`~server.training.seams.RunSeams`)
and calls it; nothing here branches on which member a run file chose.

Uploads and ``LoadPartitions`` files are the run's codec's bytes; their sizes are counted
per round and client in the record's ``traffic``. Every upload carries the holder's
optimizer state next to its tensors (``optimizer/<entry>/<name>``,
:mod:`autograd_bridge.optim_state`). The server keeps the latest one by whole-model name:
one state that travels with the model when the participation shares it (the next owner in
turn continues with the previous owner's AdamW moments and step count, so the owners in turn
train exactly like one process would), else one per owner (each pipeline keeps its moments
across rounds; the merge averages weights, not moments).

A run resumes after a server restart from its last checkpoint: the pipelines of the new plan
first load the checkpoint's partitions and optimizer states, and training continues with
the next round (the owners' data streams continue where that round ended).

One run is active at a time: the server serves one plan.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autograd_bridge.codecs import decode_update
from proto.messages import (
    CommandState,
    DeviceProfile,
    LoadPartitions,
    PartitionAssignment,
    StatusReport,
    TrainedSlices,
    Upload,
)
from server.control.handler import ControlHandler
from server.control.state import Deployment, PlanRow
from server.errors import ServerError
from server.training import recovery
from server.training.aggregation import ClientUpdate
from server.training.checkpoints import CheckpointStore, from_peft_names, to_peft_names
from server.training.communication import elements_of
from server.training.device_limits import OwnerDevice, owner_devices
from server.training.global_model import PartitionTensors, optimizer_state_for, partition_names
from server.training.idle import PipelineTiming, turn_idle
from server.training.reports import history_entry, per_round
from server.training.rounds import (
    Action,
    Merge,
    Phase,
    PipelineInfo,
    SendLoad,
    SendPrepare,
    SendTrain,
    SendUpload,
    Snapshot,
)
from server.training.signals import layer_norms
from server.training.spec import RunSpec, chosen_path, prepare_command, spec_from_mapping, train_command
from server.training.store import InMemoryRunStore, RunRecord, RunStore

if TYPE_CHECKING:
    from server.planning.coordinator import ModelSource

__all__ = ["RunManager", "RunRecord", "from_peft_names", "per_round", "spec_and_resume", "to_peft_names"]

log = logging.getLogger(__name__)

_POLL_S = 0.2  # how often a waiting run looks at the plan
_SHARED = "*"  # the key of the one optimizer state that travels with the model


@dataclass(frozen=True, slots=True, kw_only=True)
class _PipelineUpload:
    """One pipeline's uploads of a round, decoded and combined."""

    tensors: dict[str, Any]  # what its partitions train, by whole-model name
    optimizer: dict[str, Any]  # its optimizer state, by optimizer/<entry>/<name>
    sizes: dict[str, int]  # client id -> encoded bytes it uploaded
    slices: dict[str, TrainedSlices]  # tensors trained only in parts (heads mode), by whole-model name


class RunManager:
    """Starts, follows and stops runs; a ControlListener next to the coordinator."""

    def __init__(
        self,
        handler: ControlHandler,
        *,
        model: ModelSource | None,
        model_name: str,
        stages: int | None,
        checkpoints: CheckpointStore,
        store: RunStore | None = None,
    ) -> None:
        self.handler = handler
        self.state = handler.state
        self.model = model
        self.model_name = model_name
        self.stages = stages
        self.checkpoints = checkpoints
        self.store = store if store is not None else InMemoryRunStore()
        self._tasks: set[asyncio.Task[None]] = set()
        # Removed by close() (and, should the process end without it, at interpreter exit).
        self._scratch_dir = tempfile.TemporaryDirectory(prefix="titanic-merged-")
        self._scratch = Path(self._scratch_dir.name)
        self._tokenizers: dict[str, Any] = {}  # tokenizer name -> loaded (None: the model has none)
        self._saved: dict[str, tuple[Any, ...]] = {}  # run id -> what it looked like when last put

    # -- operator API ----------------------------------------------------------------------

    def start(self, spec: RunSpec, *, resume: str | None = None) -> RunRecord:
        """Start ``spec``, or continue run ``resume`` from its last checkpoint (ValueError when it cannot)."""
        if self.model is None:
            raise ValueError("the server has no model; start it with --model (or [model] path) to run training")
        if spec.model and spec.model != self.model_name:
            raise ValueError(f"this server plans for {self.model_name!r}, not {spec.model!r}; leave model empty")
        if spec.stages is not None and self.stages is not None and spec.stages != self.stages:
            raise ValueError(f"this server plans {self.stages} stages, not {spec.stages}; leave stages unset")
        busy = [r.run_id for r in self.store.list_runs() if r.machine.active]
        if busy:
            raise ValueError(f"run {busy[0]} is still active; stop it first (titanic-server runs stop {busy[0]})")
        return self._begin(RunRecord.new(resume or self._new_id(), spec, created_at=time.time()), resume=resume is not None)

    def _begin(self, record: RunRecord, *, resume: bool) -> RunRecord:
        """Put ``record`` (continuing from its last checkpoint when ``resume``) and follow the plan for it."""
        if resume:
            self._resume(record)
        self.store.put(record)
        self._spawn(self._follow_plan(record))
        log.info("%s started: %s", record.run_id, record.spec.to_json())
        return record

    def continue_interrupted(self) -> list[str]:
        """Continue the runs a stopped server left active (a persistent store remembers them); returns their ids.

        Each continues under its own id from its last checkpoint (afresh when it has none:
        its seeds and data positions make that the same run) once a plan is connected.
        """
        continued = []
        for old in self.store.list_runs():
            if not old.machine.active:
                continue
            record = recovery.after_restart(old)
            self.checkpoints.remove_incomplete(old.run_id)
            try:
                self._begin(record, resume=self.checkpoints.latest(old.run_id) is not None)
            except ValueError as exc:
                old.machine.phase, old.machine.error = Phase.FAILED, f"could not continue after a server restart: {exc}"
                self.store.put(old)
                continue
            continued.append(record.run_id)
        return continued

    def stop(self, run_id: str) -> RunRecord:
        """Stop a run (KeyError when unknown); it keeps its checkpoints."""
        record = self.store.get(run_id)
        if record is None:
            raise KeyError(run_id)
        record.machine.stop()
        self._save(record)
        return record

    def get(self, run_id: str) -> RunRecord | None:
        """The run ``run_id``, or None."""
        return self.store.get(run_id)

    def list_runs(self) -> list[RunRecord]:
        """Every run, oldest first."""
        return self.store.list_runs()

    async def close(self) -> None:
        """Stop the background tasks."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._scratch_dir.cleanup()

    def _save(self, record: RunRecord) -> None:
        """Put ``record`` again when it changed since it was last put (a persistent store writes it)."""
        if self.store.get(record.run_id) not in (None, record):
            return  # replaced by a replay (server.training.recovery)
        m = record.machine
        mark = (m.phase, m.round, m.turn, m.error, len(m.history), len(record.checkpoints), len(record.signals),
                len(record.recoveries), record.plan_id, sum(c["uploaded"] + c["downloaded"] for c in record.traffic_json()))  # fmt: skip
        if self._saved.get(record.run_id) != mark:
            self.store.put(record)
            self._saved[record.run_id] = mark

    def _new_id(self) -> str:
        taken = {r.run_id for r in self.store.list_runs()}
        if self.checkpoints.root.is_dir():
            taken |= {p.name for p in self.checkpoints.root.iterdir()}
        n = 1
        while f"run-{n}" in taken:
            n += 1
        return f"run-{n}"

    def _resume(self, record: RunRecord) -> None:
        """Load the last checkpoint of ``record.run_id`` as the global state to start from."""
        saved = self.checkpoints.latest(record.run_id)
        if saved is None:
            raise ValueError(f"run {record.run_id!r} has no checkpoint under {self.checkpoints.root} to resume from")
        finetune = record.seams.finetune
        if saved.adapter != finetune.adapter:
            kind = "an adapter folder" if saved.adapter else "a whole model"
            raise ValueError(
                f"run {record.run_id!r} was checkpointed as {kind}, which [finetune] mode {finetune.name!r} "
                "does not write; resume with the mode the run started with"
            )
        if saved.round >= record.spec.rounds:
            raise ValueError(f"run {record.run_id!r} finished round {saved.round} already; ask for more rounds")
        from safetensors.torch import load_file  # the server's own files, not network input

        files = sorted(p for p in saved.path.glob("*.safetensors") if not p.name.startswith("titanic"))
        state: dict[str, Any] = {}
        for path in files:
            state.update(load_file(path))
        record.global_state = from_peft_names(state) if saved.adapter else state
        if saved.server_state.get("aggregator"):
            record.seams.aggregator.load_state_dict(saved.server_state["aggregator"])  # a server optimizer's moments
        record.optimizers = _optimizers_by_name(saved.server_state.get("optimizers", {}))
        record.machine.history = json.loads(saved.server_state.get("history_json", "[]"))
        record.signals = json.loads(saved.server_state.get("signals_json", "[]"))
        for row in json.loads(saved.server_state.get("traffic_json", "[]")):
            for direction in ("uploaded", "downloaded"):
                record.count_bytes(int(row["round"]), str(row["client"]), direction, int(row[direction]))
        record.machine.resume_after(saved.round)
        record.resumed_from = saved.round
        record.checkpoints = [str(self.checkpoints.load_round(record.run_id, r).path) for r in self.checkpoints.rounds(record.run_id)]

    # -- ControlListener -------------------------------------------------------------------

    def membership_changed(self) -> None:
        """A client came or went: a run that lost one of its holders replays its round without it."""
        for record in self.store.list_runs():
            if record.machine.active and record.machine.phase != Phase.WAITING:
                gone = recovery.lost_holders(record, self.handler)
                if gone:
                    client = self.state.get_client(gone[0])
                    self._recover(record, gone[0], client.status_reason if client is not None else "it is gone")

    def _recover(self, record: RunRecord, lost: str, reason: str) -> None:
        """Replay ``record``'s round after losing ``lost`` (or fail it when its retries are spent)."""
        log.warning("%s: lost %s in round %d (%s); replaying the round", record.run_id, lost or "a client",
                    record.machine.round, reason)  # fmt: skip
        replay = recovery.recover(record, lost=lost, reason=reason, handler=self.handler, begin=self._begin_replay)
        if replay is None:
            log.error("%s: %s", record.run_id, record.machine.error)
            self._save(record)

    def _begin_replay(self, record: RunRecord) -> None:
        self._begin(record, resume=self.checkpoints.latest(record.run_id) is not None)

    def status_reported(self, client_id: str, report: StatusReport) -> None:
        """Follow the commands this manager sent."""
        for record in self.store.list_runs():
            entry = record.commands.get(report.command_id)
            if entry is None:
                continue
            kind, expected, bridge_run = entry
            if client_id != expected:
                return
            if report.state == CommandState.ACCEPTED:
                if kind == "train" and report.progress is not None:
                    record.follow_progress(client_id, report.progress)
                return
            del record.commands[report.command_id]
            if report.state == CommandState.FAILED:
                holders = record.machine.pipelines.get(bridge_run)
                if report.lost_peer and holders is not None and report.lost_peer in holders.holders:
                    self._recover(record, report.lost_peer, f"{client_id} lost it: {report.message}")
                else:
                    record.machine.failed(f"{kind} on {client_id} ({bridge_run}) failed: {report.message}")
                return
            if kind == "train":
                try:
                    metrics = self._checked_report(record, bridge_run, report)
                except ValueError as exc:
                    record.machine.failed(f"the round report of {client_id} ({bridge_run}) was refused: {exc}")
                    return
                log.info("%s round %d, %s: ppl %.4f", record.run_id, record.machine.round, client_id, metrics["ppl"])
                training = record.machine.phase == Phase.TRAINING
                if training:
                    record.clock_train(bridge_run, ended=True)
                actions = record.machine.train_done(bridge_run, metrics)
                if training and record.machine.phase != Phase.TRAINING:
                    self._account_idle(record)  # the turn's last report
                self._apply(record, actions)
            else:
                self._apply(record, record.machine.command_done(bridge_run, client_id))
            return

    def _checked_report(self, record: RunRecord, bridge_run: str, report: StatusReport) -> dict[str, Any]:
        """The history entry of a finished Train (ValueError when its round report is missing or wrong)."""
        if report.round_report is None:
            raise ValueError("the Train command finished without a round report; the client must answer Train with one")
        round, work = record.asked[bridge_run]
        entry = history_entry(report.round_report, round=round)
        local_work = record.seams.local_work
        local_work.check(work, report.round_report)
        entry["weight"] = local_work.record(record.machine.pipelines[bridge_run].owner, report.round_report)
        path = self._path_of(record.spec, bridge_run)
        estimate = self._estimates_of(bridge_run).get(path)
        if isinstance(estimate, int | float):  # the plan's step estimate on the path this round took
            entry.update(path=path, est_step_s=float(estimate))
        return entry

    # -- carrying out actions --------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send(self, record: RunRecord, kind: str, client_id: str, bridge_run: str, body: Any) -> None:
        command = self.handler.send_command(client_id, body)
        record.commands[command.command_id] = (kind, client_id, bridge_run)

    def _estimates_of(self, bridge_run: str) -> dict[str, float]:
        """The plan's estimated seconds per step of ``bridge_run``'s pipeline on each data path ({} without a plan)."""
        deployment = self.state.get_deployment()
        rows = [r for r in deployment.rows if r.run_id == bridge_run] if deployment is not None else []
        if deployment is None or not rows:
            return {}
        return dict(deployment.summary.get("est_step_s", {}).get(rows[0].owner_id) or {})

    def _path_of(self, spec: RunSpec, bridge_run: str) -> str:
        """The run's data path for ``bridge_run``; ``auto``: the faster by the plan's estimate for its owner."""
        return chosen_path(spec.training.path, self._estimates_of(bridge_run) or None)

    def _apply(self, record: RunRecord, actions: list[Action]) -> None:
        spec = record.spec
        for action in actions:
            if isinstance(action, SendPrepare):
                try:  # the plan decides the owners: heads mode needs one of them to train every head
                    spec.finetune.check_owners([p.owner for p in record.machine.pipelines.values()])
                except ValueError as exc:
                    record.machine.failed(str(exc))
                    return
                owner = record.machine.pipelines[action.bridge_run].owner
                prepare = prepare_command(spec, action.bridge_run, owner, path=self._path_of(spec, action.bridge_run))
                self._send(record, "prepare", action.client_id, action.bridge_run, prepare)
            elif isinstance(action, SendTrain):
                recovery.note_resumed(record)
                work = record.seams.local_work.assign(action.round, action.client_id)
                record.asked[action.bridge_run] = (action.round, work)
                record.clock_train(action.bridge_run, ended=False)
                body: Any = train_command(spec, bridge_run=action.bridge_run, round=action.round, work=work,
                                          model=self.model_name, owner=action.client_id)  # fmt: skip
                self._send(record, "train", action.client_id, action.bridge_run, body)
            elif isinstance(action, SendUpload):
                body = self._upload_command(record, action)
                self._send(record, "upload", action.client_id, action.bridge_run, body)
            elif isinstance(action, SendLoad):
                try:
                    body = self._load_command(record, action)
                except (OSError, ValueError) as exc:
                    record.machine.failed(f"preparing the merged partitions failed: {exc}")
                    return
                self._send(record, "load", action.client_id, action.bridge_run, body)
            elif isinstance(action, Merge):
                self._spawn(self._merge(record, action))
            elif isinstance(action, Snapshot):
                self._spawn(self._snapshot(record, action))

    async def _follow_plan(self, record: RunRecord) -> None:
        """Wait for a connected plan, then start; fail the run if that plan goes away."""
        machine = record.machine
        while machine.phase == Phase.WAITING:
            deployment = self.state.get_deployment()
            if record.wait_for_owners_until and time.time() > record.wait_for_owners_until:
                machine.failed(
                    f"the data owners {sorted(record.owners_wanted)} were not all back in a plan within "
                    f"[recovery] owner_wait_s = {record.spec.recovery.owner_wait_s:g} s; start them, then continue "
                    f"with titanic-server runs start RUN_FILE --resume {record.run_id}"
                )
                break
            if (
                deployment is not None and deployment.state == "connected" and deployment.plan_id
                and deployment.plan_id != record.replaces_plan and set(record.owners_wanted) <= set(deployment.owners)
            ):  # fmt: skip
                try:
                    pipelines = self._pipelines(record, deployment)
                    devices = await asyncio.to_thread(self._owner_devices, record, deployment)
                except ValueError as exc:
                    machine.failed(str(exc))
                    self._save(record)
                    return
                record.seams.local_work.plan(devices, record.spec.training)
                record.plan_id = deployment.plan_id
                self._apply(record, machine.pipelines_ready(pipelines))
                break
            await asyncio.sleep(_POLL_S)
        try:
            while machine.active:
                deployment = self.state.get_deployment()
                if deployment is None or deployment.plan_id != record.plan_id or deployment.state == "failed":
                    reason = deployment.error if deployment is not None and deployment.error else "the plan changed"
                    gone = recovery.lost_holders(record, self.handler)
                    self._recover(record, gone[0] if gone else "", f"the run's plan {record.plan_id} is gone ({reason})")
                    break
                self._save(record)
                await asyncio.sleep(_POLL_S)
            self._save(record)
            if self.store.get(record.run_id) is record:
                self._retire_plan(record)
        finally:
            for bridge_run in record.partitions:
                self.handler.forget_uploads(bridge_run)  # an ended run takes no more uploads

    def _retire_plan(self, record: RunRecord) -> None:
        """The run ended: its plan's stages hold what it trained, so the next run gets a new plan (fresh weights)."""
        deployment = self.state.get_deployment()
        if deployment is not None and record.plan_id and deployment.plan_id == record.plan_id:
            self.state.set_deployment(replace(deployment, state="retired", error=f"{record.run_id} trained on it"))
            self.handler.request_replan()

    def _pipelines(self, record: RunRecord, deployment: Deployment) -> dict[str, PipelineInfo]:
        wanted = record.owners_wanted or record.spec.owners
        owners = [o for o in deployment.owners if not wanted or o in wanted]
        absent = sorted(set(wanted) - set(owners))
        if absent:
            raise ValueError(f"the data owners {absent} are not in the plan; start them with --data")
        if not owners:
            raise ValueError("the plan has no data owner; start a client with --data")
        record.seams.participation.check_owners(owners)
        pipelines: dict[str, PipelineInfo] = {}
        for owner in owners:
            rows = [r for r in deployment.rows if r.owner_id == owner]
            holders: dict[str, list[int]] = {}
            for row in rows:
                holders.setdefault(row.client_id, []).append(row.partition)
                record.rows[(row.run_id, row.partition)] = row
                record.partitions.setdefault(row.run_id, {})[row.partition] = self._partition_tensors(row)
            pipelines[rows[0].run_id] = PipelineInfo(owner=owner, holders={c: tuple(p) for c, p in holders.items()})
        return pipelines

    def _owner_devices(self, record: RunRecord, deployment: Deployment) -> dict[str, OwnerDevice]:
        """Each owner's micro-batch limit and guessed speed, from the clients' profiles and the model's costs (blocking)."""
        from transformers import AutoConfig

        from autograd_bridge.partition import stage_specs_from_counts
        from autograd_bridge.profile import profile_model, profile_partitions

        assert self.model is not None  # start() checked
        seq_len = record.spec.training.seq_len
        with tempfile.TemporaryDirectory(prefix="titanic-config-") as tmp:
            (Path(tmp) / "config.json").write_text(self.model.config_json())
            model = profile_model(AutoConfig.from_pretrained(tmp), seq_len=seq_len)
        rows = [r for r in deployment.rows if r.run_id in record.partitions]
        costs = {}
        for run_id in {r.run_id for r in rows}:
            pipeline = sorted((r for r in rows if r.run_id == run_id), key=lambda r: r.partition)
            for row, cost in zip(pipeline, profile_partitions(model, stage_specs_from_counts([r.blocks for r in pipeline])), strict=True):
                costs[(run_id, row.partition)] = cost
        profiles = {c: self._profile(c) for c in {r.client_id for r in rows}}
        return owner_devices(rows, costs, profiles, seq_len=seq_len)

    def _partition_tensors(self, row: PlanRow) -> PartitionTensors:
        """What partition ``row`` holds: its blocks, and the names in the weight file it was planned with."""
        from safetensors import safe_open  # reads the header only

        try:
            stored = self.handler.weights.get(row.run_id, row.partition)
        except ServerError as exc:
            raise ValueError(f"the plan's weights of partition {row.partition} of {row.run_id} are gone: {exc}") from exc
        with safe_open(str(stored.path), framework="pt") as f:
            names = frozenset(f.keys())
        return PartitionTensors(index=row.partition, layer_start=row.layer_start, layer_end=row.layer_end, stored=names,
                                stored_bytes=stored.size)  # fmt: skip

    @staticmethod
    def _account_idle(record: RunRecord) -> None:
        """The turn's pipelines all reported: add each device's idle figures to their history entries."""
        machine = record.machine
        group = machine.turns[machine.turn]
        entries = {h["bridge_run"]: h for h in machine.history[-len(group):] if h["round"] == machine.round}
        clocks = {run: record.train_clock[run] for run in group if run in record.train_clock}
        if set(entries) != set(group) or set(clocks) != set(group):
            return  # a turn resumed halfway has no clock for it
        began = min(sent for sent, _ in clocks.values())
        wall = max(ended for _, ended in clocks.values()) - began
        timings = [
            PipelineTiming(
                owner=machine.pipelines[run].owner, active_s=clocks[run][1] - clocks[run][0], steps=len(entries[run]["losses"]),
                stage_seconds=entries[run]["stage_seconds"],
                holders={p: c for c, parts in machine.pipelines[run].holders.items() for p in parts},
            )
            for run in group
        ]  # fmt: skip
        figures = turn_idle(wall, timings)
        for run in group:
            devices = sorted(set(machine.pipelines[run].holders) | {machine.pipelines[run].owner})
            entries[run]["idle"] = {d: figures[d] for d in devices}
            entries[run]["idle_ratio"] = {d: figures[d]["idle"] for d in devices}

    # -- merging, distributing, checkpointing ----------------------------------------------

    def _upload_command(self, record: RunRecord, action: SendUpload) -> Upload:
        """Ask a holder for its partitions' update, as dense as its link allows, with its optimizer state when needed."""
        seams = record.seams
        pipeline = record.partitions[action.bridge_run]
        elements = elements_of({n: record.global_state[n] for i in action.partitions
                                for n in partition_names(record.global_state, pipeline[i])})  # fmt: skip
        density = seams.communication.density(action.client_id, "upload", elements, self._profile(action.client_id))
        with_state = record.spec.communication.optimizer_state or seams.participation.shared_optimizer
        for index in action.partitions:
            self.handler.expect_upload(action.client_id, action.bridge_run, index, action.round,
                                       max_bytes=upload_bound(pipeline[index].stored_bytes, with_state=with_state))  # fmt: skip
        return Upload(run_id=action.bridge_run, partitions=action.partitions, round=action.round, density=density,
                      optimizer_state=with_state)  # fmt: skip

    def _profile(self, client_id: str) -> DeviceProfile | None:
        client = self.state.get_client(client_id)
        return client.profile if client is not None else None

    def _load_command(self, record: RunRecord, action: SendLoad) -> LoadPartitions:
        """Store the global version of the holder's partitions (codec bytes) and name it in a LoadPartitions."""
        seams = record.seams
        pipeline = record.partitions[action.bridge_run]
        assignments = []
        for index in action.partitions:
            row = record.rows[(action.bridge_run, index)]
            names = partition_names(record.global_state, pipeline[index])
            if not names:
                if row.blocks == 0 and not any(seams.finetune.travels(n) for n in pipeline[index].stored):
                    continue  # no decoder block, and none of its own tensors trains in this mode: nothing to load
                raise ValueError(f"the global state has no tensors of partition {index}")
            tensors = {n: record.global_state[n] for n in names}
            codec = seams.communication.download_codec(action.client_id, elements_of(tensors), self._profile(action.client_id))
            tensors.update(self._optimizer_to_load(record, action.bridge_run, index))
            data = codec.encode(tensors)
            path = self._scratch / f"{record.run_id}-{action.bridge_run}-p{index}.bin"
            path.write_bytes(data)
            stored = self.handler.weights.add(action.bridge_run, index, path, clients=[action.client_id])
            record.count_bytes(record.machine.round, action.client_id, "downloaded", len(data))
            assignments.append(
                PartitionAssignment(
                    index=index,
                    num_stages=len(pipeline),
                    layer_start=row.layer_start,
                    layer_end=row.layer_end,
                    weights_sha256=stored.sha256,
                    weights_bytes=stored.size,
                )
            )
        return LoadPartitions(run_id=action.bridge_run, partitions=tuple(assignments), round=record.machine.round)

    def _optimizer_key(self, record: RunRecord, bridge_run: str) -> str:
        """Whose optimizer state a pipeline uses: the one travelling state, or its owner's own."""
        if record.seams.participation.shared_optimizer:
            return _SHARED
        return record.machine.pipelines[bridge_run].owner

    def _optimizer_to_load(self, record: RunRecord, bridge_run: str, index: int) -> dict[str, Any]:
        """The optimizer state partition ``index`` of ``bridge_run`` loads with the global tensors.

        A pipeline that keeps its own moments across merges gets its state only when it
        starts from a checkpoint; a travelling state goes with every load.
        """
        resuming = record.machine.round == record.resumed_from + 1 and record.resumed_from > 0
        if not record.seams.participation.shared_optimizer and not resuming:
            return {}
        state = record.optimizers.get(self._optimizer_key(record, bridge_run), {})
        return optimizer_state_for(state, list(record.partitions[bridge_run].values()), index)

    async def _merge(self, record: RunRecord, action: Merge) -> None:
        try:
            uploads = await asyncio.to_thread(self._read_uploads, record, action.bridge_runs, action.round)
            self._count_uploads(record, action.round, uploads.values())
            path = await asyncio.to_thread(self._merge_and_save, record, action, uploads)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            log.exception("%s: merging round %d failed", record.run_id, action.round)
            record.machine.failed(f"merging round {action.round} failed: {exc}")
            return
        if path is not None:
            record.checkpoints.append(str(path))
            log.info("%s: round %d saved to %s", record.run_id, action.round, path)
        self._apply(record, record.machine.merged())

    def _read_uploads(self, record: RunRecord, bridge_runs: tuple[str, ...], round: int) -> dict[str, _PipelineUpload]:
        """Each pipeline's uploads at the end of ``round``: every holder's, decoded with the run's codec and combined."""
        from autograd_bridge.optim_state import split_optimizer_tensors

        out = {}
        for bridge_run in bridge_runs:
            pipeline = record.machine.pipelines[bridge_run]
            latest: dict[tuple[str, int], Any] = {}
            for upload in self.state.list_uploads(bridge_run):
                if upload.header.round == round:
                    latest[(upload.client_id, upload.header.partition)] = upload
            tensors: dict[str, Any] = {}
            optimizer: dict[str, Any] = {}
            sizes: dict[str, int] = {}
            slices: dict[str, TrainedSlices] = {}
            for client_id, partitions in pipeline.holders.items():
                for partition in partitions:
                    found = latest.get((client_id, partition))
                    if found is None:
                        raise ValueError(f"{client_id} reported its upload of partition {partition} but none arrived")
                    data = Path(found.path).read_bytes()
                    sizes[client_id] = sizes.get(client_id, 0) + len(data)
                    weights, state = split_optimizer_tensors(decode_update(data))
                    tensors.update(weights)
                    optimizer.update(state)
                    slices.update({s.tensor: s for s in found.header.slices})
            out[bridge_run] = _PipelineUpload(tensors=tensors, optimizer=optimizer, sizes=sizes, slices=slices)
        return out

    @staticmethod
    def _count_uploads(record: RunRecord, round: int, uploads: Iterable[_PipelineUpload]) -> None:
        for upload in uploads:
            for client_id, size in upload.sizes.items():
                record.count_bytes(round, client_id, "uploaded", size)

    async def _snapshot(self, record: RunRecord, action: Snapshot) -> None:
        """Take the round-0 upload as the global state a server optimizer's first step starts from."""
        try:
            uploads = await asyncio.to_thread(self._read_uploads, record, (action.bridge_run,), action.round)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            log.exception("%s: reading the starting state failed", record.run_id)
            record.machine.failed(f"reading the starting state (round 0) of {action.bridge_run} failed: {exc}")
            return
        self._count_uploads(record, action.round, uploads.values())
        # The optimizer states of round 0 are empty (nothing has trained): keep the tensors.
        record.global_state = uploads[action.bridge_run].tensors
        log.info("%s: starting state taken from %s (%d tensors)", record.run_id, action.bridge_run, len(record.global_state))
        self._apply(record, record.machine.merged())

    def _reference(self, record: RunRecord, first: Mapping[str, Any]) -> Mapping[str, Any]:
        """The global state this turn's copies started from (what a server optimizer steps from)."""
        if set(record.global_state) == set(first):
            return record.global_state
        if record.seams.aggregator.steps_from_start:
            # Without the starting state the pseudo-gradient would be measured from a trained copy.
            differ = sorted(set(first) ^ set(record.global_state))[:3]
            raise ValueError(
                f"{record.spec.aggregation.rule} needs the state the copies started from, and it names other tensors "
                f"than the uploads (e.g. {differ}); start the run afresh so the holders upload it before round 1"
            )
        return first  # FedAvg only takes names and dtypes from the reference: any copy will do

    def _merge_and_save(self, record: RunRecord, action: Merge, uploads: Mapping[str, _PipelineUpload]) -> Path | None:
        for run, upload in uploads.items():
            record.optimizers[self._optimizer_key(record, run)] = upload.optimizer
        changes = record.seams.communication.sends_changes  # the uploads hold changes since the global state
        reference = record.global_state if changes else self._reference(record, uploads[action.bridge_runs[0]].tensors)
        # All owners weigh the same when none reports samples (FedAvg needs some weight).
        weights = {run: max(action.weights.get(run, 0), 0) or 1 for run in action.bridge_runs}
        updates = [
            ClientUpdate(
                state=uploads[run].tensors,
                num_samples=weights[run],
                client_id=run,
                delta=changes,
                slices=uploads[run].slices,
            )
            for run in action.bridge_runs
        ]
        previous = record.global_state
        record.global_state = record.seams.aggregator.aggregate(reference, updates)
        # Photon's divergence signals: how far this merge moved each layer, and how large the model is.
        signal = {"round": action.round, "pipelines": list(action.bridge_runs), **layer_norms(previous, record.global_state)}
        record.signals.append(signal)
        if not action.checkpoint:
            return None
        return self._write_checkpoint(record, action.round)

    def _write_checkpoint(self, record: RunRecord, round: int) -> Path:
        from transformers import AutoConfig

        from autograd_bridge.models import load_tokenizer

        assert self.model is not None  # start() checked
        with tempfile.TemporaryDirectory(prefix="titanic-config-") as tmp:
            (Path(tmp) / "config.json").write_text(self.model.config_json())
            config = AutoConfig.from_pretrained(tmp)
        name = record.spec.tokenizer or self.model_name
        if name not in self._tokenizers:  # read once: a .gguf model's takes seconds to convert
            try:
                self._tokenizers[name] = load_tokenizer(name)
            except ValueError:
                self._tokenizers[name] = None  # the model has no tokenizer files; the checkpoint holds the model only
        tokenizer = self._tokenizers[name]
        server_state: Mapping[str, Any] = {
            "round": round,
            "spec": record.spec.to_json(),
            "history_json": json.dumps(record.machine.history),
            "traffic_json": json.dumps(record.traffic_json()),
            "signals_json": json.dumps(record.signals),
            "aggregator": record.seams.aggregator.state_dict(),
            "optimizers": record.optimizers,
        }
        settings = record.spec.finetune.settings(record.spec.seed)
        adapter_config = record.seams.finetune.export_config(config, settings, self.model_name)
        if adapter_config is not None:  # the finetune mode exports adapters over the base model
            return self.checkpoints.save_round(
                record.run_id, round, to_peft_names(record.global_state), config=adapter_config,
                tokenizer=tokenizer, server_state=server_state, adapter=True,
            )  # fmt: skip
        return self.checkpoints.save_round(
            record.run_id, round, record.global_state, config=config, tokenizer=tokenizer, server_state=server_state
        )


def _optimizers_by_name(saved: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Checkpointed optimizer states as flat dicts by name (older checkpoints nest them by partition)."""
    out: dict[str, dict[str, Any]] = {}
    for key, entries in saved.items():
        flat: dict[str, Any] = {}
        for name, value in entries.items():
            if isinstance(value, Mapping):
                flat.update(value)  # partition index -> its state
            else:
                flat[name] = value
        out[key] = flat
    return out


def upload_bound(weights_bytes: int, *, with_state: bool) -> int:
    """The most bytes an upload of a partition planned with a ``weights_bytes`` weight file may have.

    Generous: four times the weights (16-bit weights sent as 32-bit values with a sparse
    codec's 32-bit indexes), three times that when the optimizer's two moments travel too,
    and room for headers.
    """
    return 4 * weights_bytes * (3 if with_state else 1) + 4 * (1 << 20)


def spec_and_resume(body: Mapping[str, Any]) -> tuple[RunSpec, str | None]:
    """The spec and the optional run to resume from a POST /v1/runs body."""
    spec = body.get("spec")
    if not isinstance(spec, dict):
        raise ValueError('send a JSON body {"spec": {...}, "resume": "<run id>" (optional)}')
    resume = body.get("resume")
    if resume is not None and (not isinstance(resume, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", resume)):
        raise ValueError("resume must be the id of a run with checkpoints, e.g. run-1")
    return spec_from_mapping(spec), resume
