"""Benchmark of the planner's assignment solve: cvxpy/HiGHS and the matching path.

    python bench/assignment.py           # medians over several random instances per size
    python bench/assignment.py --quick   # fewer runs (a smoke run)

Each instance is what ``plan_partitions`` hands its solver: a real model profile (a 32-block
Llama-shaped config, measured on the meta device), cut at random into P pipelines x 16 middle
partitions of 1-4 blocks, against random heterogeneous clients (FLOP/s, memory, links, latency
and capacity spread over orders of magnitude, so some pairs are ineligible for memory). The
costs and the eligibility mask come from the planner's cost model (``assignment_problem``).

Timed (``solve ms``): exactly ``solve_lp`` / ``solve_matching`` as the planner calls them:
the exact candidate pruning (each row's R cheapest eligible clients, see server/planner/solve.py),
building the problem (cvxpy: sparse constraint matrices, variable over the kept pairs only,
flat cost parameter, canonicalisation; matching: the capacity-replicated cost matrix), solving,
and reading the assignment off. Not timed: profiling the model and building the cost matrix
(reported separately as ``costs ms``: cutting the profile and the (R, N) cost matrix). On the cvxpy sizes every instance is also solved with
the matching path and the optima are compared; integrality is checked on every LP solution.

The last line is
``lp_ms_100x32=<x> lp_ms_1000x64=<x> match_ms_10000x128=<x> integral=<true|false>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autograd_bridge.partition import stage_specs_from_counts
from autograd_bridge.profile import ModelProfile, profile_model, profile_partitions
from server.planning.planner import (
    AssignmentProblem,
    ClientProfile,
    PlannerSettings,
    Solution,
    assignment_problem,
    plan_partitions,
    solve_lp,
    solve_matching,
    stage_demands,
)

LAYERS = 32
MIDDLE = 16  # middle partitions per pipeline


def model_profile() -> ModelProfile:
    """A 32-block, 2048-wide Llama-shaped model (about 1.9B parameters), profiled at 512 tokens."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=LAYERS,
        num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
    )  # fmt: skip
    return profile_model(config, seq_len=512, dtype_bytes=2, name="llama-32x2048")


def random_clients(rng: np.random.Generator, count: int) -> list[ClientProfile]:
    """Phones to data-centre GPUs: every number log-uniform over its range."""
    return [
        ClientProfile(
            client_id=f"c{i}",
            flops_per_s=float(10 ** rng.uniform(11, 14)),
            memory_bytes=int(10 ** rng.uniform(9.3, 11)),
            upload_bytes_per_s=float(10 ** rng.uniform(6, 9)),
            download_bytes_per_s=float(10 ** rng.uniform(6.5, 9.5)),
            rtt_s=float(10 ** rng.uniform(-3, -1)),
            capacity=int(rng.integers(1, 4)),
        )
        for i in range(count)
    ]


def random_problem(
    model: ModelProfile, rng: np.random.Generator, clients: list[ClientProfile], pipelines: int
) -> AssignmentProblem:
    """P pipelines of 16 middle partitions (1-4 blocks each, random) against ``clients``."""
    settings = PlannerSettings(batch_tokens=8 * 512, micro_batches=8, steps_per_round=int(rng.integers(1, 20)))
    while True:
        middle = rng.integers(1, 5, size=MIDDLE)
        if middle.sum() <= LAYERS:
            break
    rest = LAYERS - int(middle.sum())
    counts = [rest // 2, *middle.tolist(), rest - rest // 2]
    demands = stage_demands(profile_partitions(model, stage_specs_from_counts(counts)), settings)
    return assignment_problem(demands, pipelines, clients, settings)


def run_size(
    model: ModelProfile,
    *,
    clients: int,
    pipelines: int,
    runs: int,
    solver: Callable[..., Solution],
    cross_check: bool,
    seed: int,
) -> tuple[float, float, bool]:
    """(median solve ms, median costs ms, all integral) over ``runs`` random instances."""
    rng = np.random.default_rng(seed)
    solve_ms: list[float] = []
    costs_ms: list[float] = []
    integral = True
    for run in range(runs + 1):  # run 0 warms imports and caches up and is not counted
        helpers = random_clients(rng, clients)
        start = time.perf_counter()
        problem = random_problem(model, rng, helpers, pipelines)
        cost, eligible = problem.cost, problem.eligible
        built = (time.perf_counter() - start) * 1e3
        solution = solver(cost, eligible, problem.capacity)
        integral &= solution.integral
        if cross_check:
            other = solve_matching(cost, eligible, problem.capacity)
            if abs(other.objective - solution.objective) > 1e-6 + 1e-9 * abs(other.objective):
                raise SystemExit(f"cvxpy {solution.objective} != matching {other.objective} at {clients} clients")
        if run:
            solve_ms.append(solution.solve_ms)
            costs_ms.append(built)
    rows = pipelines * MIDDLE
    print(
        f"{clients:>6} clients x {rows:>3} partitions ({pipelines} pipelines x {MIDDLE}), "
        f"{solver.__name__:>14}: solve {statistics.median(solve_ms):8.2f} ms median of {runs} "
        f"(min {min(solve_ms):.2f}, max {max(solve_ms):.2f}); costs {statistics.median(costs_ms):.2f} ms; "
        f"eligible {eligible.mean():.0%} of pairs; integral={integral}",
        flush=True,
    )
    return statistics.median(solve_ms), statistics.median(costs_ms), integral


def end_to_end(model: ModelProfile, runs: int) -> float:
    """Median ms of a whole ``plan_partitions`` call: 100 random clients, 2 small owners, K chosen."""
    rng = np.random.default_rng(4)
    times = []
    for run in range(runs + 1):
        owners = [
            ClientProfile(
                client_id=f"owner{i}",
                flops_per_s=5e12,
                memory_bytes=8 * 2**30,  # cannot hold the whole model: helpers must take stages
                upload_bytes_per_s=5e7,
                download_bytes_per_s=2e8,
                rtt_s=0.01,
            )
            for i in range(2)
        ]
        clients = [*owners, *random_clients(rng, 100)]
        settings = PlannerSettings(batch_tokens=8 * 512, micro_batches=8)
        start = time.perf_counter()
        plan = plan_partitions(model, clients, owners=["owner0", "owner1"], settings=settings)
        if run:
            times.append((time.perf_counter() - start) * 1e3)
    print(
        f"plan_partitions end to end (cut search over K, profiles, costs, {plan.solver}, reasons), "
        f"100 clients x 2 owners: {statistics.median(times):.1f} ms median of {runs}; last plan "
        f"{plan.num_stages} stages {list(plan.block_counts)}",
        flush=True,
    )
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs per size")
    args = parser.parse_args()
    model = model_profile()
    small, medium, large = (5, 3, 3) if args.quick else (21, 7, 9)
    lp_small, _, ok_small = run_size(
        model, clients=100, pipelines=2, runs=small, solver=solve_lp, cross_check=True, seed=1
    )
    lp_medium, _, ok_medium = run_size(
        model, clients=1000, pipelines=4, runs=medium, solver=solve_lp, cross_check=True, seed=2
    )
    match_large, _, _ = run_size(
        model, clients=10000, pipelines=8, runs=large, solver=solve_matching, cross_check=False, seed=3
    )
    end_to_end(model, 3 if args.quick else 7)
    integral = "true" if ok_small and ok_medium else "false"
    print(
        f"lp_ms_100x32={lp_small:.2f} lp_ms_1000x64={lp_medium:.2f} "
        f"match_ms_10000x128={match_large:.2f} integral={integral}"
    )


if __name__ == "__main__":
    main()
