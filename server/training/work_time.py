"""Local work ``time``: every owner trains for the same wall time per round (the poster's strategy 3).

The server sets each round's budget and sends it in the ``Train`` command
(``time_budget_s``); the owner trains until the round, its evaluation included, has taken
that long (:func:`client.training.run_steps` stops at the step boundary nearest to the
budget), at least one step and at most ``64 x steps``. So every pipeline ends at about the
same time, and no owner waits long for the slowest.

The budget is ``[local_work] seconds`` when set (> 0). Otherwise it is what the owners need
on average for ``[local_work] steps`` steps and their evaluation, from the last round each
owner reported (mean seconds per step times ``steps``, plus its evaluation's seconds),
averaged over the owners; before any owner reported, from the device profiles:
``steps x batch x`` the pipeline's guessed seconds per sequence
(:class:`~server.training.device_limits.OwnerDevice`). Every owner of a round gets the same
budget.

Each owner trains at ``batch`` (``"run"``: the run's batch, split into micro-batches its
device takes; ``"device"``: its largest micro-batch). The steps vary per round, so the
member counts the batches each owner used to start the next round after them (a run resumed
from a checkpoint starts the owners' streams afresh). Each copy weighs by the sequences it
trained.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import TYPE_CHECKING

from proto.messages import RoundReport
from server.training.work import Work, check_step_count, micro_batches_for, training_seconds

if TYPE_CHECKING:
    from server.training.device_limits import OwnerDevice
    from server.training.spec import LocalWorkSection, TrainingSection

__all__ = ["MOST_STEPS_FACTOR", "TimeBudget"]

#: An owner takes at most this many times [local_work] steps in one round.
MOST_STEPS_FACTOR = 64


class TimeBudget:
    """Train until the round's wall-time budget is spent."""

    name = "time"

    def __init__(self, settings: LocalWorkSection) -> None:
        self.steps = settings.steps  # the reference steps the budget is sized for
        self.seconds = settings.seconds  # a fixed budget; 0: sized from profiles and measured steps
        self.device_batch = settings.batch == "device"
        self.owners: dict[str, OwnerDevice] = {}
        self.batch_size = self.micro_batches = 0  # the run's
        self.used: dict[str, int] = {}  # owner -> batches of its stream used so far
        self.measured: dict[str, tuple[float, float]] = {}  # owner -> (s per step, evaluation s), last round
        self.budgets: dict[int, float] = {}  # round -> its budget (the same for every owner)

    def plan(self, owners: Mapping[str, OwnerDevice], training: TrainingSection) -> None:
        """Remember each owner's device and the run's batch."""
        self.owners = dict(owners)
        self.batch_size, self.micro_batches = training.batch_size, training.micro_batches

    def batch(self, owner: str) -> tuple[int, int]:
        """``(batch_size, micro_batches)`` of ``owner``'s steps."""
        limit = self.owners[owner].max_micro_batch if owner in self.owners else self.batch_size
        if self.device_batch:
            return limit, 1
        return self.batch_size, micro_batches_for(self.batch_size, limit, at_least=self.micro_batches)

    def budget(self, round: int) -> float:
        """Round ``round``'s budget in seconds (ValueError when neither a setting nor a profile sizes it)."""
        if round not in self.budgets:
            self.budgets[round] = self.seconds or self._sized()
        return self.budgets[round]

    def _sized(self) -> float:
        if self.measured:
            return statistics.fmean(self.steps * step + after for step, after in self.measured.values())
        guesses = [self.steps * self.batch(o)[0] * d.seconds_per_sequence for o, d in self.owners.items()]
        if not guesses or not all(g > 0 for g in guesses):
            raise ValueError(
                "local work 'time' cannot size the first round's budget: a device profile lacks its FLOP/s; "
                "set [local_work] seconds"
            )
        return statistics.fmean(guesses)

    def assign(self, round: int, owner: str) -> Work:
        """The round's budget, from where the owner's last round ended."""
        batch, micro = self.batch(owner)
        return Work(steps=MOST_STEPS_FACTOR * self.steps, start=self.used.get(owner, 0), batch_size=batch,
                    micro_batches=micro, time_budget_s=self.budget(round))  # fmt: skip

    def check(self, asked: Work, report: RoundReport) -> None:
        """At least one step, at most the steps asked."""
        check_step_count(report, least=1, most=asked.steps)

    def record(self, owner: str, report: RoundReport) -> int:
        """Count the batches used and the times measured; the sequences the copy trained."""
        self.used[owner] = self.used.get(owner, 0) + len(report.steps)
        self.measured[owner] = training_seconds(report)
        return report.samples
