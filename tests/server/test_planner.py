"""The planner: cost model, exact cut search, LP vs matching, pinning, errors, JSON."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import pytest
from transformers import LlamaConfig

from autograd_bridge.partition import stage_specs_from_counts
from autograd_bridge.profile import ModelProfile, profile_model, profile_partitions
from server.planning.planner import (
    AssignmentInfeasibleError,
    ClientProfile,
    ClientsTooSlowError,
    Infeasible,
    InsufficientMemoryError,
    NotEnoughClientsError,
    PartitionPlan,
    PlannerSettings,
    PlanningError,
    Slots,
    assignment_problem,
    cost_terms,
    hall_violation,
    plan_partitions,
    solve,
    solve_lp,
    solve_matching,
    stage_demands,
)

GFLOP = 1e9
MB = 1e6
GIB = 2**30


def tiny_llama(layers: int) -> ModelProfile:
    """A real Llama profile (measured on the meta device), small enough for exhaustive checks."""
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=2048,
    )
    return profile_model(config, seq_len=64, name=f"llama-{layers}")


@pytest.fixture(scope="module")
def llama6() -> ModelProfile:
    return tiny_llama(6)


@pytest.fixture(scope="module")
def llama16() -> ModelProfile:
    return tiny_llama(16)


def client(
    name: str,
    *,
    gflops: float = 100.0,
    memory: float = 8 * GIB,
    up_mb: float = 100.0,
    down_mb: float = 100.0,
    rtt: float = 0.001,
    capacity: int = 1,
) -> ClientProfile:
    return ClientProfile(
        client_id=name,
        flops_per_s=gflops * GFLOP,
        memory_bytes=int(memory),
        upload_bytes_per_s=up_mb * MB,
        download_bytes_per_s=down_mb * MB,
        rtt_s=rtt,
        capacity=capacity,
    )


def random_clients(rng: np.random.Generator, count: int, *, prefix: str = "c") -> list[ClientProfile]:
    """Heterogeneous devices: FLOP/s, links and latency spread over orders of magnitude."""
    return [
        ClientProfile(
            client_id=f"{prefix}{i}",
            flops_per_s=float(10 ** rng.uniform(9.5, 12.5)),
            memory_bytes=int(10 ** rng.uniform(7.0, 9.5)),
            upload_bytes_per_s=float(10 ** rng.uniform(5.5, 8.5)),
            download_bytes_per_s=float(10 ** rng.uniform(6.0, 9.0)),
            rtt_s=float(rng.uniform(0.0, 0.1)),
            capacity=int(rng.integers(1, 4)),
        )
        for i in range(count)
    ]


def random_counts(rng: np.random.Generator, blocks: int, middle: int) -> list[int]:
    """A random cut: owner stages with 0-2 blocks, ``middle`` stages with at least one each."""
    spare = min(2, (blocks - middle) // 2)
    first, last = (int(v) for v in rng.integers(0, spare + 1, size=2))
    rest = blocks - first - last
    cuts = np.sort(rng.choice(np.arange(1, rest), size=middle - 1, replace=False))
    middle_counts = np.diff(np.concatenate([[0], cuts, [rest]]))
    return [first, *middle_counts.tolist(), last]


def random_problem(model: ModelProfile, seed: int, *, num_clients: int, pipelines: int, middle: int):
    """An assignment problem of the planner's own cost model on random clients and a random cut."""
    rng = np.random.default_rng(seed)
    settings = PlannerSettings(batch_tokens=int(rng.integers(256, 4096)), steps_per_round=int(rng.integers(1, 8)))
    counts = random_counts(rng, model.num_layers, middle)
    demands = stage_demands(profile_partitions(model, stage_specs_from_counts(counts)), settings)
    helpers = random_clients(rng, num_clients)
    return assignment_problem(demands, pipelines, helpers, settings)


def check_assignment(client_of_row: np.ndarray, eligible: np.ndarray, capacity: np.ndarray) -> None:
    rows = np.arange(eligible.shape[0])
    assert eligible[rows, client_of_row].all()
    assert (np.bincount(client_of_row, minlength=capacity.size) <= capacity).all()


# ------------------------------------------------------------------------ the solvers

SIZES = [(6, 1, 3), (40, 2, 6), (120, 4, 8), (400, 4, 12)]  # (clients, pipelines, middle stages)


@pytest.mark.parametrize("seed", range(6))
def test_lp_is_integral_on_random_instances(llama16: ModelProfile, seed: int) -> None:
    """HiGHS returns a 0/1 solution of the relaxation that respects eligibility and capacity."""
    problem = random_problem(llama16, seed, num_clients=60, pipelines=3, middle=5)
    solution = solve_lp(problem.cost, problem.eligible, problem.capacity)
    assert solution.integral and solution.max_fractional < 1e-6
    check_assignment(solution.client_of_row, problem.eligible, problem.capacity)


@pytest.mark.parametrize(("num_clients", "pipelines", "middle"), SIZES)
@pytest.mark.parametrize("seed", range(3))
def test_lp_and_matching_find_the_same_optimum(
    llama16: ModelProfile, num_clients: int, pipelines: int, middle: int, seed: int
) -> None:
    """cvxpy and linear_sum_assignment agree on the optimal total cost to 1e-6."""
    problem = random_problem(llama16, 100 * seed + num_clients, num_clients=num_clients, pipelines=pipelines, middle=middle)
    lp = solve_lp(problem.cost, problem.eligible, problem.capacity)
    matching = solve_matching(problem.cost, problem.eligible, problem.capacity)
    check_assignment(matching.client_of_row, problem.eligible, problem.capacity)
    assert lp.objective == pytest.approx(matching.objective, rel=1e-9, abs=1e-6)


@pytest.mark.parametrize(("num_clients", "pipelines", "middle"), SIZES[:3])
def test_candidate_pruning_keeps_the_optimum(llama16: ModelProfile, num_clients: int, pipelines: int, middle: int) -> None:
    """Keeping each row's R cheapest eligible clients changes neither solver's optimum."""
    for seed in range(3):
        problem = random_problem(llama16, seed, num_clients=num_clients, pipelines=pipelines, middle=middle)
        args = (problem.cost, problem.eligible, problem.capacity)
        full = solve_matching(*args, prune=False).objective
        assert solve_matching(*args).objective == pytest.approx(full, rel=1e-9, abs=1e-6)
        assert solve_lp(*args).objective == pytest.approx(solve_lp(*args, prune=False).objective, rel=1e-9, abs=1e-6)


def test_matching_optimum_is_the_brute_force_optimum() -> None:
    """On instances small enough to enumerate, the matching path finds the cheapest assignment."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        cost = rng.uniform(0, 10, size=(3, 4))
        eligible = rng.random((3, 4)) < 0.8
        capacity = rng.integers(1, 3, size=4)
        best = math.inf
        for choice in itertools.product(range(4), repeat=3):
            used = np.bincount(choice, minlength=4)
            if all(eligible[r, c] for r, c in enumerate(choice)) and (used <= capacity).all():
                best = min(best, sum(cost[r, c] for r, c in enumerate(choice)))
        if math.isinf(best):
            with pytest.raises(Infeasible):
                solve_matching(cost, eligible, capacity)
        else:
            assert solve_matching(cost, eligible, capacity).objective == pytest.approx(best)


@pytest.mark.parametrize("solver", [solve_lp, solve_matching])
def test_solvers_report_infeasible_when_partitions_compete(solver) -> None:
    """Three partitions that fit only on two single-slot clients cannot all be placed."""
    eligible = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)
    cost = np.ones(eligible.shape)
    with pytest.raises(Infeasible):
        solver(cost, eligible, np.array([1, 1, 5]))


def test_hall_violation_names_the_competing_partitions() -> None:
    """The violating set is the three partitions and the two clients they can use."""
    eligible = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)
    assert hall_violation(eligible, np.array([1, 1, 5])) == ([0, 1, 2], [0, 1])
    assert hall_violation(eligible, np.array([2, 1, 5])) is None


# ----------------------------------------------------------------------- the cost model


def test_fast_client_gets_the_heavy_partition(llama6: ModelProfile) -> None:
    """Of two middle stages, the one with more blocks runs on the client with more FLOP/s."""
    settings = PlannerSettings(num_stages=4, micro_batches=8, batch_tokens=2048)
    clients = [client("owner", gflops=100), client("slow", gflops=20), client("fast", gflops=200)]
    plan = plan_partitions(llama6, clients, owners=["owner"], settings=settings)
    middle = sorted(plan.pipeline(0)[1:3], key=lambda row: row.blocks)
    assert middle[0].blocks < middle[1].blocks
    assert (middle[0].client_id, middle[1].client_id) == ("slow", "fast")


def test_low_bandwidth_client_avoids_the_heavy_traffic_partition(llama6: ModelProfile) -> None:
    """Equal FLOP/s: the client on a thin link gets the partition with fewer weight bytes to move."""
    settings = PlannerSettings(batch_tokens=256, steps_per_round=1)
    demands = stage_demands(profile_partitions(llama6, stage_specs_from_counts([0, 1, 4, 1])), settings)
    helpers = [client("thin", up_mb=1, down_mb=2), client("wide", up_mb=100, down_mb=200)]
    problem = assignment_problem(demands, 1, helpers, settings)
    for kind in ("cvxpy", "matching"):
        solution = solve(problem, PlannerSettings(solver=kind))
        heavy = 1  # middle stage 2 (4 blocks) is row 1
        assert helpers[int(solution.client_of_row[heavy])].client_id == "wide"


def test_capacity_splits_a_client_into_slots(llama6: ModelProfile) -> None:
    """A client of capacity 2 is planned as two slots with half its FLOP/s and memory each."""
    slots = Slots.of([client("a", gflops=100, memory=4 * GIB, capacity=2)])
    assert slots.flops[0] == 50 * GFLOP and slots.memory[0] == 2 * GIB and slots.capacity[0] == 2


def test_step_time_adds_compute_traffic_and_latency(llama6: ModelProfile) -> None:
    """A middle stage's step is FLOPs/FLOP/s + 2 hidden states each way + 2 rtt per micro-batch."""
    settings = PlannerSettings(batch_tokens=512, micro_batches=3)
    parts = profile_partitions(llama6, stage_specs_from_counts([1, 2, 3]))
    demands = stage_demands(parts, settings)
    helper = client("h", gflops=50, up_mb=10, down_mb=40, rtt=0.02)
    terms = cost_terms(demands[1:2], Slots.of([helper]), settings)
    hidden = 512 * llama6.hidden_size * llama6.dtype_bytes
    expected = (
        parts[1].train_flops_per_token * 512 / (50 * GFLOP) + 2 * hidden * (1 / (10 * MB) + 1 / (40 * MB)) + 2 * 3 * 0.02
    )
    assert terms.step[0, 0] == pytest.approx(expected)


# ------------------------------------------------------------------------ plan(): shape


def test_memory_mask_is_respected(llama16: ModelProfile) -> None:
    """No partition lands on a slot whose memory (memory / capacity) is smaller than it needs."""
    rng = np.random.default_rng(3)
    helpers = random_clients(rng, 30)
    owner = client("owner", gflops=300, memory=16 * GIB)
    settings = PlannerSettings(num_stages=6, batch_tokens=1024, micro_batches=4)
    plan = plan_partitions(llama16, [owner, *helpers], owners=["owner"], settings=settings)
    by_id = {c.client_id: c for c in helpers}
    used = [row for row in plan.assignments if not row.pinned]
    assert used
    for row in used:
        helper = by_id[row.client_id]
        assert row.memory_bytes <= helper.memory_bytes // helper.capacity


def test_small_memory_client_is_skipped_even_when_fastest(llama6: ModelProfile) -> None:
    """The fastest client is not used when a middle partition does not fit in its memory."""
    settings = PlannerSettings(num_stages=3, batch_tokens=1024)
    clients = [client("owner"), client("tiny", gflops=10_000, memory=1e6), client("big", gflops=50)]
    plan = plan_partitions(llama6, clients, owners=["owner"], settings=settings)
    assert plan.pipeline(0)[1].client_id == "big"
    assert "1 lack memory" in plan.pipeline(0)[1].why


def test_owner_stages_are_pinned_in_every_pipeline(llama16: ModelProfile) -> None:
    """Each owner runs the first and last stage of its own pipeline and nothing else."""
    rng = np.random.default_rng(11)
    owners = [client(f"owner{i}", gflops=200 + 50 * i, memory=8 * GIB) for i in range(3)]
    helpers = random_clients(rng, 25)
    settings = PlannerSettings(num_stages=5, micro_batches=8, batch_tokens=1024)
    plan = plan_partitions(llama16, [*helpers, *owners], owners=[o.client_id for o in owners], settings=settings)
    for index, owner in enumerate(owners):
        rows = plan.pipeline(index)
        assert [row.stage for row in rows] == list(range(5))
        assert rows[0].client_id == rows[-1].client_id == owner.client_id
        assert rows[0].pinned and rows[-1].pinned and not any(row.pinned for row in rows[1:-1])
        assert {row.client_id for row in rows[1:-1]}.isdisjoint({o.client_id for o in owners})


def test_capacity_is_shared_between_pipelines(llama16: ModelProfile) -> None:
    """Over all pipelines, no helper hosts more partitions than its capacity."""
    rng = np.random.default_rng(5)
    helpers = random_clients(rng, 12)
    owners = [client("o1", memory=16 * GIB), client("o2", memory=16 * GIB)]
    settings = PlannerSettings(num_stages=6, micro_batches=8, batch_tokens=512)
    plan = plan_partitions(llama16, [*owners, *helpers], owners=["o1", "o2"], settings=settings)
    for helper in helpers:
        assert len(plan.for_client(helper.client_id)) <= helper.capacity


def test_plan_reports_an_integral_lp_solution(llama16: ModelProfile) -> None:
    """A plan solved with cvxpy says so, with its measured distance from 0/1."""
    rng = np.random.default_rng(2)
    settings = PlannerSettings(num_stages=6, solver="cvxpy", micro_batches=8, batch_tokens=1024)
    plan = plan_partitions(llama16, [client("owner"), *random_clients(rng, 20)], owners=["owner"], settings=settings)
    assert plan.solver == "cvxpy" and plan.integral and plan.max_fractional < 1e-6


def test_plan_objective_is_the_same_with_either_solver(llama16: ModelProfile) -> None:
    """plan() gives the same cut and the same optimal objective through cvxpy and matching."""
    rng = np.random.default_rng(9)
    clients = [client("o1"), client("o2"), *random_clients(rng, 40)]
    plans = [
        plan_partitions(
            llama16, clients, owners=["o1", "o2"], settings=PlannerSettings(solver=kind, num_stages=7, micro_batches=8)
        )
        for kind in ("cvxpy", "matching")
    ]
    assert plans[0].block_counts == plans[1].block_counts
    assert plans[0].objective == pytest.approx(plans[1].objective, rel=1e-9, abs=1e-6)


# ---------------------------------------------------------------------------- the cut


def compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every way to write ``total`` as ``parts`` ordered non-negative integers."""
    for bars in itertools.combinations(range(total + parts - 1), parts - 1):
        edges = (-1, *bars, total + parts - 1)
        yield tuple(edges[i + 1] - edges[i] - 1 for i in range(parts))


def brute_force_bottleneck(
    model: ModelProfile,
    owners: Sequence[ClientProfile],
    helpers: Sequence[ClientProfile],
    settings: PlannerSettings,
    num_stages: int,
) -> float:
    """The least bottleneck over every cut and every placement, from the exact per-stage estimates."""
    owner_slots = Slots.of(owners, shared=False)
    helper_slots = Slots.of(helpers)
    slot_client = [n for n, h in enumerate(helpers) for _ in range(h.capacity)]
    best = math.inf
    for counts in compositions(model.num_layers, num_stages):
        if any(c == 0 for c in counts[1:-1]):
            continue
        parts = profile_partitions(model, stage_specs_from_counts(counts))
        demands = stage_demands(parts, settings)
        own = cost_terms(demands, owner_slots, settings)
        pinned = (0, num_stages - 1)
        if not all(own.eligible[list(pinned), p].all() for p in range(len(owners))):
            continue
        if any(sum(d.memory_bytes for k, d in enumerate(demands) if k in pinned) > o.memory_bytes for o in owners):
            continue
        owner_s = max(own.step[0, p] + own.step[-1, p] for p in range(len(owners)))
        if num_stages == 2:
            best = min(best, owner_s)
            continue
        mid = cost_terms(demands[1:-1], helper_slots, settings)
        rows = [s for _ in owners for s in range(num_stages - 2)]
        for placement in itertools.permutations(range(len(slot_client)), len(rows)):
            clients_used = [slot_client[i] for i in placement]
            if all(mid.eligible[s, n] for s, n in zip(rows, clients_used, strict=True)):
                slowest = max(mid.step[s, n] for s, n in zip(rows, clients_used, strict=True))
                best = min(best, max(owner_s, slowest))
    return best


CUT_CASES = [
    # (owners' GFLOP/s, helpers' (GFLOP/s, up MB/s, capacity), memory per helper in GiB)
    ([40.0], [(100.0, 50.0, 1), (30.0, 200.0, 1), (60.0, 5.0, 1)], 8.0),
    ([200.0], [(20.0, 100.0, 1), (80.0, 100.0, 2), (10.0, 100.0, 1)], 8.0),
    ([30.0, 60.0], [(50.0, 100.0, 1), (90.0, 20.0, 1), (40.0, 100.0, 1), (70.0, 100.0, 1)], 8.0),
    ([50.0], [(300.0, 100.0, 1), (300.0, 100.0, 1), (40.0, 100.0, 1)], 0.012),  # memory binds
]


@pytest.mark.parametrize("case", range(len(CUT_CASES)))
@pytest.mark.parametrize("num_stages", [2, 3, 4, 5])
def test_cut_matches_brute_force_bottleneck(llama6: ModelProfile, case: int, num_stages: int) -> None:
    """For a fixed number of stages the chosen cut has the least bottleneck any cut and placement has."""
    owner_gflops, helper_specs, helper_gib = CUT_CASES[case]
    owners = [client(f"o{i}", gflops=g, memory=8 * GIB) for i, g in enumerate(owner_gflops)]
    helpers = [
        client(f"h{i}", gflops=g, up_mb=up, down_mb=2 * up, capacity=cap, rtt=0.002 * i, memory=helper_gib * GIB * cap)
        for i, (g, up, cap) in enumerate(helper_specs)
    ]
    settings = PlannerSettings(num_stages=num_stages, batch_tokens=512, micro_batches=4)
    expected = brute_force_bottleneck(llama6, owners, helpers, settings, num_stages)
    try:
        plan = plan_partitions(llama6, [*owners, *helpers], owners=[o.client_id for o in owners], settings=settings)
    except PlanningError:
        assert math.isinf(expected)
        return
    assert plan.cut_bottleneck_s == pytest.approx(expected, rel=1e-9)
    assert all(count >= 1 for count in plan.block_counts[1:-1])


@pytest.mark.parametrize("micro_batches", [1, 4, 32])
def test_number_of_stages_is_the_fastest_fixed_choice(llama6: ModelProfile, micro_batches: int) -> None:
    """Without num_stages the plan is the fixed-K plan with the least estimated step, fewest K on ties."""
    clients = [
        client("owner", gflops=30),
        *[client(f"h{i}", gflops=g, up_mb=400, down_mb=800) for i, g in enumerate([80.0, 60.0, 50.0, 5.0])],
    ]
    settings = PlannerSettings(batch_tokens=1024, micro_batches=micro_batches)
    chosen = plan_partitions(llama6, clients, owners=["owner"], settings=settings)
    fixed = {
        k: plan_partitions(
            llama6, clients, owners=["owner"], settings=PlannerSettings(**{**settings.to_json(), "num_stages": k})
        )
        for k in range(1, 7)
    }
    best = min(p.cut_step_s for p in fixed.values())
    expected = min(k for k, p in fixed.items() if p.cut_step_s <= best * (1 + 1e-9))
    assert chosen.num_stages == expected
    assert chosen.block_counts == fixed[expected].block_counts


def test_fill_drain_estimate_adds_stages_then_bottlenecks(llama6: ModelProfile) -> None:
    """The plan's step estimate is (sum of stage times + (m - 1) * bottleneck) / m over its rows."""
    clients = [client("owner", gflops=30), *[client(f"h{i}", gflops=50.0 * (i + 1)) for i in range(3)]]
    plan = plan_partitions(llama6, clients, owners=["owner"], settings=PlannerSettings(num_stages=5, micro_batches=6))
    rows = plan.pipeline(0)
    stages = [rows[0].step_s + rows[-1].step_s, *(row.step_s for row in rows[1:-1])]
    assert plan.bottleneck_s == pytest.approx(max(stages))
    assert plan.step_s == pytest.approx((sum(stages) + 5 * max(stages)) / 6)


def test_more_micro_batches_use_more_stages(llama6: ModelProfile) -> None:
    """With one micro-batch a fast owner keeps the model (one stage); with many, helpers take stages."""
    clients = [client("owner", gflops=100), *[client(f"h{i}", gflops=100, up_mb=1000, down_mb=1000) for i in range(4)]]
    alone = plan_partitions(llama6, clients, owners=["owner"], settings=PlannerSettings(micro_batches=1))
    spread = plan_partitions(llama6, clients, owners=["owner"], settings=PlannerSettings(micro_batches=64))
    # Was num_stages == 2: two stages both on the owner cost what one stage costs, and the
    # planner takes the fewest stages on ties, so the owner now keeps the model as one stage.
    assert alone.num_stages == 1 and spread.num_stages > 2


# --------------------------------------------------------------------------- the errors


def test_too_few_clients_for_the_stages(llama6: ModelProfile) -> None:
    """Asking for more middle stages than helper slots names capacity and the largest workable K."""
    clients = [client("owner"), client("a"), client("b")]
    with pytest.raises(NotEnoughClientsError) as info:
        plan_partitions(llama6, clients, owners=["owner"], settings=PlannerSettings(num_stages=5))
    assert info.value.constraint.startswith("each middle partition needs its own client slot")
    assert "set num_stages to at most 4" in str(info.value)


def test_no_client_can_hold_a_partition(llama6: ModelProfile) -> None:
    """When neither the owner nor the helpers have room for the blocks, the memory constraint is named."""
    clients = [client("owner", memory=30e6), client("a", memory=1e6), client("b", memory=1e6)]
    with pytest.raises(InsufficientMemoryError) as info:
        plan_partitions(llama6, clients, owners=["owner"], settings=PlannerSettings(batch_tokens=1024))
    assert "memory" in info.value.constraint and "add clients with more memory" in info.value.fix


def test_owner_that_cannot_hold_embedding_and_head(llama6: ModelProfile) -> None:
    """An owner too small for its own two stages gets a message about the data owner."""
    with pytest.raises(InsufficientMemoryError, match="data owner"):
        plan_partitions(llama6, [client("owner", memory=1e5), client("a")], owners=["owner"])


def test_owner_alone_without_room_for_the_model(llama6: ModelProfile) -> None:
    """With no helper at all and a model too big for the owner, the fix is to add clients."""
    with pytest.raises(NotEnoughClientsError, match="add clients"):
        plan_partitions(
            llama6, [client("owner", memory=30e6)], owners=["owner"], settings=PlannerSettings(batch_tokens=1024)
        )


def test_all_clients_too_slow_and_the_suggested_bound_works(llama6: ModelProfile) -> None:
    """A tight max_step_time_s fails with the least feasible bound, and that bound then plans."""
    clients = [client("owner", gflops=20), client("a", gflops=10), client("b", gflops=5)]
    settings = PlannerSettings(batch_tokens=2048, max_step_time_s=1e-3, micro_batches=4)
    with pytest.raises(ClientsTooSlowError) as info:
        plan_partitions(llama6, clients, owners=["owner"], settings=settings)
    assert info.value.constraint == "max_step_time_s"
    bound = float(info.value.fix.split("at least ")[1].split(",")[0])
    relaxed = PlannerSettings(batch_tokens=2048, max_step_time_s=bound * 1.01, micro_batches=4)
    plan = plan_partitions(llama6, clients, owners=["owner"], settings=relaxed)
    assert plan.bottleneck_s <= bound * 1.01


def test_too_many_stages_for_the_blocks(llama6: ModelProfile) -> None:
    """More middle stages than decoder blocks is refused with the largest possible K."""
    clients = [client("owner"), *[client(f"h{i}") for i in range(10)]]
    with pytest.raises(PlanningError, match="at most 8"):
        plan_partitions(llama6, clients, owners=["owner"], settings=PlannerSettings(num_stages=9))


@pytest.mark.parametrize("kind", ["cvxpy", "matching"])
def test_competing_partitions_are_named_when_no_assignment_exists(
    llama6: ModelProfile, kind: Literal["cvxpy", "matching"]
) -> None:
    """Three partitions that fit only on two one-slot clients: the error names both groups."""
    settings = PlannerSettings(batch_tokens=1024, solver=kind)
    demands = stage_demands(profile_partitions(llama6, stage_specs_from_counts([0, 2, 2, 2, 0])), settings)
    helpers = [client("big1"), client("tiny1", memory=1e6), client("big2"), client("tiny2", memory=1e6)]
    problem = assignment_problem(demands, 1, helpers, settings)
    with pytest.raises(AssignmentInfeasibleError) as info:
        solve(problem, settings)
    message = str(info.value)
    assert "['p0 stage 1', 'p0 stage 2', 'p0 stage 3']" in message
    assert "['big1', 'big2']" in message and "2 slot(s) for 3 partitions" in message
    assert "memory mask + capacity" in info.value.constraint


def test_assignment_infeasible_error_carries_constraint_and_fix() -> None:
    """The error family keeps the failed constraint and the fix apart and in the message."""
    error = AssignmentInfeasibleError("p0 stage 1 has no client", constraint="capacity", fix="add a client")
    assert isinstance(error, ValueError)
    assert (error.constraint, error.fix) == ("capacity", "add a client")
    assert str(error) == "p0 stage 1 has no client [constraint: capacity]. Fix: add a client"


@pytest.mark.parametrize(
    ("owners", "message"),
    [([], "owners is empty"), (["nobody"], "not among the clients"), (["owner", "owner"], "twice")],
)
def test_bad_owner_lists_are_refused(llama6: ModelProfile, owners: list[str], message: str) -> None:
    """Owners must be distinct client ids of the given clients."""
    with pytest.raises(ValueError, match=message):
        plan_partitions(llama6, [client("owner"), client("a")], owners=owners)


def test_duplicate_client_ids_are_refused(llama6: ModelProfile) -> None:
    """Two profiles with one id are a mistake the planner does not guess about."""
    with pytest.raises(ValueError, match="appears twice"):
        plan_partitions(llama6, [client("owner"), client("a"), client("a")], owners=["owner"])


def test_client_profile_validates_its_numbers() -> None:
    """Non-positive speeds, capacities below one and unknown declared fields are refused."""
    with pytest.raises(ValueError, match="flops_per_s"):
        client("x", gflops=0)
    with pytest.raises(ValueError, match="capacity"):
        client("x", capacity=0)
    with pytest.raises(ValueError, match="declared"):
        ClientProfile(
            client_id="x",
            flops_per_s=1.0,
            memory_bytes=1,
            upload_bytes_per_s=1.0,
            download_bytes_per_s=1.0,
            declared=frozenset({"speed"}),
        )


# ---------------------------------------------------------------------- explaining it


def test_plan_survives_a_json_round_trip(llama16: ModelProfile) -> None:
    """to_json -> json text -> from_json gives back an equal plan."""
    rng = np.random.default_rng(4)
    clients = [client("o1"), client("o2"), *random_clients(rng, 15)]
    plan = plan_partitions(
        llama16, clients, owners=["o1", "o2"], settings=PlannerSettings(num_stages=5, micro_batches=8)
    )
    assert PartitionPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


def test_client_profile_survives_a_json_round_trip() -> None:
    """Declared fields come back as a frozenset."""
    profile = ClientProfile(
        client_id="x",
        flops_per_s=1e12,
        memory_bytes=2**33,
        upload_bytes_per_s=1e7,
        download_bytes_per_s=1e8,
        rtt_s=0.01,
        capacity=2,
        declared=frozenset({"flops_per_s", "rtt_s"}),
    )
    assert ClientProfile.from_json(json.loads(json.dumps(profile.to_json()))) == profile


def test_from_json_rejects_unknown_keys_and_inconsistent_rows(llama6: ModelProfile) -> None:
    """A typo'd key or rows that do not match the cut are refused, not silently accepted."""
    # Two stages, so that dropping a row leaves the pipeline short (the planner alone would take one).
    plan = plan_partitions(llama6, [client("owner"), client("a")], owners=["owner"], settings=PlannerSettings(num_stages=2))
    data = plan.to_json()
    with pytest.raises(ValueError, match="unknown keys"):
        PartitionPlan.from_json({**data, "objectve": 1.0})
    with pytest.raises(ValueError, match="does not hold stages"):
        PartitionPlan.from_json({**data, "assignments": data["assignments"][:1]})


def test_table_has_a_row_per_partition_with_its_reason(llama16: ModelProfile) -> None:
    """The table shows every partition, its blocks, params, client, estimates and why."""
    rng = np.random.default_rng(8)
    plan = plan_partitions(
        llama16,
        [client("owner"), *random_clients(rng, 10)],
        owners=["owner"],
        settings=PlannerSettings(num_stages=4, micro_batches=8),
    )
    lines = plan.table().splitlines()
    assert lines[1].split()[:6] == ["pipe", "stage", "layers", "blocks", "params", "client"]
    assert "compute s" in lines[1] and "transfer s" in lines[1] and "why" in lines[1]
    assert len(lines) == 2 + plan.num_stages
    for line, row in zip(lines[2:], plan.assignments, strict=True):
        assert row.client_id in line and row.why in line and f"{row.layer_start}-{row.layer_end}" in line


def test_why_says_who_took_a_cheaper_client(llama6: ModelProfile) -> None:
    """When the cheapest client went to another partition, the reason names it."""
    clients = [client("owner", gflops=500), client("fast", gflops=400), client("slow", gflops=40)]
    plan = plan_partitions(llama6, clients, owners=["owner"], settings=PlannerSettings(num_stages=4, micro_batches=8))
    slow_row = plan.for_client("slow")[0]
    assert "cheaper fast is full with" in slow_row.why
    assert "cheapest of 2 eligible clients" in plan.for_client("fast")[0].why


def test_a_client_whose_costs_overflow_is_left_out_not_fatal(llama6: ModelProfile) -> None:
    """A helper reporting a denormal FLOP/s (its cost is infinite) is left out; the others are planned."""
    settings = PlannerSettings(num_stages=3, batch_tokens=1024)
    clients = [client("owner"), client("denormal", gflops=5e-324), client("ok", gflops=50)]
    plan = plan_partitions(llama6, clients, owners=["owner"], settings=settings)
    assert plan.pipeline(0)[1].client_id == "ok"
