"""The planner's inputs (client profiles, settings) and its output (the plan), as plain data.

Every type converts to and from a dict of JSON values (``to_json`` / ``from_json``), so a plan
can be stored, shown by the admin API or sent to clients without pickling anything.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from autograd_bridge.partition import StageSpec

Solver = Literal["auto", "cvxpy", "matching"]
SOLVERS: tuple[Solver, ...] = ("auto", "cvxpy", "matching")


def _check_keys(cls: type, data: Mapping[str, Any]) -> None:
    """Reject a dict with keys the dataclass does not have (a typo would otherwise vanish)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__}.from_json expects a dict, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known keys are {sorted(known)}")


def _positive(owner: str, name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{owner}: {name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientProfile:
    """What the planner knows about one client device."""

    client_id: str  # unique name of the client
    flops_per_s: float  # sustained training throughput (forward + backward), FLOP/s, not the peak
    memory_bytes: int  # memory training may use on the device (GPU memory when it trains on one)
    upload_bytes_per_s: float  # client -> network bandwidth
    download_bytes_per_s: float  # network -> client bandwidth
    rtt_s: float = 0.0  # round-trip time to its peers
    capacity: int = 1  # most partitions it hosts at once, each with 1/capacity of the above; owners: unused
    declared: frozenset[str] = frozenset()  # fields set by the operator; the others were measured

    def __post_init__(self) -> None:
        if not isinstance(self.client_id, str) or not self.client_id:
            raise ValueError(f"client_id must be a non-empty string, got {self.client_id!r}")
        who = f"client {self.client_id!r}"
        for name in ("flops_per_s", "memory_bytes", "upload_bytes_per_s", "download_bytes_per_s"):
            _positive(who, name, getattr(self, name))
        if not (isinstance(self.rtt_s, int | float) and math.isfinite(self.rtt_s) and self.rtt_s >= 0):
            raise ValueError(f"{who}: rtt_s must be a finite number >= 0, got {self.rtt_s!r}")
        if not isinstance(self.capacity, int) or self.capacity < 1:
            raise ValueError(f"{who}: capacity must be an integer >= 1, got {self.capacity!r}")
        unknown = set(self.declared) - _PROFILE_FIELDS
        if unknown:
            raise ValueError(f"{who}: declared names unknown fields {sorted(unknown)}")

    def is_declared(self, name: str) -> bool:
        """Whether field ``name`` was set by the operator rather than measured on the device."""
        return name in self.declared

    def to_json(self) -> dict[str, Any]:
        """A dict of JSON values; ``declared`` becomes a sorted list."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["declared"] = sorted(self.declared)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClientProfile:
        """The inverse of :meth:`to_json`; raises ``ValueError`` on unknown keys or bad values."""
        _check_keys(cls, data)
        kwargs = dict(data)
        kwargs["declared"] = frozenset(kwargs.get("declared", ()))
        return cls(**kwargs)


_PROFILE_FIELDS = frozenset(
    {"flops_per_s", "memory_bytes", "upload_bytes_per_s", "download_bytes_per_s", "rtt_s", "capacity"}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class PlannerSettings:
    """How the planner weighs and bounds a plan."""

    transfer_weight: float = 1.0  # a in d = a*D + b*T: weight of transfer seconds in the cost
    compute_weight: float = 1.0  # b: weight of compute seconds in the cost
    batch_tokens: int = 4096  # tokens per training step of one pipeline (batch size x sequence length)
    micro_batches: int = 1  # micro-batches per step; each pays the link latency at every boundary
    # > 0: pipelines train with forward gradients: this many forward passes per step (2 per
    # direction), no backward compute, no gradients crossing, no activations kept for backward.
    forward_passes: int = 0
    steps_per_round: int = 1  # training steps between two weight exchanges with the server
    num_stages: int | None = None  # stages of every pipeline (>= 1; 1: the owner holds the whole model); None: chosen per owner
    max_step_time_s: float | None = None  # a client slower than this per step is not used for a stage
    solver: Solver = "auto"  # "cvxpy" (LP), "matching" (linear_sum_assignment) or "auto"
    matching_above: int = 50_000  # "auto" switches to matching above this many eligible pairs

    def __post_init__(self) -> None:
        for name in ("transfer_weight", "compute_weight"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"PlannerSettings.{name} must be a finite number >= 0, got {value!r}")
        if self.transfer_weight == 0 and self.compute_weight == 0:
            raise ValueError("PlannerSettings: transfer_weight and compute_weight are both 0; set one > 0")
        for name in ("batch_tokens", "micro_batches", "steps_per_round", "matching_above"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PlannerSettings.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.forward_passes, bool) or not isinstance(self.forward_passes, int) or self.forward_passes < 0:
            raise ValueError(
                f"PlannerSettings.forward_passes must be an integer >= 0 (0: backprop), got {self.forward_passes!r}"
            )
        if self.num_stages is not None and (
            isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or self.num_stages < 1
        ):
            raise ValueError(
                f"PlannerSettings.num_stages must be None (the planner chooses) or an integer >= 1 "
                f"(1: the data owner holds the whole model), got {self.num_stages!r}"
            )
        if self.max_step_time_s is not None:
            _positive("PlannerSettings", "max_step_time_s", self.max_step_time_s)
        if self.solver not in SOLVERS:
            raise ValueError(f"PlannerSettings.solver must be one of {SOLVERS}, got {self.solver!r}")

    def to_json(self) -> dict[str, Any]:
        """A dict of JSON values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PlannerSettings:
        """The inverse of :meth:`to_json`."""
        _check_keys(cls, data)
        return cls(**data)


@dataclass(frozen=True, slots=True, kw_only=True)
class Assignment:
    """One partition of one pipeline, the client that runs it, and why. Times are per step."""

    pipeline: int  # index of the pipeline (= of its owner in PartitionPlan.owners)
    owner_id: str  # the data owner driving that pipeline
    stage: int  # 0-based stage (partition) number within the pipeline
    layer_start: int  # first decoder block, inclusive
    layer_end: int  # last decoder block, exclusive
    num_params: int  # parameters of the partition
    memory_bytes: int  # training memory it needs at batch_tokens tokens per step
    client_id: str  # who runs it
    pinned: bool  # a data owner's first or last stage (with one stage: both at once), never moved
    compute_s: float  # est. forward + backward seconds per step on that client
    transfer_s: float  # est. seconds per step moving boundary tensors, plus weights / steps_per_round
    step_s: float  # est. seconds the stage occupies its client per step: compute + boundary traffic
    cost: float  # transfer_weight * transfer_s + compute_weight * compute_s (the assignment cost)
    why: str  # one line: why this client

    @property
    def blocks(self) -> int:
        """How many decoder blocks the partition holds."""
        return self.layer_end - self.layer_start

    def to_json(self) -> dict[str, Any]:
        """A dict of JSON values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Assignment:
        """The inverse of :meth:`to_json`."""
        _check_keys(cls, data)
        return cls(**data)


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineCut:
    """How one data owner's pipeline is cut, and why: alone (one stage, the whole model) or split."""

    pipeline: int  # index of the pipeline (= of its owner in PartitionPlan.owners)
    owner_id: str  # the data owner driving it
    block_counts: tuple[int, ...]  # decoder blocks per stage, first to last; one entry: the owner trains alone
    alone_s: float | None  # est. seconds per step of the owner training alone; None: impossible, or not weighed
    split_s: float | None  # est. seconds per step of its pipeline in the split it trains in or was weighed against; None: none
    why: str  # one line: why this owner trains alone or split

    @property
    def num_stages(self) -> int:
        """Stages of this pipeline."""
        return len(self.block_counts)

    def to_json(self) -> dict[str, Any]:
        """A dict of JSON values."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["block_counts"] = list(self.block_counts)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PipelineCut:
        """The inverse of :meth:`to_json`."""
        _check_keys(cls, data)
        return cls(**{**data, "block_counts": tuple(int(count) for count in data["block_counts"])})


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionPlan:
    """Where every stage of every pipeline runs, with the estimates behind the choice."""

    model_name: str  # ModelProfile.model_name
    num_stages: int  # most stages of any pipeline; the others (owners training alone) have one
    block_counts: tuple[int, ...]  # decoder blocks per stage of every pipeline with num_stages stages
    owners: tuple[str, ...]  # one data owner per pipeline; pipeline i belongs to owners[i]
    cuts: tuple[PipelineCut, ...]  # one per pipeline, in owners order: its stages and why
    assignments: tuple[Assignment, ...]  # ordered by pipeline, then stage
    solver: str  # what solved the assignment: "cvxpy", "matching" or "none" (nothing to assign)
    integral: bool  # the solution was 0/1 (max distance from {0, 1} below 1e-6)
    max_fractional: float  # that distance, as measured
    objective: float  # sum of the costs of the assigned (not pinned) partitions
    bottleneck_s: float  # est. seconds per step of the slowest stage of any pipeline (owner: its stages together)
    step_s: float  # est. seconds per step of the slowest pipeline, fill-drain: (sum of stages + (m - 1) * bottleneck) / m
    cut_bottleneck_s: float  # bottleneck_s as estimated by the cut search, before assignment
    cut_step_s: float  # step_s as estimated by the cut search (what chose the numbers of stages)
    solve_ms: float  # wall time of the assignment solve
    settings: PlannerSettings  # the settings the plan was made with

    @property
    def stage_counts(self) -> tuple[int, ...]:
        """Stages of each pipeline, in owners order (1: that owner trains alone)."""
        return tuple(cut.num_stages for cut in self.cuts)

    def specs(self, pipeline: int | None = None) -> list[StageSpec]:
        """The stage specs of pipeline ``pipeline``'s cut; without it, of ``block_counts``."""
        counts = self.block_counts if pipeline is None else self.cuts[pipeline].block_counts
        specs: list[StageSpec] = []
        start = 0
        for index, count in enumerate(counts):
            specs.append(StageSpec(index=index, num_stages=len(counts), layer_start=start, layer_end=start + count))
            start += count
        return specs

    def pipeline(self, index: int) -> tuple[Assignment, ...]:
        """The rows of pipeline ``index``, stage by stage."""
        return tuple(row for row in self.assignments if row.pipeline == index)

    def for_client(self, client_id: str) -> tuple[Assignment, ...]:
        """Every partition a client runs (several when its capacity allows)."""
        return tuple(row for row in self.assignments if row.client_id == client_id)

    def table(self) -> str:
        """A plain-text table: pipeline, stage, blocks, params, client, estimates and why."""
        from .explain import format_table

        return format_table(self)

    def to_json(self) -> dict[str, Any]:
        """A dict of JSON values (lists for tuples, nested dicts for rows and settings)."""
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["block_counts"] = list(self.block_counts)
        data["owners"] = list(self.owners)
        data["cuts"] = [cut.to_json() for cut in self.cuts]
        data["assignments"] = [row.to_json() for row in self.assignments]
        data["settings"] = self.settings.to_json()
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PartitionPlan:
        """The inverse of :meth:`to_json`; checks that the rows agree with the cut."""
        _check_keys(cls, data)
        kwargs = dict(data)
        kwargs["block_counts"] = tuple(int(count) for count in kwargs["block_counts"])
        kwargs["owners"] = tuple(str(owner) for owner in kwargs["owners"])
        kwargs["cuts"] = tuple(PipelineCut.from_json(cut) for cut in kwargs["cuts"])
        kwargs["assignments"] = tuple(Assignment.from_json(row) for row in kwargs["assignments"])
        kwargs["settings"] = PlannerSettings.from_json(kwargs["settings"])
        plan = cls(**kwargs)
        _check_plan(plan)
        return plan


def _check_plan(plan: PartitionPlan) -> None:
    """Every pipeline has exactly one row per stage, cut as its ``cuts`` entry says.

    A pipeline is cut as ``block_counts`` or holds the whole model in one stage.
    """
    if len(plan.block_counts) != plan.num_stages:
        raise ValueError(
            f"plan: {len(plan.block_counts)} block counts for {plan.num_stages} stages; they must match"
        )
    if [(cut.pipeline, cut.owner_id) for cut in plan.cuts] != list(enumerate(plan.owners)):
        raise ValueError(f"plan: cuts must name pipelines 0..{len(plan.owners) - 1} and their owners {list(plan.owners)}")
    whole = (sum(plan.block_counts),)
    for index, owner in enumerate(plan.owners):
        counts = plan.cuts[index].block_counts
        if counts not in (plan.block_counts, whole):
            raise ValueError(
                f"plan: pipeline {index} ({owner}) is cut {list(counts)}; it must be cut "
                f"{list(plan.block_counts)} or hold all {whole[0]} blocks in one stage"
            )
        expected = [(spec.layer_start, spec.layer_end) for spec in plan.specs(index)]
        rows = plan.pipeline(index)
        got = [(row.layer_start, row.layer_end) for row in rows]
        if [row.stage for row in rows] != list(range(len(counts))) or got != expected:
            raise ValueError(f"plan: pipeline {index} ({owner}) does not hold stages {expected} in order")
        if rows[0].client_id != owner or rows[-1].client_id != owner:
            raise ValueError(f"plan: pipeline {index} does not run its first and last stage on its owner {owner}")
