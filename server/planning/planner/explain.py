"""Why each partition went where it went, and the plan as a table a person can read."""

from __future__ import annotations

from collections.abc import Sequence

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
    text = [
        f"{plan.model_name}: {plan.num_stages} stage(s) x {len(plan.owners)} pipeline(s), blocks "
        f"{list(plan.block_counts)}; solver {plan.solver}, integral={plan.integral} "
        f"(max fractional {plan.max_fractional:.1e}), objective {plan.objective:.4g} s, "
        f"bottleneck {plan.bottleneck_s:.4g} s/step, step {plan.step_s:.4g} s "
        f"(cut estimates {plan.cut_bottleneck_s:.4g} and {plan.cut_step_s:.4g})"
    ]
    for line in lines:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        text.append("  ".join([*cells, line[-1]]))
    return "\n".join(text)
