"""``plan()``: cut every owner's pipeline, pin the owners' stages, assign the rest, explain the result."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from autograd_bridge.partition import stage_specs_from_counts
from autograd_bridge.profile import ModelProfile, PartitionProfile, profile_partitions

from .costs import CostTerms, Slots, StageDemand, cost_terms, stage_demands
from .cuts import CutInputs
from .errors import AssignmentInfeasibleError
from .explain import assigned_reason, pinned_reason
from .pipelines import choose_cuts
from .solve import Infeasible, Solution, hall_violation, solve_lp, solve_matching
from .types import Assignment, ClientProfile, PartitionPlan, PipelineCut, PlannerSettings


def cut_inputs(model: ModelProfile, settings: PlannerSettings) -> CutInputs:
    """The per-step numbers the cut search needs, taken from the model's piece profiles."""
    length = model.num_layers
    # One stage per piece: embedding alone, each block alone, head alone. Every number of a
    # partition is a sum over its pieces, so these add up to any cut's numbers.
    pieces = profile_partitions(model, stage_specs_from_counts([0, *([1] * length), 0]))
    tokens = settings.batch_tokens
    edge, blocks = [pieces[0], pieces[-1]], pieces[1:-1]
    hidden = max(piece.activation_bytes_per_token for piece in [model.embedding, *model.blocks])
    return CutInputs(
        num_layers=length,
        edge_flops=sum(p.train_flops_per_token for p in edge) * tokens,
        edge_memory=float(sum(p.train_memory_bytes(tokens) for p in edge)),
        block_flops=max((p.train_flops_per_token for p in blocks), default=0.0) * tokens,
        block_memory=float(max((p.train_memory_bytes(tokens) for p in blocks), default=0)),
        boundary_bytes=float(hidden * tokens),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class AssignmentProblem:
    """The middle partitions of every pipeline against the helper clients."""

    stages: tuple[int, ...]  # the middle stage numbers, 1..K-2 (none when K <= 2)
    row_stage: NDArray[np.int64]  # (R,) index into ``stages`` of each row (pipeline-major)
    row_pipeline: NDArray[np.int64]  # (R,) pipeline of each row (its index in the plan)
    terms: CostTerms  # (M, N) estimates per middle stage and helper client
    capacity: NDArray[np.int64]  # (N,) partitions each helper client may host
    client_ids: tuple[str, ...]  # (N,) the helper clients, in column order

    @property
    def row_names(self) -> list[str]:
        """``"p<pipeline> stage <k>"`` for every row, as the reasons and errors name them."""
        return [
            f"p{p} stage {self.stages[s]}" for p, s in zip(self.row_pipeline.tolist(), self.row_stage.tolist(), strict=True)
        ]

    @property
    def cost(self) -> NDArray[np.float64]:
        """(R, N) cost of every row on every client."""
        return self.terms.cost[self.row_stage]

    @property
    def eligible(self) -> NDArray[np.bool_]:
        """(R, N) pairs the solver may use."""
        return self.terms.eligible[self.row_stage]


def assignment_problem(
    demands: Sequence[StageDemand],
    num_pipelines: int,
    helpers: Sequence[ClientProfile],
    settings: PlannerSettings,
    *,
    pipelines: Sequence[int] | None = None,
) -> AssignmentProblem:
    """Rows = (pipeline, middle stage) pairs; columns = helper clients (slot shares).

    ``pipelines`` are the plan's indices of the ``num_pipelines`` pipelines cut into ``demands``
    (default ``0..num_pipelines - 1``); other pipelines of the plan have no middle stage.
    """
    ids = np.arange(num_pipelines) if pipelines is None else np.asarray(pipelines, dtype=np.int64)
    stages = tuple(range(1, len(demands) - 1))
    slots = Slots.of(helpers)
    terms = cost_terms([demands[k] for k in stages], slots, settings)
    row_stage = np.tile(np.arange(len(stages)), num_pipelines)
    row_pipeline = np.repeat(ids, len(stages))
    return AssignmentProblem(
        stages=stages,
        row_stage=row_stage,
        row_pipeline=row_pipeline,
        terms=terms,
        capacity=slots.capacity,
        client_ids=tuple(c.client_id for c in helpers),
    )


def solve(problem: AssignmentProblem, settings: PlannerSettings) -> Solution:
    """Run the solver the settings ask for; raises :class:`AssignmentInfeasibleError`."""
    eligible = problem.eligible
    use_matching = settings.solver == "matching" or (
        settings.solver == "auto" and int(eligible.sum()) > settings.matching_above
    )
    try:
        if use_matching:
            return solve_matching(problem.cost, eligible, problem.capacity)
        return solve_lp(problem.cost, eligible, problem.capacity)
    except Infeasible:
        raise _infeasible(problem) from None


def plan_partitions(
    model: ModelProfile,
    clients: Sequence[ClientProfile],
    *,
    owners: Sequence[str],
    settings: PlannerSettings | None = None,
) -> PartitionPlan:
    """Cut ``model`` into stages for every owner's pipeline and place the stages on ``clients``.

    Each id in ``owners`` is a data owner (one of ``clients``) that drives its own pipeline and
    runs that pipeline's first and last stage; every other client is a helper offering
    ``capacity`` slots to the middle stages of all pipelines. With ``settings.num_stages`` every
    pipeline has that many stages; without it an owner that holds the whole model and is at
    least as fast alone trains it alone (one stage, no helper), and the others share one split
    (pipelines.py). Raises a :class:`~server.planning.planner.errors.PlanningError` naming the
    constraint that failed.
    """
    settings = settings or PlannerSettings()
    owner_profiles, helpers = _split_clients(clients, owners)
    layout = choose_cuts(cut_inputs(model, settings), owner_profiles, helpers, settings)
    groups: dict[tuple[int, ...], list[PipelineCut]] = {}
    for cut in layout.cuts:
        groups.setdefault(cut.block_counts, []).append(cut)
    rows: list[Assignment] = []
    solution: Solution | None = None
    for counts, cuts in groups.items():
        group_rows, group_solution = _place(
            model, counts, cuts, owner_profiles, helpers, settings, explain_cut=settings.num_stages is None
        )
        rows.extend(group_rows)
        if group_solution is not None:
            assert solution is None, "only the split pipelines share helpers, and they share one cut"
            solution = group_solution
    rows.sort(key=lambda row: (row.pipeline, row.stage))
    bottleneck_s, step_s = _estimates(rows, len(owner_profiles), settings.micro_batches)
    widest = max(layout.cuts, key=lambda cut: cut.num_stages).block_counts
    return PartitionPlan(
        model_name=model.model_name,
        num_stages=len(widest),
        block_counts=widest,
        owners=tuple(owners),
        cuts=layout.cuts,
        assignments=tuple(rows),
        solver=solution.solver if solution else "none",
        integral=solution.integral if solution else True,
        max_fractional=solution.max_fractional if solution else 0.0,
        objective=solution.objective if solution else 0.0,
        bottleneck_s=bottleneck_s,
        step_s=step_s,
        cut_bottleneck_s=layout.bottleneck_s,
        cut_step_s=layout.step_s,
        solve_ms=solution.solve_ms if solution else 0.0,
        settings=settings,
    )


def _place(
    model: ModelProfile,
    counts: tuple[int, ...],
    cuts: Sequence[PipelineCut],
    owners: Sequence[ClientProfile],
    helpers: Sequence[ClientProfile],
    settings: PlannerSettings,
    *,
    explain_cut: bool,
) -> tuple[list[Assignment], Solution | None]:
    """The rows of the pipelines ``cuts``, all cut into ``counts``: pinned to their owners, the middle solved.

    ``owners`` are every pipeline's owner (indexed by pipeline); ``explain_cut`` adds each
    pipeline's reason for its cut to its first row.
    """
    partitions = profile_partitions(model, stage_specs_from_counts(counts))
    demands = stage_demands(partitions, settings)
    pipelines = [cut.pipeline for cut in cuts]
    group = [owners[p] for p in pipelines]
    owner_terms = cost_terms(demands, Slots.of(group, shared=False), settings)  # (K, P of the group)
    problem = assignment_problem(demands, len(group), helpers, settings, pipelines=pipelines)
    solution = solve(problem, settings) if problem.row_stage.size else None
    rows = _rows(
        partitions=partitions,
        pipelines=pipelines,
        owners=group,
        helpers=helpers,
        owner_terms=owner_terms,
        problem=problem,
        solution=solution,
        settings=settings,
    )
    if explain_cut:
        notes = {cut.pipeline: cut.why for cut in cuts}
        rows = [replace(row, why=f"{row.why}; {notes[row.pipeline]}") if row.stage == 0 else row for row in rows]
    return rows, solution


def _split_clients(
    clients: Sequence[ClientProfile], owners: Sequence[str]
) -> tuple[list[ClientProfile], list[ClientProfile]]:
    """(owner profiles in ``owners`` order, helpers); checks ids."""
    by_id: dict[str, ClientProfile] = {}
    for client in clients:
        if client.client_id in by_id:
            raise ValueError(f"client id {client.client_id!r} appears twice; client ids must be unique")
        by_id[client.client_id] = client
    if not owners:
        raise ValueError("owners is empty: name at least one data owner (a client id) to drive a pipeline")
    if len(set(owners)) != len(owners):
        raise ValueError(f"owners {list(owners)} name a client twice; each owner drives one pipeline")
    missing = [owner for owner in owners if owner not in by_id]
    if missing:
        raise ValueError(f"owners {missing} are not among the clients; pass their ClientProfiles too")
    owner_set = set(owners)
    return [by_id[o] for o in owners], [c for c in clients if c.client_id not in owner_set]


def _infeasible(problem: AssignmentProblem) -> AssignmentInfeasibleError:
    """Explain an infeasible assignment with a set of partitions that has too few clients."""
    row_names = problem.row_names
    violation = hall_violation(problem.eligible, problem.capacity)
    rows, cols = violation if violation is not None else (list(range(len(row_names))), [])
    names = [problem.client_ids[c] for c in cols]
    slots = int(sum(min(int(problem.capacity[c]), len(row_names)) for c in cols))
    return AssignmentInfeasibleError(
        f"partitions {[row_names[r] for r in rows]} fit (in memory and time) only on clients {names}, "
        f"which offer {slots} slot(s) for {len(rows)} partitions",
        constraint="each partition on its own eligible client slot (memory mask + capacity)",
        fix="add clients with enough memory per slot for these partitions, raise those clients' capacity, "
        "or cut into more stages so each partition is smaller",
    )


def _rows(
    *,
    partitions: Sequence[PartitionProfile],
    pipelines: Sequence[int],
    owners: Sequence[ClientProfile],
    helpers: Sequence[ClientProfile],
    owner_terms: CostTerms,
    problem: AssignmentProblem,
    solution: Solution | None,
    settings: PlannerSettings,
) -> list[Assignment]:
    """Every stage of ``pipelines`` (owned by ``owners``, in that order), pinned or solved, with estimates and reasons."""
    num_stages = len(partitions)
    middle_row = {
        (int(p), problem.stages[int(s)]): r
        for r, (p, s) in enumerate(zip(problem.row_pipeline, problem.row_stage, strict=True))
    }
    weights = (settings.transfer_weight, settings.compute_weight)
    row_names = problem.row_names
    rows: list[Assignment] = []
    for column, (p, owner) in enumerate(zip(pipelines, owners, strict=True)):
        for k, part in enumerate(partitions):
            if k in (0, num_stages - 1):
                terms, stage, client_index = owner_terms, k, column
                client_id = owner.client_id
                why = pinned_reason(owner.client_id, k, num_stages)
            else:
                assert solution is not None
                r = middle_row[(p, k)]
                terms, stage = problem.terms, int(problem.row_stage[r])
                client_index = int(solution.client_of_row[r])
                client_id = helpers[client_index].client_id
                why = assigned_reason(
                    row=r,
                    stage=stage,
                    client=client_index,
                    terms=terms,
                    clients=helpers,
                    client_of_row=solution.client_of_row,
                    row_names=row_names,
                    settings_weights=weights,
                )
            rows.append(
                Assignment(
                    pipeline=p,
                    owner_id=owner.client_id,
                    stage=k,
                    layer_start=part.layer_start,
                    layer_end=part.layer_end,
                    num_params=part.num_params,
                    memory_bytes=part.train_memory_bytes(settings.batch_tokens),
                    client_id=client_id,
                    pinned=k in (0, num_stages - 1),
                    compute_s=float(terms.compute[stage, client_index]),
                    transfer_s=float(terms.transfer[stage, client_index]),
                    step_s=float(terms.step[stage, client_index]),
                    cost=float(terms.cost[stage, client_index]),
                    why=why,
                )
            )
    return rows


def _estimates(rows: Sequence[Assignment], num_pipelines: int, micro_batches: int) -> tuple[float, float]:
    """(slowest stage, fill-drain step time) over all pipelines, per step.

    An owner runs both of its stages (or its one), so they count as one stage of their summed time.
    """
    bottleneck = step = 0.0
    for p in range(num_pipelines):
        times = [row.step_s for row in rows if row.pipeline == p and not row.pinned]
        times.append(sum(row.step_s for row in rows if row.pipeline == p and row.pinned))
        slowest = max(times)
        bottleneck = max(bottleneck, slowest)
        step = max(step, (sum(times) + (micro_batches - 1) * slowest) / micro_batches)
    return bottleneck, step
