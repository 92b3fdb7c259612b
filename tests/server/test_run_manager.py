"""The run manager over the real handler, state and weight store, with scripted clients instead of processes.

Two owners train a tiny Llama: alice's pipeline is cut in three (she holds the ends, a helper
the middle), carol holds the whole model in a pipeline of one stage. The scripted clients
answer each typed command as a daemon would: a round report for Train, codec-encoded uploads,
and they decode what LoadPartitions hands them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from autograd_bridge.codecs import get_codec
from autograd_bridge.models import tiny_config
from autograd_bridge.optim_state import split_optimizer_tensors
from autograd_bridge.partition import even_stage_specs, save_stage_weights, split_model
from proto.messages import (
    CommandState,
    DeviceProfile,
    Evaluation,
    LoadPartitions,
    PeerBytes,
    PrepareRun,
    RoundReport,
    StatusReport,
    StepRecord,
    Train,
    Upload,
    WeightHeader,
    file_sha256,
)
from server.control.handler import ControlHandler
from server.control.state import ClientRecord, ClientStatus, Deployment, PlanRow, StoredUpload
from server.training.checkpoints import CheckpointStore
from server.training.participation import build_participation
from server.training.rounds import Phase
from server.training.run_manager import RunManager
from server.training.spec import spec_from_mapping
from server.training.store import RunRecord

CODEC = get_codec("dense")
OWNERS = {"alice": 1.0, "carol": 3.0}  # how far each owner's training moves every tensor
SAMPLES = {"alice": 30, "carol": 10}  # their FedAvg weights


class Source:
    """The model the server plans for: only its config is needed here."""

    def __init__(self, config_json: str) -> None:
        self._config = config_json

    def config_json(self) -> str:
        return self._config

    def write_stage(self, *, index: int, num_stages: int, layer_start: int, layer_end: int, path: Path) -> None:
        raise AssertionError("the run manager never writes stages")


@dataclasses.dataclass
class Clients:
    """The scripted clients: what each holds, and everything they were sent."""

    handler: ControlHandler
    manager: RunManager
    folder: Path
    held: dict[tuple[str, int], dict[str, Tensor]]  # (bridge run, partition) -> its tensors now
    owner_of: dict[str, str]  # bridge run -> owner
    optimizer_state: bool = False  # uploads carry an optimizer entry per tensor
    report_round: bool = True  # Train answers carry a round report
    sent: list[tuple[str, Any]] = dataclasses.field(default_factory=list)
    loaded: dict[tuple[str, int, int], dict[str, Tensor]] = dataclasses.field(default_factory=dict)
    seen: set[int] = dataclasses.field(default_factory=set)

    def step(self) -> None:
        """Answer every command not answered yet."""
        for client_id in ("alice", "helper", "carol"):
            for command in self.handler.state.pending_commands(client_id):
                if command.command_id in self.seen:
                    continue
                self.seen.add(command.command_id)
                self.sent.append((client_id, command.body))
                round_report = self.answer(client_id, command.body)
                report = StatusReport(command_id=command.command_id, state=CommandState.DONE, round_report=round_report)
                self.manager.status_reported(client_id, report)

    def answer(self, client_id: str, body: Any) -> RoundReport | None:
        if isinstance(body, Train):
            if not self.report_round:
                return None
            steps = tuple(
                StepRecord(loss=2.0 - 0.1 * i, tokens=16, seconds=0.01, peers=(PeerBytes(stage=1, sent=100, received=50),))
                for i in range(body.steps)
            )
            return RoundReport(round=body.round, steps=steps, evaluation=Evaluation(loss=1.0, perplexity=2.7, tokens=32),
                               samples=body.steps * body.batch_size, data_samples=SAMPLES[client_id])  # fmt: skip
        if isinstance(body, Upload):
            shift = OWNERS[self.owner_of[body.run_id]] if body.round else 0.0
            for partition in body.partitions:
                tensors = {n: t + shift for n, t in self.held[(body.run_id, partition)].items()}
                if self.optimizer_state:
                    tensors.update({f"optimizer/exp_avg/{n}": torch.full_like(t, body.round) for n, t in tensors.items()})
                self.upload(client_id, body, partition, tensors)
        if isinstance(body, LoadPartitions):
            for assignment in body.partitions:
                stored = self.handler.weights.get(body.run_id, assignment.index, client_id=client_id)
                assert stored.sha256 == assignment.weights_sha256 and stored.size == assignment.weights_bytes
                tensors = CODEC.decode(stored.path.read_bytes())
                self.loaded[(body.run_id, assignment.index, body.round)] = tensors
                weights, _ = split_optimizer_tensors(tensors)
                self.held[(body.run_id, assignment.index)] = weights
        return None

    def upload(self, client_id: str, body: Upload, partition: int, tensors: Mapping[str, Tensor]) -> None:
        path = self.folder / f"{body.run_id}-p{partition}-r{body.round}.bin"
        path.write_bytes(CODEC.encode(tensors))
        header = WeightHeader(run_id=body.run_id, partition=partition, total_bytes=path.stat().st_size,
                              sha256=file_sha256(path), round=body.round)  # fmt: skip
        # The server asked for exactly this upload, and its size fits what it expects of the partition.
        expected = self.handler.expected_upload(client_id, body.run_id, partition, body.round)
        assert expected is not None and header.total_bytes <= expected
        self.handler.state.add_upload(StoredUpload(client_id=client_id, header=header, path=str(path)))


@pytest.fixture(scope="module")
def model() -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama"))


def deploy(handler: ControlHandler, model: Any, folder: Path) -> dict[tuple[str, int], dict[str, Tensor]]:
    """A connected plan: alice's pipeline in three stages (helper in the middle), carol's in one."""
    layers = int(model.config.num_hidden_layers)
    rows, held = [], {}
    for pipeline, (owner, stages) in enumerate((("alice", 3), ("carol", 1))):
        run_id = f"plan-1-p{pipeline}"
        for stage in split_model(model, even_stage_specs(layers, stages)):
            index = stage.spec.index
            client = "helper" if stages == 3 and index == 1 else owner
            path = folder / f"{run_id}-{index}.safetensors"
            save_stage_weights(stage, path)
            stored = handler.weights.add(run_id, index, path, clients=[client])
            held[(run_id, index)] = {n: t.detach().clone() for n, t in stage.model_state().items()}
            rows.append(PlanRow(pipeline=pipeline, owner_id=owner, run_id=run_id, partition=index,
                                layer_start=stage.spec.layer_start, layer_end=stage.spec.layer_end, params=1,
                                client_id=client, est_compute_s=0.0, est_transfer_s=0.0, why="test",
                                weights_sha256=stored.sha256, weights_bytes=stored.size))  # fmt: skip
    deployment = Deployment(generation=1, plan_id="plan-1", created_at=0.0, rows=tuple(rows), owners=("alice", "carol"),
                            clients=("alice", "carol", "helper"), state="connected")  # fmt: skip
    handler.state.set_deployment(deployment)
    return held


async def run(handler: ControlHandler, model: Any, tmp_path: Path, values: dict[str, Any], **script: Any) -> tuple[RunRecord, Clients]:
    """Start a run of ``values`` over the plan and answer its commands until it ends."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(model.config.to_json_string())
    held = deploy(handler, model, tmp_path)
    manager = RunManager(handler, model=Source(model.config.to_json_string()), model_name=str(tmp_path / "model"),
                         stages=None, checkpoints=CheckpointStore(tmp_path / "checkpoints"))  # fmt: skip
    clients = Clients(handler=handler, manager=manager, folder=tmp_path, held=held,
                      owner_of={"plan-1-p0": "alice", "plan-1-p1": "carol"}, **script)  # fmt: skip
    record = manager.start(spec_from_mapping(values))
    try:
        for _ in range(600):
            clients.step()
            if not record.machine.active:
                break
            await asyncio.sleep(0.05)
    finally:
        await manager.close()
    return record, clients


async def test_a_one_stage_and_a_three_stage_pipeline_train_in_parallel(handler: ControlHandler, model: Any, tmp_path: Path) -> None:
    """Typed commands go out, reports are recorded, the copies merge by whole-model name, and every byte is counted."""
    record, clients = await run(handler, model, tmp_path, {"case": 3, "rounds": 2, "steps_per_round": 2})
    assert record.machine.phase == Phase.DONE, record.machine.error
    prepares = [body for _, body in clients.sent if isinstance(body, PrepareRun)]
    assert len(prepares) == 3 and all((p.finetune, p.codec.name, p.optimizer) == ("full", "dense", "adamw") for p in prepares)
    trains = sorted((b.run_id, b.round, b.steps, b.start) for _, b in clients.sent if isinstance(b, Train))
    assert trains == [("plan-1-p0", 1, 2, 0), ("plan-1-p0", 2, 2, 2), ("plan-1-p1", 1, 2, 0), ("plan-1-p1", 2, 2, 2)]
    history = record.machine.history
    assert [(h["round"], h["owner"]) for h in history] == [(1, "alice"), (1, "carol"), (2, "alice"), (2, "carol")]
    assert history[0]["losses"] == [2.0, 1.9] and history[0]["bytes_sent"] == {"1": 200}
    # Round 1 merges base + 1 (weight 30) with base + 3 (weight 10) into base + 1.5; every
    # partition of both pipelines loads its share of it: carol's one partition all of it.
    base = {n: t.detach() for n, t in model.state_dict().items()}
    carol = clients.loaded[("plan-1-p1", 0, 2)]
    assert set(carol) == {n for n in clients.held[("plan-1-p1", 0)]}
    name = "model.layers.2.mlp.up_proj.weight"
    torch.testing.assert_close(carol[name], base[name] + 1.5)
    assert name in clients.loaded[("plan-1-p0", 1, 2)] and name not in clients.loaded[("plan-1-p0", 0, 2)]
    torch.testing.assert_close(record.global_state[name], base[name] + 3.0)
    assert len(record.checkpoints) == 2
    # Uploads and LoadPartitions files are counted per round and client, at their encoded size.
    traffic = {(r["round"], r["client"]): (r["uploaded"], r["downloaded"]) for r in record.traffic_json()}
    assert set(traffic) == {(1, "alice"), (1, "helper"), (1, "carol"), (2, "alice"), (2, "helper"), (2, "carol")}
    uploaded = sum((tmp_path / f"plan-1-p1-p0-r{r}.bin").stat().st_size for r in (1, 2))
    assert traffic[(1, "carol")][0] + traffic[(2, "carol")][0] == uploaded
    assert traffic[(1, "carol")][1] == 0 and traffic[(2, "carol")][1] > 0
    assert record.to_json()["traffic"] == record.traffic_json()


async def test_the_optimizer_state_follows_the_model_across_differently_cut_pipelines(
    handler: ControlHandler, model: Any, tmp_path: Path
) -> None:
    """Owners in turn: carol's one stage loads the AdamW state alice's three stages uploaded, entry by entry."""
    record, clients = await run(handler, model, tmp_path, {"case": 2, "rounds": 1, "steps_per_round": 1},
                                optimizer_state=True)  # fmt: skip
    assert record.machine.phase == Phase.DONE, record.machine.error
    weights, state = split_optimizer_tensors(clients.loaded[("plan-1-p1", 0, 1)])
    assert state and set(state) == {f"optimizer/exp_avg/{n}" for n in weights}
    assert all(float(t.flatten()[0]) == 1.0 for t in state.values())  # alice's round-1 state


async def test_a_train_answer_without_a_round_report_fails_the_run(handler: ControlHandler, model: Any, tmp_path: Path) -> None:
    """A client that finishes Train without a RoundReport fails the run with a reason naming the fix."""
    record, _ = await run(handler, model, tmp_path, {"case": 3, "rounds": 1, "steps_per_round": 1}, report_round=False)
    assert record.machine.phase == Phase.FAILED
    assert "without a round report" in record.machine.error and "plan-1-p" in record.machine.error


async def test_a_round_report_with_other_steps_than_asked_fails_the_run(handler: ControlHandler, model: Any, tmp_path: Path) -> None:
    """The local work checks the report: 3 steps asked, 2 reported, and the run fails saying so."""
    original = Clients.answer

    def short(self: Clients, client_id: str, body: Any) -> RoundReport | None:
        report = original(self, client_id, body)
        return dataclasses.replace(report, steps=report.steps[:-1]) if report is not None else None

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Clients, "answer", short)
        record, _ = await run(handler, model, tmp_path, {"case": 1, "owners": ["carol"], "rounds": 1, "steps_per_round": 3})
    assert record.machine.phase == Phase.FAILED and "2 step(s), 3 were asked" in record.machine.error


async def test_sampled_owners_train_alone_and_the_one_that_sat_out_loads_first(
    handler: ControlHandler, model: Any, tmp_path: Path
) -> None:
    """Half of two owners a round: only the drawn owner trains, uploads and is in the history; the other loads the global
    state before its next round, and each merge is the one copy that trained."""
    values = {"participation": {"mode": "sampled", "fraction": 0.5}, "rounds": 3, "steps_per_round": 1, "seed": 0}
    mode = build_participation(spec_from_mapping(values).participation, seed=0)
    drawn = [mode.turns(r, ["plan-1-p0", "plan-1-p1"]) for r in (1, 2, 3)]
    assert drawn == [[("plan-1-p0",)], [("plan-1-p1",)], [("plan-1-p0",)]]
    record, clients = await run(handler, model, tmp_path, values)
    assert record.machine.phase == Phase.DONE, record.machine.error
    trains = [(b.run_id, b.round) for _, b in clients.sent if isinstance(b, Train)]
    assert trains == [("plan-1-p0", 1), ("plan-1-p1", 2), ("plan-1-p0", 3)]
    uploads = {(b.run_id, b.round) for _, b in clients.sent if isinstance(b, Upload)}
    assert uploads == {("plan-1-p0", 1), ("plan-1-p1", 2), ("plan-1-p0", 3)}
    assert [(h["round"], h["owner"]) for h in record.machine.history] == [(1, "alice"), (2, "carol"), (3, "alice")]
    # Carol sat round 1 out and alice round 2: each loads before training again; alice, who merged alone, never
    # loads between rounds 1 and 2.
    assert {(run, round) for run, _, round in clients.loaded} == {("plan-1-p1", 2), ("plan-1-p0", 3)}
    base = {n: t.detach() for n, t in model.state_dict().items()}
    name = "model.layers.2.mlp.up_proj.weight"
    torch.testing.assert_close(clients.loaded[("plan-1-p1", 0, 2)][name], base[name] + 1.0)  # alice's round 1
    torch.testing.assert_close(record.global_state[name], base[name] + 1.0 + 3.0 + 1.0)
    traffic = {(r["round"], r["client"]) for r in record.traffic_json()}
    assert traffic == {(1, "alice"), (1, "helper"), (2, "carol"), (3, "alice"), (3, "helper")}
    assert len(record.checkpoints) == 3


def declare(handler: ControlHandler, limits: Mapping[str, int]) -> None:
    """Register the three clients with profiles: plenty of memory, 1 GFLOP/s, and the declared micro-batch limits."""
    for client_id in ("alice", "carol", "helper"):
        profile = DeviceProfile(flops_per_s=1e9, memory_bytes=1 << 34, max_micro_batch=limits.get(client_id, 0))
        handler.state.put_client(ClientRecord(client_id=client_id, status=ClientStatus.READY, session_digest=client_id,
                                              profile=profile))  # fmt: skip


async def test_samples_without_accumulation_size_steps_by_the_declared_limits(
    handler: ControlHandler, model: Any, tmp_path: Path
) -> None:
    """2b: alice (limit 2) and carol (limit 4) train the same 8 sequences in 4 and 2 steps; equal samples, equal weights."""
    declare(handler, {"alice": 2, "carol": 4})
    values = {"case": 3, "rounds": 2, "local_work": {"mode": "samples", "samples": 8, "accumulate": False}}
    record, clients = await run(handler, model, tmp_path, values)
    assert record.machine.phase == Phase.DONE, record.machine.error
    trains = sorted((b.run_id, b.round, b.steps, b.start, b.batch_size) for _, b in clients.sent if isinstance(b, Train))
    assert trains == [("plan-1-p0", 1, 4, 0, 2), ("plan-1-p0", 2, 4, 4, 2), ("plan-1-p1", 1, 2, 0, 4), ("plan-1-p1", 2, 2, 2, 4)]
    assert {h["weight"] for h in record.machine.history} == {8}
    # Equal weights: round 1 merges base + 1 and base + 3 into base + 2 (FedAvg by data held would give base + 1.5).
    name = "model.layers.2.mlp.up_proj.weight"
    base = model.state_dict()[name].detach()
    torch.testing.assert_close(clients.loaded[("plan-1-p1", 0, 2)][name], base + 2.0)


async def test_a_time_budget_goes_out_and_copies_weigh_by_the_samples_they_trained(
    handler: ControlHandler, model: Any, tmp_path: Path
) -> None:
    """Every owner gets the round's budget; alice stops after 3 steps and carol after 1, so the merge weighs them 3:1."""
    declare(handler, {"alice": 4, "carol": 4})
    original = Clients.answer
    done = {"alice": 3, "carol": 1}

    def on_time(self: Clients, client_id: str, body: Any) -> RoundReport | None:
        report = original(self, client_id, body)
        if report is None or not isinstance(body, Train):
            return report
        steps = report.steps[: done[client_id]]
        return dataclasses.replace(report, steps=steps, samples=len(steps) * body.batch_size, seconds=0.5)

    values = {"case": 3, "rounds": 2, "local_work": {"mode": "time", "steps": 4, "batch": "device"}}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Clients, "answer", on_time)
        record, clients = await run(handler, model, tmp_path, values)
    assert record.machine.phase == Phase.DONE, record.machine.error
    trains = sorted((b.run_id, b.round, b.start, b.batch_size, b.time_budget_s) for _, b in clients.sent if isinstance(b, Train))
    first, second = trains[0][4], trains[1][4]
    assert first > 0 and {t[4] for t in trains if t[1] == 1} == {first}  # one budget per round, from the profiles
    # Round 2: steps x the measured 0.01 s per step plus each owner's evaluation (0.5 s less its steps), averaged.
    assert second == pytest.approx(((4 * 0.01 + 0.5 - 0.03) + (4 * 0.01 + 0.5 - 0.01)) / 2)
    assert [(t[0], t[1], t[2], t[3]) for t in trains] == [("plan-1-p0", 1, 0, 4), ("plan-1-p0", 2, 3, 4),
                                                          ("plan-1-p1", 1, 0, 4), ("plan-1-p1", 2, 1, 4)]  # fmt: skip
    name = "model.layers.2.mlp.up_proj.weight"
    base = model.state_dict()[name].detach()
    torch.testing.assert_close(clients.loaded[("plan-1-p1", 0, 2)][name], base + (3 * 1.0 + 1 * 3.0) / 4)


async def test_each_device_has_idle_figures_once_its_turn_trained(handler: ControlHandler, model: Any, tmp_path: Path) -> None:
    """Every history entry carries its pipeline's devices' busy, bubble and waiting ratios, which add up to one."""
    record, _ = await run(handler, model, tmp_path, {"case": 3, "rounds": 2, "steps_per_round": 2})
    assert record.machine.phase == Phase.DONE, record.machine.error
    devices = {h["owner"]: set(h["idle"]) for h in record.machine.history}
    assert devices == {"alice": {"alice", "helper"}, "carol": {"carol"}}
    for h in record.machine.history:
        for figures in h["idle"].values():
            assert figures["busy"] + figures["bubble"] + figures["wait"] == pytest.approx(1.0)
            assert h["idle_ratio"][next(iter(h["idle"]))] >= 0.0
    # per_round: every device's figures, round by round.
    per_round = record.to_json()["per_round"]
    assert [sorted(r["idle"]) for r in per_round] == [["alice", "carol", "helper"]] * 2
