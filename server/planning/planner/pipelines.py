"""Which data owners train alone and which split the model with helpers.

Each data owner drives one pipeline. With ``num_stages`` set, every pipeline has that many
stages, all cut alike (one :class:`~.cuts.CutSearch` over every owner).

Without it each owner is weighed on its own, so classic federated learning (an owner training
the whole model) and split learning take part in one plan:

* **Alone**: one stage, the whole model on the owner, no helper. Possible when the owner's
  memory holds the whole model for training and the step stays within ``max_step_time_s``;
  it takes ``alone_s = (embedding + head + L blocks) FLOPs / the owner's FLOP/s`` per step.
* **Split**: the owners that split share one cut into ``K >= 3`` stages (the cut search over
  those owners and every helper slot); ``split_s`` is its step estimate (the slowest of them).

Every owner starts in the split group. While some owner in it can train alone and
``alone_s <= split_s``, the fastest of those leaves the group to train alone, and the group is
cut again without it: fewer pipelines share the helpers, so the split gets faster or stays. It
ends when every owner left is faster split than alone, or cannot train alone. So an owner that
trains alone was at least as fast alone as the split it would have shared (ties go to alone:
fewer stages), and one that splits is faster split (or has no choice). An owner leaves a group
that has no feasible split at all (too few helper slots for every pipeline), which leaves the
helpers to the others. Owners that cannot train alone and have no feasible split get a
:class:`~.errors.PlanningError` from the cut search saying what failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .costs import Slots
from .cuts import _EPS, Cut, CutInputs, CutSearch
from .explain import SplitEstimate, alone_reason, fixed_reason, split_reason
from .types import ClientProfile, PipelineCut, PlannerSettings


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """Every pipeline's cut, and the cut search's estimates over all of them."""

    cuts: tuple[PipelineCut, ...]  # one per owner, in owners order
    bottleneck_s: float  # est. seconds per step of the slowest stage of any pipeline
    step_s: float  # est. seconds per step of the slowest pipeline


def choose_cuts(
    model: CutInputs, owners: Sequence[ClientProfile], helpers: Sequence[ClientProfile], settings: PlannerSettings
) -> Layout:
    """Cut every owner's pipeline (see the module docstring); raises a PlanningError when one cannot train."""
    if settings.num_stages is not None:
        return _fixed(model, owners, helpers, settings)
    return _per_owner(model, owners, helpers, settings)


def _fixed(
    model: CutInputs, owners: Sequence[ClientProfile], helpers: Sequence[ClientProfile], settings: PlannerSettings
) -> Layout:
    """Every pipeline cut alike into ``settings.num_stages`` stages."""
    assert settings.num_stages is not None
    cut = CutSearch(model, Slots.of(owners, shared=False), Slots.of(helpers), settings).choose()
    why = fixed_reason(settings.num_stages)
    cuts = tuple(
        PipelineCut(
            pipeline=p, owner_id=owner.client_id, block_counts=cut.block_counts, alone_s=None, split_s=None, why=why
        )
        for p, owner in enumerate(owners)
    )
    return Layout(cuts=cuts, bottleneck_s=cut.bottleneck_s, step_s=cut.pipeline_s)


def _per_owner(
    model: CutInputs, owners: Sequence[ClientProfile], helpers: Sequence[ClientProfile], settings: PlannerSettings
) -> Layout:
    """Owners that are at least as fast alone train alone; the others share one split."""
    everyone = CutSearch(model, Slots.of(owners, shared=False), Slots.of(helpers), settings)
    alone_s = everyone.alone_times().tolist()
    fits = everyone.holds_whole_model().tolist()
    bound = settings.max_step_time_s
    can_alone = [fit and (bound is None or t <= bound * (1 + _EPS)) for fit, t in zip(fits, alone_s, strict=True)]
    split, weighed = _weigh(model, owners, helpers, settings, alone_s=alone_s, can_alone=can_alone)
    need = model.whole_memory
    cuts: list[PipelineCut] = []
    for p, owner in enumerate(owners):
        memory = float(owner.memory_bytes)
        if p in weighed:
            estimate, size = weighed[p]
            why = alone_reason(
                owner.client_id, need=need, memory=memory, alone_s=alone_s[p], split=estimate, weighed=size
            )
            counts: tuple[int, ...] = (model.num_layers,)
        else:
            assert split.cut is not None
            estimate = split.estimates[p]
            why = split_reason(
                owner.client_id, need=need, memory=memory, alone_s=alone_s[p], fits=fits[p], bound=bound, split=estimate
            )
            counts = split.cut.block_counts
        cuts.append(
            PipelineCut(
                pipeline=p,
                owner_id=owner.client_id,
                block_counts=counts,
                alone_s=alone_s[p] if can_alone[p] else None,
                split_s=estimate.step_s if estimate is not None else None,
                why=why,
            )
        )
    alone = [alone_s[p] for p in weighed]
    shared = [split.cut] if split.cut is not None else []
    return Layout(
        cuts=tuple(cuts),
        bottleneck_s=max([*alone, *(cut.bottleneck_s for cut in shared)]),
        step_s=max([*alone, *(cut.pipeline_s for cut in shared)]),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class _Split:
    """The owners that split, their shared cut, and each one's pipeline in it."""

    search: CutSearch  # the cut search over these owners
    cut: Cut | None  # their best cut into 3 or more stages; None: none is feasible (or no owner)
    estimates: dict[int, SplitEstimate]  # owner's pipeline index -> its own pipeline under ``cut``


def _weigh(
    model: CutInputs,
    owners: Sequence[ClientProfile],
    helpers: Sequence[ClientProfile],
    settings: PlannerSettings,
    *,
    alone_s: Sequence[float],
    can_alone: Sequence[bool],
) -> tuple[_Split, dict[int, tuple[SplitEstimate | None, int]]]:
    """Move owners out of the split group one at a time (module docstring); raise when the rest cannot train.

    Returns the final group and, for each owner that left, its pipeline in the split it left
    (None: none was feasible) and how many pipelines shared that split.
    """
    group = list(range(len(owners)))
    weighed: dict[int, tuple[SplitEstimate | None, int]] = {}
    while True:
        split = _split(model, [owners[p] for p in group], group, helpers, settings)
        movable = [
            p
            for p in group
            if can_alone[p] and (split.cut is None or alone_s[p] <= split.estimates[p].step_s * (1 + _EPS))
        ]
        if not movable:
            break
        leaving = min(movable, key=lambda p: (alone_s[p], p))
        weighed[leaving] = (split.estimates.get(leaving), len(group))
        group.remove(leaving)
    if group and split.cut is None:
        raise split.search.diagnose(list(range(1, split.search.largest_stages() + 1)))
    return split, weighed


def _split(
    model: CutInputs,
    owners: Sequence[ClientProfile],
    pipelines: Sequence[int],
    helpers: Sequence[ClientProfile],
    settings: PlannerSettings,
) -> _Split:
    """The best shared cut into 3 or more stages for ``owners`` (pipelines ``pipelines``)."""
    search = CutSearch(model, Slots.of(owners, shared=False), Slots.of(helpers), settings)
    cut = search.best(range(3, search.largest_stages() + 1)) if owners else None
    if cut is None:
        return _Split(search=search, cut=None, estimates={})
    times = search.pipeline_times(cut).tolist()
    estimates = {
        p: SplitEstimate(step_s=t, num_stages=len(cut.block_counts), pipelines=len(pipelines))
        for p, t in zip(pipelines, times, strict=True)
    }
    return _Split(search=search, cut=cut, estimates=estimates)
