"""What one owner trains in one round (:class:`Work`), and the pieces local-work members share.

Kept apart from :mod:`server.training.local_work` (the seam and its registry) so that each
member's module can use them without importing the registry that imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

from proto.messages import RoundReport

__all__ = ["Work", "check_step_count", "micro_batches_for", "training_seconds"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Work:
    """What one owner trains in one round: the per-owner fields of its ``Train`` command."""

    steps: int  # optimizer steps this round (with a time budget: the most it may take)
    start: int  # the first batch of the owner's stream this round (batches of batch_size used before it)
    batch_size: int = 0  # sequences per optimizer step; 0: the run's [training] batch_size
    micro_batches: int = 0  # micro-batches per step (gradients accumulate over them); 0: the run's
    time_budget_s: float = 0.0  # > 0: train until the round has taken this long, at least one step


def micro_batches_for(batch_size: int, max_micro_batch: int, *, at_least: int = 1) -> int:
    """The fewest micro-batches, ``at_least`` or more, that split ``batch_size`` evenly into pieces of ``max_micro_batch`` or fewer."""
    for count in range(max(at_least, 1), batch_size + 1):
        if batch_size % count == 0 and batch_size // count <= max_micro_batch:
            return count
    return batch_size  # one sequence per micro-batch: the least any device can take


def check_step_count(report: RoundReport, *, least: int, most: int) -> None:
    """ValueError unless the report (network input) holds ``least`` to ``most`` step records."""
    count = len(report.steps)
    if least == most and count != most:
        raise ValueError(f"the round report has {count} step(s), {most} were asked")
    if not least <= count <= most:
        raise ValueError(f"the round report has {count} step(s), between {least} and {most} were asked")


def training_seconds(report: RoundReport) -> tuple[float, float]:
    """``(mean seconds per step, seconds after the steps)`` of a checked report (the second: its evaluation)."""
    spent = sum(s.seconds for s in report.steps)
    return spent / max(len(report.steps), 1), max(report.seconds - spent, 0.0)
