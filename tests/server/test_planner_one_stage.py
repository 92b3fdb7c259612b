"""One-stage pipelines: a data owner that holds the whole model, with or without helpers."""

from __future__ import annotations

import json

import pytest

from autograd_bridge.partition import StageSpec
from autograd_bridge.profile import ModelProfile
from server.config import ModelSettings, PlanningSettings
from server.planning.model_source import planner_settings
from server.planning.planner import (
    InsufficientMemoryError,
    NotEnoughClientsError,
    PartitionPlan,
    PlannerSettings,
    plan_partitions,
)

from .test_planner import client, tiny_llama


@pytest.fixture(scope="module")
def llama6() -> ModelProfile:
    return tiny_llama(6)


def assert_owners_hold_everything(plan: PartitionPlan, num_layers: int) -> None:
    """Every pipeline is one pinned partition 0 of every block, on its own owner."""
    assert plan.num_stages == 1 and plan.block_counts == (num_layers,)
    assert plan.specs() == [StageSpec(index=0, num_stages=1, layer_start=0, layer_end=num_layers)]
    assert [(row.pipeline, row.stage, row.client_id) for row in plan.assignments] == [
        (p, 0, owner) for p, owner in enumerate(plan.owners)
    ]
    assert all(row.pinned and row.client_id == row.owner_id for row in plan.assignments)
    assert plan.solver == "none" and plan.objective == 0.0


def test_owner_without_helpers_holds_the_whole_model(llama6: ModelProfile) -> None:
    """An owner alone plans one stage of every block, pinned to it."""
    plan = plan_partitions(llama6, [client("owner")], owners=["owner"])
    assert_owners_hold_everything(plan, 6)
    (row,) = plan.assignments
    assert "the whole model" in row.why
    assert plan.step_s == pytest.approx(row.step_s) and plan.bottleneck_s == pytest.approx(row.step_s)


def test_several_owners_without_helpers_each_hold_the_whole_model(llama6: ModelProfile) -> None:
    """With no helper every owner drives its own one-stage pipeline."""
    plan = plan_partitions(llama6, [client("a"), client("b", gflops=20), client("c")], owners=["a", "b", "c"])
    assert_owners_hold_everything(plan, 6)
    assert plan.bottleneck_s == pytest.approx(max(row.step_s for row in plan.assignments))


def test_forced_one_stage_ignores_fast_helpers(llama6: ModelProfile) -> None:
    """``num_stages=1`` keeps the model on the owner even when helpers would be faster."""
    clients = [client("owner", gflops=10), *[client(f"h{i}", gflops=1000, up_mb=1000, down_mb=1000) for i in range(4)]]
    settings = PlannerSettings(num_stages=1, micro_batches=8)
    plan = plan_partitions(llama6, clients, owners=["owner"], settings=settings)
    assert_owners_hold_everything(plan, 6)
    assert plan_partitions(llama6, clients, owners=["owner"], settings=PlannerSettings(micro_batches=8)).num_stages > 2


def test_automatic_stages_pick_one_when_helpers_are_much_slower(llama6: ModelProfile) -> None:
    """Helpers a hundred times slower than the owner get nothing, even with micro-batches to overlap."""
    clients = [client("owner", gflops=100), *[client(f"h{i}", gflops=1) for i in range(4)]]
    plan = plan_partitions(llama6, clients, owners=["owner"], settings=PlannerSettings(micro_batches=8))
    assert_owners_hold_everything(plan, 6)


def test_one_stage_costs_what_two_stages_on_the_owner_cost(llama6: ModelProfile) -> None:
    """Both keep every block on the owner, so their estimates agree and the fewer stages win."""
    clients = [client("owner")]
    one = plan_partitions(llama6, clients, owners=["owner"], settings=PlannerSettings(num_stages=1))
    two = plan_partitions(llama6, clients, owners=["owner"], settings=PlannerSettings(num_stages=2))
    assert two.num_stages == 2 and {row.client_id for row in two.assignments} == {"owner"}
    assert one.cut_step_s == pytest.approx(two.cut_step_s) and one.step_s == pytest.approx(two.step_s)
    assert plan_partitions(llama6, clients, owners=["owner"]).num_stages == 1


def test_owner_too_small_for_the_model_gets_helpers(llama6: ModelProfile) -> None:
    """When the owner cannot hold every block, the automatic plan cuts the model for helpers instead."""
    settings = PlannerSettings(batch_tokens=1024)
    small_owner = client("owner", memory=40e6)
    plan = plan_partitions(llama6, [small_owner, client("a"), client("b")], owners=["owner"], settings=settings)
    assert plan.num_stages >= 3


def test_forced_one_stage_too_big_for_the_owner_says_what_to_change(llama6: ModelProfile) -> None:
    """One stage that does not fit names the owner's memory and how to unfix the stage count."""
    small_owner = client("owner", memory=30e6)
    settings = PlannerSettings(num_stages=1, batch_tokens=1024)
    with pytest.raises(InsufficientMemoryError, match="set num_stages >= 3"):
        plan_partitions(llama6, [small_owner, client("a")], owners=["owner"], settings=settings)
    with pytest.raises(NotEnoughClientsError, match="leave it unset"):
        plan_partitions(llama6, [small_owner], owners=["owner"], settings=settings)


def test_one_stage_plan_survives_json_and_reads_as_a_table(llama6: ModelProfile) -> None:
    """The plan round-trips through JSON; its table has one row for the whole model."""
    plan = plan_partitions(llama6, [client("owner"), client("h", gflops=1)], owners=["owner"])
    assert PartitionPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    lines = plan.table().splitlines()
    assert lines[0].startswith("llama-6: 1 stage(s) x 1 pipeline(s), blocks [6]")
    assert len(lines) == 3 and "0-6" in lines[2] and "owner" in lines[2] and "the whole model" in lines[2]


@pytest.mark.parametrize("bad", [0, -1, True, 1.0])
def test_num_stages_below_one_is_refused(bad: object) -> None:
    """Zero stages, negative counts and non-integers are refused with the valid choices."""
    with pytest.raises(ValueError, match="integer >= 1"):
        PlannerSettings(num_stages=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[model\] stages must be an integer >= 1"):
        ModelSettings(path="m", stages=bad)  # type: ignore[arg-type]


def test_server_stages_one_reaches_the_planner() -> None:
    """``[model] stages = 1`` is a valid server setting and becomes the planner's num_stages."""
    model = ModelSettings(path="m", stages=1)
    assert planner_settings(model, PlanningSettings()).num_stages == 1
