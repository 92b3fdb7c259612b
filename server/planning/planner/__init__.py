"""The planner: where to cut the model, and which client runs which partition.

``plan_partitions(model_profile, clients, owners=[...], settings=...)`` (alias ``plan``) returns a :class:`PartitionPlan`:

1. **Cut** (``pipelines.py``, ``cuts.py``). Each data owner drives one pipeline and keeps its
   first and last stage (U-shape); the K-2 middle stages go to helper clients. With K = 1 the
   owner keeps the whole model as one stage (no helper needed). With ``num_stages`` set every
   pipeline is cut alike into that many stages. Without it each owner is weighed: one that
   holds the whole model and is estimated at least as fast alone as in the split it would
   share trains alone (classic federated learning); the others share one cut into K >= 3
   stages, the K with the lowest fill-drain step time ``(sum + (m - 1) * bottleneck) / m`` for
   ``m`` micro-batches. For a given K the block counts minimise the slowest stage's estimated
   time per step exactly (binary search over candidate stage times; with P pipelines the j-th
   largest middle stage must fit the weakest of the j-th group of P fastest slots; the owners'
   speed and memory bound what the first and last stage may hold); among the cuts with that
   bottleneck it takes the least sum of stage times. ``cuts.py`` spells out the argument.
2. **Cost** (``costs.py``). For every middle partition k and helper n,
   ``d[k, n] = a * D[n, k] + b * T[n, k]``: ``T`` is training compute per step, ``D`` the
   boundary activations/gradients per step, one round trip per boundary and micro-batch, and
   the weights exchanged once per round of ``steps_per_round`` steps. A client with capacity
   c is c slots with 1/c of its FLOP/s, bandwidth and memory each.
3. **Assign** (``solve.py``). Each middle partition of each pipeline on exactly one client,
   each client at most ``capacity`` partitions, ineligible pairs (the partition does not fit
   in a slot's memory, or a step would exceed ``max_step_time_s``) left out of the problem.
   The constraint matrix is totally unimodular, so the LP relaxation solved by cvxpy/HiGHS is
   integral (checked and reported); ``scipy.optimize.linear_sum_assignment`` over capacity
   slots solves the same problem exactly for very large instances.
4. **Explain** (``explain.py``). Every pipeline's cut carries why its owner trains alone or
   split (``plan.cuts``), every row its estimates and a one-line reason;
   ``plan.table()`` prints them, ``plan.to_json()`` / ``PartitionPlan.from_json`` round-trip.

Infeasible situations raise a :class:`PlanningError` (a ``ValueError``) naming the failed
constraint and the fix; see ``errors.py`` for the tree.
"""

from __future__ import annotations

from .costs import CostTerms, Slots, StageDemand, cost_terms, stage_demands
from .cuts import Cut, CutInputs, CutSearch
from .errors import (
    AssignmentInfeasibleError,
    ClientsTooSlowError,
    InsufficientMemoryError,
    NotEnoughClientsError,
    PlanningError,
)
from .pipelines import Layout, choose_cuts
from .plan import AssignmentProblem, assignment_problem, cut_inputs, plan_partitions, solve
from .solve import INTEGRALITY_TOLERANCE, Infeasible, Solution, hall_violation, solve_lp, solve_matching
from .types import Assignment, ClientProfile, PartitionPlan, PipelineCut, PlannerSettings

plan = plan_partitions  # the short name the issue uses

__all__ = [
    "INTEGRALITY_TOLERANCE",
    "Assignment",
    "AssignmentInfeasibleError",
    "AssignmentProblem",
    "ClientProfile",
    "ClientsTooSlowError",
    "CostTerms",
    "Cut",
    "CutInputs",
    "CutSearch",
    "Infeasible",
    "InsufficientMemoryError",
    "Layout",
    "NotEnoughClientsError",
    "PartitionPlan",
    "PipelineCut",
    "PlannerSettings",
    "PlanningError",
    "Slots",
    "Solution",
    "StageDemand",
    "assignment_problem",
    "choose_cuts",
    "cost_terms",
    "cut_inputs",
    "hall_violation",
    "plan",
    "plan_partitions",
    "solve",
    "solve_lp",
    "solve_matching",
    "stage_demands",
]
