"""Per-owner pipelines: owners that train the whole model alone beside owners that split with helpers."""

from __future__ import annotations

import itertools
import json

import pytest

from autograd_bridge.profile import ModelProfile
from server.planning.model_source import summary_of
from server.planning.planner import (
    ClientProfile,
    InsufficientMemoryError,
    PartitionPlan,
    PlannerSettings,
    plan_partitions,
)

from .test_planner import client, tiny_llama

SETTINGS = PlannerSettings(batch_tokens=1024, micro_batches=8)
FAST_LINK = {"up_mb": 1000.0, "down_mb": 1000.0}


@pytest.fixture(scope="module")
def llama6() -> ModelProfile:
    return tiny_llama(6)


def big_and_small() -> list[ClientProfile]:
    """A fast owner that holds the whole model, one too small for it, and four helpers."""
    return [
        client("big", gflops=200),
        client("small", gflops=50, memory=40e6),
        *[client(f"h{i}") for i in range(4)],
    ]


def assert_pipelines_consistent(plan: PartitionPlan, num_layers: int) -> None:
    """Each pipeline holds stages 0..K-1 covering every block in order, its ends on its owner, its middle on helpers."""
    owners = set(plan.owners)
    for index, owner in enumerate(plan.owners):
        rows = plan.pipeline(index)
        cut = plan.cuts[index]
        assert (cut.pipeline, cut.owner_id, cut.num_stages) == (index, owner, len(rows))
        assert [row.stage for row in rows] == list(range(cut.num_stages))
        assert [row.blocks for row in rows] == list(cut.block_counts)
        assert rows[0].layer_start == 0 and rows[-1].layer_end == num_layers
        assert all(a.layer_end == b.layer_start for a, b in itertools.pairwise(rows))
        assert rows[0].client_id == rows[-1].client_id == owner and rows[0].pinned and rows[-1].pinned
        assert all(not row.pinned and row.client_id not in owners for row in rows[1:-1])
        assert all(row.owner_id == owner for row in rows)


def test_big_fast_owner_trains_alone_and_small_owner_splits(llama6: ModelProfile) -> None:
    """The owner that holds the model gets one stage; the one that cannot gets a split with helpers."""
    plan = plan_partitions(llama6, big_and_small(), owners=["big", "small"], settings=SETTINGS)
    assert_pipelines_consistent(plan, 6)
    big, small = plan.cuts
    assert big.num_stages == 1 and big.block_counts == (6,)
    assert small.num_stages >= 3 and plan.stage_counts == (1, small.num_stages)
    assert (plan.num_stages, plan.block_counts) == (small.num_stages, small.block_counts)
    assert {row.client_id for row in plan.pipeline(0)} == {"big"}
    assert {row.client_id for row in plan.pipeline(1)[1:-1]} <= {"h0", "h1", "h2", "h3"}
    assert plan.solver in ("cvxpy", "matching") and plan.objective > 0


def test_reasons_say_why_each_owner_trains_alone_or_split(llama6: ModelProfile) -> None:
    """The alone owner's reason compares the memory and both estimates; the split owner's names its memory."""
    plan = plan_partitions(llama6, big_and_small(), owners=["big", "small"], settings=SETTINGS)
    big, small = plan.cuts
    assert big.alone_s is not None and big.split_s is not None and big.alone_s <= big.split_s
    assert big.why.startswith("big holds the whole model (111 MB fits 8.59 GB) and alone is at least as fast")
    assert f"est. {big.alone_s:.3g} s/step alone vs {big.split_s:.3g} s/step split" in big.why
    assert small.alone_s is None and small.split_s is not None
    assert small.why.startswith("small cannot hold the whole model (111 MB > 40 MB)")
    assert big.why in plan.pipeline(0)[0].why and small.why in plan.pipeline(1)[0].why


def test_estimates_cover_both_kinds_of_pipeline(llama6: ModelProfile) -> None:
    """The cut estimates are the slowest pipeline's; the alone pipeline's row is its whole step."""
    plan = plan_partitions(llama6, big_and_small(), owners=["big", "small"], settings=SETTINGS)
    big, small = plan.cuts
    assert plan.cut_step_s == pytest.approx(max(big.alone_s or 0.0, small.split_s or 0.0))
    (row,) = plan.pipeline(0)
    assert row.step_s == pytest.approx(big.alone_s) and plan.step_s >= row.step_s


def test_owner_faster_split_splits_even_when_it_holds_the_model(llama6: ModelProfile) -> None:
    """A slow owner that fits still splits when fast helpers make it faster; a fast one stays alone."""
    clients = [
        client("fast", gflops=200),
        client("slow", gflops=10),
        *[client(f"h{i}", gflops=1000, **FAST_LINK) for i in range(4)],
    ]
    plan = plan_partitions(llama6, clients, owners=["fast", "slow"], settings=SETTINGS)
    assert_pipelines_consistent(plan, 6)
    fast, slow = plan.cuts
    assert fast.num_stages == 1 and slow.num_stages >= 3
    assert slow.alone_s is not None and slow.split_s is not None and slow.split_s < slow.alone_s
    assert slow.why.startswith("slow is faster split: est.") and f"vs {slow.alone_s:.3g} s/step alone" in slow.why


def test_scarce_helpers_go_to_one_owner_and_the_other_trains_alone(llama6: ModelProfile) -> None:
    """Two owners and one helper slot: both cannot split, so one trains alone and leaves the helper to the other."""
    clients = [client("a", gflops=10), client("b", gflops=10), client("h", gflops=1000, **FAST_LINK)]
    plan = plan_partitions(llama6, clients, owners=["a", "b"], settings=SETTINGS)
    assert_pipelines_consistent(plan, 6)
    assert plan.stage_counts == (1, 3) and plan.pipeline(1)[1].client_id == "h"
    assert "no split with helpers is feasible for all 2 pipelines weighed" in plan.cuts[0].why
    assert plan.cuts[0].split_s is None and plan.cuts[1].why.startswith("b is faster split")


def test_every_owner_alone_when_splitting_is_slower(llama6: ModelProfile) -> None:
    """Fast owners and slow helpers: every pipeline is one stage and no helper is used."""
    clients = [client("a", gflops=100), client("b", gflops=200), *[client(f"h{i}", gflops=1) for i in range(4)]]
    plan = plan_partitions(llama6, clients, owners=["a", "b"], settings=SETTINGS)
    assert plan.stage_counts == (1, 1) and plan.num_stages == 1 and plan.solver == "none"
    assert all("alone is at least as fast" in cut.why for cut in plan.cuts)


def test_fixed_stages_cut_every_pipeline_alike(llama6: ModelProfile) -> None:
    """With num_stages set, the owner that could train alone gets the same K as the one that cannot."""
    settings = PlannerSettings(batch_tokens=1024, micro_batches=8, num_stages=4)
    plan = plan_partitions(llama6, big_and_small(), owners=["big", "small"], settings=settings)
    assert_pipelines_consistent(plan, 6)
    assert plan.stage_counts == (4, 4) and plan.cuts[0].block_counts == plan.cuts[1].block_counts
    assert all(cut.why == "num_stages=4 is set: every pipeline has 4 stage(s)" for cut in plan.cuts)
    assert all(cut.alone_s is None and cut.split_s is None for cut in plan.cuts)
    with pytest.raises(InsufficientMemoryError, match="set num_stages >= 3"):
        plan_partitions(
            llama6, big_and_small(), owners=["big", "small"], settings=PlannerSettings(batch_tokens=1024, num_stages=1)
        )


def test_mixed_plan_survives_json_and_reads_as_a_table(llama6: ModelProfile) -> None:
    """The plan round-trips through JSON; its table's first line gives each pipeline's cut."""
    plan = plan_partitions(llama6, big_and_small(), owners=["big", "small"], settings=SETTINGS)
    assert PartitionPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    lines = plan.table().splitlines()
    counts = list(plan.cuts[1].block_counts)
    assert lines[0].startswith(f"llama-6: 2 pipeline(s) cut differently, blocks per stage: p0 big [6], p1 small {counts}")
    assert len(lines) == 2 + 1 + len(counts)


def test_from_json_refuses_a_pipeline_cut_neither_way(llama6: ModelProfile) -> None:
    """A pipeline must be cut as block_counts or hold the whole model; its rows must follow its cut."""
    data = plan_partitions(llama6, big_and_small(), owners=["big", "small"], settings=SETTINGS).to_json()
    odd = {**data["cuts"][0], "block_counts": [3, 3]}
    with pytest.raises(ValueError, match="must be cut"):
        PartitionPlan.from_json({**data, "cuts": [odd, data["cuts"][1]]})
    whole = {**data["cuts"][1], "block_counts": [6]}
    with pytest.raises(ValueError, match="does not hold stages"):
        PartitionPlan.from_json({**data, "cuts": [data["cuts"][0], whole]})
    with pytest.raises(ValueError, match="cuts must name"):
        PartitionPlan.from_json({**data, "cuts": data["cuts"][::-1]})


def test_summary_gives_each_owner_its_stage_count(llama6: ModelProfile) -> None:
    """The admin summary keeps num_stages (the widest cut) and adds each owner's stages."""
    plan = plan_partitions(llama6, big_and_small(), owners=["big", "small"], settings=SETTINGS)
    summary = summary_of(plan)
    assert summary["stages"] == {"big": 1, "small": plan.num_stages}
    assert summary["num_stages"] == plan.num_stages and summary["block_counts"] == list(plan.block_counts)
