"""Drives training runs over the control plane: the I/O around :class:`server.training.rounds.RoundMachine`.

A run waits for the coordinator's plan to be connected (one pipeline per data owner), tells
every client holding partitions how the run trains (``PrepareRun``: LoRA adapters or all
weights), then follows the machine: ``Train`` to the owners, ``Upload`` of what every
partition trains, a merge of each partition's copies (FedAvg weighted by the owners' samples),
``LoadPartitions`` of the merged partitions where a pipeline needs them, and after each round a
checkpoint with :class:`~server.training.checkpoints.CheckpointStore` (a folder ``from_pretrained``
loads, or a PEFT adapter folder). The owner's ``Train`` answer carries its metrics as JSON in
the status message (losses, validation loss and perplexity, samples).

Every upload carries the holder's optimizer state for the partition next to its tensors
(``optimizer/<entry>/<name>``, :mod:`autograd_bridge.optim_state`). The server keeps the
latest one per partition: in cases 1 and 2 one state that travels with the model (case 2's
next owner continues with the previous owner's AdamW moments and step count, so the owners
in turn train exactly like one process would), in case 3 one per owner (each pipeline keeps
its local moments across rounds; the merge averages weights, not moments).

A run resumes after a server restart from its last checkpoint: the pipelines of the new plan
first load the checkpoint's partitions and optimizer states, and training continues with
the next round (the owners' data streams continue where that round ended).

One run is active at a time: the server serves one plan.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proto.messages import (
    CommandState,
    LoadPartitions,
    PartitionAssignment,
    PrepareRun,
    StatusReport,
    Train,
    Upload,
)
from server.control.handler import ControlHandler
from server.control.state import Deployment, PlanRow
from server.planning.coordinator import ModelSource
from server.training.aggregation import ClientUpdate
from server.training.checkpoints import CheckpointStore
from server.training.rounds import (
    Action,
    Merge,
    Phase,
    PipelineInfo,
    RoundMachine,
    SendLoad,
    SendPrepare,
    SendTrain,
    SendUpload,
    Snapshot,
)
from server.training.spec import (
    RunSpec,
    aggregation_settings,
    prepare_settings,
    spec_from_mapping,
    train_settings,
)

log = logging.getLogger(__name__)

_POLL_S = 0.2  # how often a waiting run looks at the plan
_PEFT_PREFIX = "base_model.model."  # what peft puts before whole-model names in adapter files
_LAYER = re.compile(r"\.(\d+)\.")  # the first number in a parameter name is its decoder block


@dataclass(slots=True, kw_only=True)
class RunRecord:
    """A run the server knows about."""

    run_id: str
    spec: RunSpec
    machine: RoundMachine
    created_at: float
    plan_id: str = ""  # the plan the run trains on; a different plan fails the run
    resumed_from: int = 0  # the checkpointed round it resumed after (0: started fresh)
    checkpoints: list[str] = field(default_factory=list)  # folders written, oldest first
    commands: dict[int, tuple[str, str, str]] = field(default_factory=dict)  # id -> (kind, client, bridge run)
    rows: dict[tuple[str, int], PlanRow] = field(default_factory=dict)  # (bridge run, partition) -> plan row
    global_state: dict[str, Any] = field(default_factory=dict)  # merged tensors (all, or adapters) by name
    # Optimizer states by key (the owner in case 3, "*" in cases 1 and 2), then partition,
    # then optimizer-state name: what the pipelines load after a hand-over or a resume.
    optimizers: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    aggregator_state: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The run as the admin API shows it."""
        m = self.machine
        return {
            "run_id": self.run_id,
            "name": self.spec.name,
            "case": self.spec.case,
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
            "checkpoints": list(self.checkpoints),
            "created_at": self.created_at,
            "spec": self.spec.to_json(),
        }


def per_round(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per round: each owner's validation perplexity and the token-weighted one over all owners."""
    rounds: dict[int, dict[str, Any]] = {}
    for h in history:
        entry = rounds.setdefault(int(h["round"]), {"round": int(h["round"]), "owners": {}, "_loss": 0.0, "_tok": 0})
        entry["owners"][h["owner"]] = h["ppl"]
        tokens = int(h.get("val_tokens", 0))
        entry["_loss"] += h["val_loss"] * tokens
        entry["_tok"] += tokens
    out = []
    for r in sorted(rounds):
        entry = rounds[r]
        loss, tokens = entry.pop("_loss"), entry.pop("_tok")
        entry["ppl"] = math.exp(loss / tokens) if tokens else None
        out.append(entry)
    return out


def parse_metrics(message: str) -> dict[str, Any]:
    """The owner's metrics from a Train status message (network input: checked, not trusted)."""
    try:
        raw = json.loads(message)
    except ValueError as exc:
        raise ValueError(f"the owner's training report is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError("the owner's training report must be a JSON object")
    out: dict[str, Any] = {}
    for key in ("val_loss", "ppl", "seconds"):
        value = raw.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"the owner's training report needs a finite number {key!r}")
        out[key] = float(value)
    losses = raw.get("losses")
    if not isinstance(losses, list) or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in losses):
        raise ValueError("the owner's training report needs 'losses', a list of numbers")
    out["losses"] = [float(x) for x in losses]
    for key in ("samples", "data_samples", "val_tokens"):
        value = raw.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"the owner's training report needs {key!r}, an integer >= 0")
        out[key] = value
    # Optional timing (older clients send none): per stage and whole step, mean seconds per step.
    if "stage_seconds" in raw:
        stage_seconds = raw["stage_seconds"]
        if not isinstance(stage_seconds, list) or not all(_seconds(x) for x in stage_seconds):
            raise ValueError("the owner's training report has 'stage_seconds' that is not a list of finite numbers >= 0")
        out["stage_seconds"] = [float(x) for x in stage_seconds]
    if "step_seconds" in raw:
        if not _seconds(raw["step_seconds"]):
            raise ValueError("the owner's training report has 'step_seconds' that is not a finite number >= 0")
        out["step_seconds"] = float(raw["step_seconds"])
    return out


def _seconds(value: object) -> bool:
    """Whether ``value`` is a duration as JSON brings it: a finite number >= 0, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def to_peft_names(state: Mapping[str, Any]) -> dict[str, Any]:
    """Adapter tensors under whole-model names (``...lora_A.default.weight``) as peft saves them."""
    return {_PEFT_PREFIX + name.replace(".default.", "."): t for name, t in state.items()}


def from_peft_names(state: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`to_peft_names`."""
    out = {}
    for name, tensor in state.items():
        bare = name.removeprefix(_PEFT_PREFIX)
        for marker in ("lora_A", "lora_B"):
            bare = bare.replace(f".{marker}.", f".{marker}.default.")
        out[bare] = tensor
    return out


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
    ) -> None:
        self.handler = handler
        self.state = handler.state
        self.model = model
        self.model_name = model_name
        self.stages = stages
        self.checkpoints = checkpoints
        self.runs: dict[str, RunRecord] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._scratch = Path(tempfile.mkdtemp(prefix="titanic-merged-"))
        self._tokenizers: dict[str, Any] = {}  # tokenizer name -> loaded (None: the model has none)

    # -- operator API ----------------------------------------------------------------------

    def start(self, spec: RunSpec, *, resume: str | None = None) -> RunRecord:
        """Start ``spec``, or continue run ``resume`` from its last checkpoint (ValueError when it cannot)."""
        if self.model is None:
            raise ValueError("the server has no model; start it with --model (or [model] path) to run training")
        if spec.model and spec.model != self.model_name:
            raise ValueError(f"this server plans for {self.model_name!r}, not {spec.model!r}; leave model empty")
        if spec.stages is not None and self.stages is not None and spec.stages != self.stages:
            raise ValueError(f"this server plans {self.stages} stages, not {spec.stages}; leave stages unset")
        busy = [r.run_id for r in self.runs.values() if r.machine.active]
        if busy:
            raise ValueError(f"run {busy[0]} is still active; stop it first (titanic-server runs stop {busy[0]})")
        machine = RoundMachine(rounds=spec.rounds, case=spec.case, snapshot_first=spec.server_optimizer)
        record = RunRecord(run_id=resume or self._new_id(), spec=spec, machine=machine, created_at=time.time())
        if resume is not None:
            self._resume(record)
        self.runs[record.run_id] = record
        self._spawn(self._follow_plan(record))
        log.info("%s started: %s", record.run_id, spec.to_json())
        return record

    def stop(self, run_id: str) -> RunRecord:
        """Stop a run (KeyError when unknown); it keeps its checkpoints."""
        record = self.runs[run_id]
        record.machine.stop()
        return record

    def list_runs(self) -> list[RunRecord]:
        """Every run, oldest first."""
        return list(self.runs.values())

    async def close(self) -> None:
        """Stop the background tasks."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _new_id(self) -> str:
        taken = set(self.runs)
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
        if saved.adapter != (record.spec.finetune == "lora"):
            raise ValueError(f"run {record.run_id!r} was checkpointed with finetune={'lora' if saved.adapter else 'full'}")
        if saved.round >= record.spec.rounds:
            raise ValueError(f"run {record.run_id!r} finished round {saved.round} already; ask for more rounds")
        from safetensors.torch import load_file

        files = sorted(p for p in saved.path.glob("*.safetensors") if not p.name.startswith("titanic"))
        state: dict[str, Any] = {}
        for path in files:
            state.update(load_file(path))
        record.global_state = from_peft_names(state) if saved.adapter else state
        record.aggregator_state = dict(saved.server_state.get("aggregator", {}))
        record.optimizers = {
            key: {int(index): dict(state) for index, state in partitions.items()}
            for key, partitions in saved.server_state.get("optimizers", {}).items()
        }
        record.machine.history = json.loads(saved.server_state.get("history_json", "[]"))
        record.machine.resume_after(saved.round)
        record.resumed_from = saved.round
        record.checkpoints = [str(self.checkpoints.load_round(record.run_id, r).path) for r in self.checkpoints.rounds(record.run_id)]

    # -- ControlListener -------------------------------------------------------------------

    def membership_changed(self) -> None:
        """Nothing to do: a changed plan is noticed when the run's plan goes away."""

    def status_reported(self, client_id: str, report: StatusReport) -> None:
        """Follow the commands this manager sent."""
        for record in self.runs.values():
            entry = record.commands.get(report.command_id)
            if entry is None:
                continue
            kind, expected, bridge_run = entry
            if client_id != expected or report.state == CommandState.ACCEPTED:
                return
            del record.commands[report.command_id]
            if report.state == CommandState.FAILED:
                record.machine.failed(f"{kind} on {client_id} ({bridge_run}) failed: {report.message}")
                return
            if kind == "train":
                try:
                    metrics = parse_metrics(report.message)
                except ValueError as exc:
                    record.machine.failed(str(exc))
                    return
                log.info("%s round %d, %s: ppl %.4f", record.run_id, record.machine.round, client_id, metrics["ppl"])
                self._apply(record, record.machine.train_done(bridge_run, metrics))
            else:
                self._apply(record, record.machine.command_done(bridge_run, client_id))
            return

    # -- carrying out actions --------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send(self, record: RunRecord, kind: str, client_id: str, bridge_run: str, body: Any) -> None:
        command = self.handler.send_command(client_id, body)
        record.commands[command.command_id] = (kind, client_id, bridge_run)

    def _apply(self, record: RunRecord, actions: list[Action]) -> None:
        spec = record.spec
        for action in actions:
            if isinstance(action, SendPrepare):
                body: Any = PrepareRun(run_id=action.bridge_run, settings_json=json.dumps(prepare_settings(spec)))
                self._send(record, "prepare", action.client_id, action.bridge_run, body)
            elif isinstance(action, SendTrain):
                settings = train_settings(spec, round=action.round, model=self.model_name)
                body = Train(run_id=action.bridge_run, settings_json=json.dumps(settings))
                self._send(record, "train", action.client_id, action.bridge_run, body)
            elif isinstance(action, SendUpload):
                body = Upload(run_id=action.bridge_run, partitions=action.partitions, round=action.round)
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
            if deployment is not None and deployment.state == "connected" and deployment.plan_id:
                try:
                    pipelines = self._pipelines(record, deployment)
                except ValueError as exc:
                    machine.failed(str(exc))
                    return
                record.plan_id = deployment.plan_id
                self._apply(record, machine.pipelines_ready(pipelines))
                break
            await asyncio.sleep(_POLL_S)
        while machine.active:
            deployment = self.state.get_deployment()
            if deployment is None or deployment.plan_id != record.plan_id or deployment.state == "failed":
                reason = deployment.error if deployment is not None and deployment.error else "the plan changed"
                machine.failed(f"the run's plan {record.plan_id} is gone ({reason}); resume from the last checkpoint")
                return
            await asyncio.sleep(_POLL_S)

    def _pipelines(self, record: RunRecord, deployment: Deployment) -> dict[str, PipelineInfo]:
        wanted = record.spec.owners
        owners = [o for o in deployment.owners if not wanted or o in wanted]
        absent = sorted(set(wanted) - set(owners))
        if absent:
            raise ValueError(f"the data owners {absent} are not in the plan; start them with --data")
        if not owners:
            raise ValueError("the plan has no data owner; start a client with --data")
        if record.spec.case == 1 and len(owners) != 1:
            raise ValueError(f"case 1 needs exactly one data owner, the plan has {len(owners)}: {owners}; set owners")
        pipelines: dict[str, PipelineInfo] = {}
        for owner in owners:
            rows = [r for r in deployment.rows if r.owner_id == owner]
            holders: dict[str, list[int]] = {}
            for row in rows:
                holders.setdefault(row.client_id, []).append(row.partition)
                record.rows[(row.run_id, row.partition)] = row
            pipelines[rows[0].run_id] = PipelineInfo(owner=owner, holders={c: tuple(p) for c, p in holders.items()})
        return pipelines

    # -- merging, distributing, checkpointing ----------------------------------------------

    def _partition_names(self, record: RunRecord, row: PlanRow) -> list[str]:
        """The names of the global tensors that belong to partition ``row``."""
        if record.spec.finetune == "lora":
            return [n for n in record.global_state if (m := _LAYER.search(n)) and row.layer_start <= int(m.group(1)) < row.layer_end]
        from safetensors import safe_open

        stored = self.handler.weights.get(row.run_id, row.partition)
        with safe_open(str(stored.path), framework="pt") as f:
            return [n for n in f.keys() if n in record.global_state]  # noqa: SIM118 - safe_open is not a dict

    def _load_command(self, record: RunRecord, action: SendLoad) -> LoadPartitions:
        """Store the global version of the holder's partitions and name it in a LoadPartitions."""
        from safetensors.torch import save_file

        assignments = []
        for index in action.partitions:
            row = record.rows[(action.bridge_run, index)]
            names = self._partition_names(record, row)
            if not names:
                if record.spec.finetune == "lora" and row.blocks == 0:
                    continue  # no decoder block, no adapters: nothing of it trains
                raise ValueError(f"the global state has no tensors of partition {index}")
            tensors = {n: record.global_state[n].contiguous() for n in names}
            tensors.update(self._optimizer_to_load(record, action.bridge_run, index))
            path = self._scratch / f"{record.run_id}-{action.bridge_run}-p{index}.safetensors"
            save_file(tensors, str(path))
            stored = self.handler.weights.add(action.bridge_run, index, path, clients=[action.client_id])
            num_stages = sum(1 for (run, _) in record.rows if run == action.bridge_run)
            assignments.append(
                PartitionAssignment(
                    index=index,
                    num_stages=num_stages,
                    layer_start=row.layer_start,
                    layer_end=row.layer_end,
                    weights_sha256=stored.sha256,
                    weights_bytes=stored.size,
                )
            )
        return LoadPartitions(run_id=action.bridge_run, partitions=tuple(assignments), round=record.machine.round)

    def _optimizer_key(self, record: RunRecord, bridge_run: str) -> str:
        """Whose optimizer state a pipeline uses: its owner's own in case 3, the one travelling state otherwise."""
        return record.machine.pipelines[bridge_run].owner if record.spec.case == 3 else "*"

    def _optimizer_to_load(self, record: RunRecord, bridge_run: str, index: int) -> dict[str, Any]:
        """The optimizer state partition ``index`` of ``bridge_run`` loads with the global tensors.

        In case 3 a pipeline keeps its own moments across merges, so its state is sent only
        when it starts from a checkpoint; in cases 1 and 2 the state follows the model.
        """
        resuming = record.machine.round == record.resumed_from + 1 and record.resumed_from > 0
        if record.spec.case == 3 and not resuming:
            return {}
        return dict(record.optimizers.get(self._optimizer_key(record, bridge_run), {}).get(index, {}))

    async def _merge(self, record: RunRecord, action: Merge) -> None:
        try:
            path = await asyncio.to_thread(self._merge_and_save, record, action)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            log.exception("%s: merging round %d failed", record.run_id, action.round)
            record.machine.failed(f"merging round {action.round} failed: {exc}")
            return
        if path is not None:
            record.checkpoints.append(str(path))
            log.info("%s: round %d saved to %s", record.run_id, action.round, path)
        self._apply(record, record.machine.merged())

    def _uploaded(self, record: RunRecord, bridge_run: str, round: int) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
        """One pipeline's tensors at the end of ``round`` (every holder's upload, combined) and its optimizer state by partition."""
        from safetensors.torch import load_file

        from autograd_bridge.optim_state import split_optimizer_tensors

        pipeline = record.machine.pipelines[bridge_run]
        latest: dict[tuple[str, int], str] = {}
        for upload in self.state.list_uploads(bridge_run):
            if upload.header.round == round:
                latest[(upload.client_id, upload.header.partition)] = upload.path
        combined: dict[str, Any] = {}
        optimizer: dict[int, dict[str, Any]] = {}
        for client_id, partitions in pipeline.holders.items():
            for partition in partitions:
                path = latest.get((client_id, partition))
                if path is None:
                    raise ValueError(f"{client_id} reported its upload of partition {partition} but none arrived")
                weights, optimizer[partition] = split_optimizer_tensors(load_file(path))
                combined.update(weights)
        return combined, optimizer

    async def _snapshot(self, record: RunRecord, action: Snapshot) -> None:
        """Take the round-0 upload as the global state a server optimizer's first step starts from."""
        try:
            # The optimizer states of round 0 are empty (nothing has trained): keep the tensors.
            tensors, _ = await asyncio.to_thread(self._uploaded, record, action.bridge_run, action.round)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            log.exception("%s: reading the starting state failed", record.run_id)
            record.machine.failed(f"reading the starting state (round 0) of {action.bridge_run} failed: {exc}")
            return
        record.global_state = tensors
        log.info("%s: starting state taken from %s (%d tensors)", record.run_id, action.bridge_run, len(record.global_state))
        self._apply(record, record.machine.merged())

    def _reference(self, record: RunRecord, first: Mapping[str, Any]) -> Mapping[str, Any]:
        """The global state this turn's copies started from (what a server optimizer steps from)."""
        if set(record.global_state) == set(first):
            return record.global_state
        if record.spec.server_optimizer:
            # Without the starting state the pseudo-gradient would be measured from a trained copy.
            differ = sorted(set(first) ^ set(record.global_state))[:3]
            raise ValueError(
                f"{record.spec.aggregator} needs the state the copies started from, and it names other tensors "
                f"than the uploads (e.g. {differ}); start the run afresh so the holders upload it before round 1"
            )
        return first  # FedAvg only takes names and dtypes from the reference: any copy will do

    def _merge_and_save(self, record: RunRecord, action: Merge) -> Path | None:
        uploaded = {run: self._uploaded(record, run, action.round) for run in action.bridge_runs}
        copies = {run: weights for run, (weights, _) in uploaded.items()}
        for run, (_, optimizer) in uploaded.items():
            record.optimizers[self._optimizer_key(record, run)] = optimizer
        aggregator = aggregation_settings(record.spec).build()
        if record.aggregator_state:
            aggregator.load_state_dict(record.aggregator_state)  # resumes a server optimizer's moments
        first = copies[action.bridge_runs[0]]
        reference = self._reference(record, first)
        updates = [
            # All owners weigh the same when none reports samples (FedAvg needs some weight).
            ClientUpdate(state=copies[run], num_samples=max(action.weights.get(run, 0), 0) or 1, client_id=run)
            for run in action.bridge_runs
        ]
        record.global_state = aggregator.aggregate(reference, updates)
        record.aggregator_state = aggregator.state_dict()
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
            "aggregator": record.aggregator_state,
            "optimizers": {key: {str(i): state for i, state in parts.items()} for key, parts in record.optimizers.items()},
        }
        if record.spec.finetune == "lora":
            from peft import LoraConfig

            from autograd_bridge.lora import lora_target_modules

            spec = record.spec
            targets = list(spec.lora_targets) or lora_target_modules(config)
            peft_config = LoraConfig(
                r=spec.lora_r, lora_alpha=spec.lora_alpha, target_modules=targets,
                base_model_name_or_path=self.model_name, task_type="CAUSAL_LM",
            )
            return self.checkpoints.save_round(
                record.run_id, round, to_peft_names(record.global_state), config=peft_config,
                tokenizer=tokenizer, server_state=server_state, adapter=True,
            )
        return self.checkpoints.save_round(
            record.run_id, round, record.global_state, config=config, tokenizer=tokenizer, server_state=server_state
        )


def spec_and_resume(body: Mapping[str, Any]) -> tuple[RunSpec, str | None]:
    """The spec and the optional run to resume from a POST /v1/runs body."""
    spec = body.get("spec")
    if not isinstance(spec, dict):
        raise ValueError('send a JSON body {"spec": {...}, "resume": "<run id>" (optional)}')
    resume = body.get("resume")
    if resume is not None and (not isinstance(resume, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", resume)):
        raise ValueError("resume must be the id of a run with checkpoints, e.g. run-1")
    return spec_from_mapping(spec), resume
