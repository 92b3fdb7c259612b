"""Why each partition went where it went, and the plan as a table a person can read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .costs import CostTerms
from .types import ClientProfile, PartitionPlan

_SPEED_FIELDS = ("flops_per_s", "upload_bytes_per_s", "download_bytes_per_s")


def pinned_reason(owner_id: str, stage: int, num_stages: int) -> str:
    """The reason of a stage that stays with its data owner."""
    if num_stages == 1:
        return f"pinned to data owner {owner_id}: the whole model, tokens, labels and logits stay local"
    if stage == 0:
        return f"pinned to data owner {owner_id}: first stage, token ids stay local"
    return f"pinned to data owner {owner_id}: last stage, labels and logits stay local"


def fixed_reason(num_stages: int) -> str:
    """Why a pipeline has ``num_stages`` stages when the operator set the count."""
    return f"num_stages={num_stages} is set: every pipeline has {num_stages} stage(s)"


def alone_reason(
    owner_id: str, *, need: float, memory: float, alone_s: float, split: SplitEstimate | None, weighed: int
) -> str:
    """Why an owner trains the whole model alone: it fits, and alone is at least as fast as ``split``.

    ``split`` is its own pipeline in the split it was weighed against, which ``weighed``
    pipelines (itself included) would have shared; None when the helpers could not take them all.
    """
    holds = f"{owner_id} holds the whole model ({_bytes(need)} fits {_bytes(memory)})"
    if split is None:
        group = f" for all {weighed} pipelines weighed" if weighed > 1 else ""
        return f"{holds} and no split with helpers is feasible{group}: est. {alone_s:.3g} s/step alone"
    return f"{holds} and alone is at least as fast: est. {alone_s:.3g} s/step alone vs {split}"


def split_reason(
    owner_id: str, *, need: float, memory: float, alone_s: float, fits: bool, bound: float | None, split: SplitEstimate
) -> str:
    """Why an owner's pipeline is split with helpers: it cannot train alone, or the split is faster.

    ``fits``: its memory holds the whole model; when it does, alone must have broken ``bound``
    or been slower than ``split``.
    """
    if not fits:
        return f"{owner_id} cannot hold the whole model ({_bytes(need)} > {_bytes(memory)}): est. {split}"
    if bound is not None and alone_s > bound:
        return f"{owner_id} alone would take est. {alone_s:.3g} s/step, over max_step_time_s={bound:g}: est. {split}"
    return f"{owner_id} is faster split: est. {split} vs {alone_s:.3g} s/step alone"


@dataclass(frozen=True, slots=True, kw_only=True)
class SplitEstimate:
    """One owner's pipeline in a split, as the reasons quote it."""

    step_s: float  # est. seconds per step of the owner's pipeline
    num_stages: int  # stages of the split
    pipelines: int  # split pipelines sharing the cut and the helpers

    def __str__(self) -> str:
        shared = f", a cut shared by {self.pipelines} pipelines" if self.pipelines > 1 else ""
        return f"{self.step_s:.3g} s/step split into {self.num_stages} stages{shared}"


def _bytes(value: float) -> str:
    """1.5e9 -> '1.5 GB'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def assigned_reason(
    *,
    row: int,
    stage: int,
    client: int,
    terms: CostTerms,
    clients: Sequence[ClientProfile],
    client_of_row: np.ndarray,
    row_names: Sequence[str],
    settings_weights: tuple[float, float],
) -> str:
    """One line for a solved row: its cost, its rank among the eligible clients, what was excluded.

    ``terms`` are per middle stage (row ``stage`` of its arrays); ``client_of_row`` is the
    whole solution, used to say who took a cheaper client.
    """
    a, b = settings_weights
    cost = terms.cost[stage]
    eligible = terms.eligible[stage]
    chosen = float(cost[client])
    cheaper = np.flatnonzero(eligible & (cost < chosen - 1e-12 * max(abs(chosen), 1.0)))
    parts = [
        f"cost {chosen:.3g} s = {a:g}*transfer {terms.transfer[stage, client]:.3g} + "
        f"{b:g}*compute {terms.compute[stage, client]:.3g}"
    ]
    if cheaper.size == 0:
        parts.append(f"cheapest of {int(eligible.sum())} eligible clients")
    else:
        best = int(cheaper[np.argmin(cost[cheaper])])
        taken = [row_names[r] for r in np.flatnonzero(client_of_row == best).tolist() if r != row]
        parts.append(
            f"rank {cheaper.size + 1} of {int(eligible.sum())} eligible: cheaper {clients[best].client_id} "
            f"is full with {', '.join(taken)} (lowest total cost)"
        )
    too_big = int((~terms.fits[stage]).sum())
    too_slow = int((terms.fits[stage] & ~terms.fast_enough[stage]).sum())
    if too_big or too_slow:
        parts.append(f"excluded: {too_big} lack memory, {too_slow} too slow")
    declared = [name for name in _SPEED_FIELDS if clients[client].is_declared(name)]
    if declared:
        parts.append(f"declared, not measured: {', '.join(declared)}")
    return "; ".join(parts)


def _count(value: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:g}"


def format_table(plan: PartitionPlan) -> str:
    """The plan as aligned text: a summary line, then one row per partition."""
    header = ("pipe", "stage", "layers", "blocks", "params", "client", "compute s", "transfer s", "step s", "why")
    lines = [header]
    for row in plan.assignments:
        lines.append(
            (
                str(row.pipeline),
                str(row.stage),
                f"{row.layer_start}-{row.layer_end}",
                str(row.blocks),
                _count(row.num_params),
                row.client_id,
                f"{row.compute_s:.4g}",
                f"{row.transfer_s:.4g}",
                f"{row.step_s:.4g}",
                row.why,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    if len(set(plan.stage_counts)) == 1:
        cut = f"{plan.num_stages} stage(s) x {len(plan.owners)} pipeline(s), blocks {list(plan.block_counts)}"
    else:
        each = ", ".join(f"p{c.pipeline} {c.owner_id} {list(c.block_counts)}" for c in plan.cuts)
        cut = f"{len(plan.owners)} pipeline(s) cut differently, blocks per stage: {each}"
    text = [
        f"{plan.model_name}: {cut}; solver {plan.solver}, integral={plan.integral} "
        f"(max fractional {plan.max_fractional:.1e}), objective {plan.objective:.4g} s, "
        f"bottleneck {plan.bottleneck_s:.4g} s/step, step {plan.step_s:.4g} s "
        f"(cut estimates {plan.cut_bottleneck_s:.4g} and {plan.cut_step_s:.4g})"
    ]
    for line in lines:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        text.append("  ".join([*cells, line[-1]]))
    return "\n".join(text)
