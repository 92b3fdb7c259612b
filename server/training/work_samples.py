"""Local work ``samples``: every owner trains the same number of sequences per round (the poster's 2a and 2b).

``[local_work] samples`` sequences per owner and round (0: ``steps x [training] batch_size``).

* ``accumulate = true`` (2a): optimizer steps of the run's batch, ``samples / batch_size``
  of them (rounded up), each split into as few micro-batches as the owner's device takes;
  the pipeline accumulates their gradients, so every owner makes the same steps on the
  same amount of data, and a smaller device just takes longer per step.
* ``accumulate = false`` (2b): one optimizer step per micro-batch of the owner's largest
  size, ``ceil(samples / max_micro_batch)`` steps: a smaller device makes more, smaller
  (noisier) steps.

Each owner's batch size is the same in every round, so round ``r`` starts at batch
``(r - 1) * steps`` of its stream, and a resumed run continues where its checkpoint ended.
Each copy weighs by the sequences it trained.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from proto.messages import RoundReport
from server.training.work import Work, check_step_count, micro_batches_for

if TYPE_CHECKING:
    from server.training.device_limits import OwnerDevice
    from server.training.spec import LocalWorkSection, TrainingSection

__all__ = ["SameSamples"]


class SameSamples:
    """The same sequences for every owner and round, with (2a) or without (2b) gradient accumulation."""

    name = "samples"

    def __init__(self, settings: LocalWorkSection) -> None:
        self.settings = settings
        self.accumulate = settings.accumulate
        self.owners: dict[str, OwnerDevice] = {}
        self.samples = 0  # sequences per owner and round, known once planned
        self.batch_size = self.micro_batches = 0  # the run's

    def plan(self, owners: Mapping[str, OwnerDevice], training: TrainingSection) -> None:
        """Fix the samples per round and remember each owner's limit."""
        self.owners = dict(owners)
        self.batch_size, self.micro_batches = training.batch_size, training.micro_batches
        self.samples = self.settings.samples or self.settings.steps * training.batch_size

    def shape(self, owner: str) -> tuple[int, int, int]:
        """``(steps, batch_size, micro_batches)`` of ``owner``'s rounds."""
        if not self.samples:
            raise ValueError("local work 'samples' assigns work only after plan() told it the owners")
        limit = self.owners[owner].max_micro_batch if owner in self.owners else self.batch_size
        if self.accumulate:
            micro = micro_batches_for(self.batch_size, limit, at_least=self.micro_batches)
            return math.ceil(self.samples / self.batch_size), self.batch_size, micro
        batch = min(limit, self.samples)
        return math.ceil(self.samples / batch), batch, 1

    def assign(self, round: int, owner: str) -> Work:
        """The owner's steps of its batch, from where its previous round ended."""
        steps, batch, micro = self.shape(owner)
        return Work(steps=steps, start=(round - 1) * steps, batch_size=batch, micro_batches=micro)

    def check(self, asked: Work, report: RoundReport) -> None:
        """One record per step asked."""
        check_step_count(report, least=asked.steps, most=asked.steps)

    def record(self, owner: str, report: RoundReport) -> int:
        """The sequences the copy trained."""
        return report.samples
