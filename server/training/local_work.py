"""How much each data owner trains in a round: the LocalWork seam.

Once the plan's pipelines are known the run manager tells the run's one :class:`LocalWork`
what each owner's device can do (:meth:`LocalWork.plan`: its largest micro-batch and a
guess of its speed, :mod:`server.training.device_limits`) and how the run trains a step
(the ``[training]`` section). Every round it asks what an owner trains
(:meth:`LocalWork.assign` gives the :class:`Work` that fills the owner's ``Train``
command: steps, start, batch size, micro-batches, time budget), hands it the owner's
report to check against what was asked (:meth:`LocalWork.check`), and then to take into
account (:meth:`LocalWork.record`), which returns the weight the owner's copy gets in
the merge: the samples behind it. It never asks which member it holds.

Members (``[local_work] mode``; the poster "Federated LLM Training with Heterogeneous
Mobile Clients" numbers them 1, 2a, 2b and 3)::

    steps    (1) a fixed number of optimizer steps per owner and round ([local_work] steps);
             round r starts at batch (r - 1) * steps of the owner's stream, so a resumed run
             continues where the checkpointed round ended
    samples  (2a, accumulate = true) the same samples per owner and round, in steps of the
             run's batch, each split into micro-batches the owner's device takes;
             (2b, accumulate = false) the same samples in optimizer steps of the owner's
             largest micro-batch, so a smaller device takes more, smaller steps
             (server.training.work_samples)
    time     (3) a wall-time budget per round that every owner trains until it is spent,
             at least one step (server.training.work_time)

``batch = "device"`` makes ``steps`` and ``time`` train each owner at its own largest
micro-batch instead of ``[training] batch_size``; with ``batch = "run"`` a batch larger than
an owner's device takes is split into micro-batches it takes (gradients accumulate).

Weights: ``steps`` at the run's batch gives every owner the same samples, and its copies
weigh by the training sequences each owner holds (FedAvg's ``n_k``, as before local work
could differ); every other choice weighs each copy by the sequences it trained that round.

A new member is a class with these methods, in a module of its own, plus one line in
:data:`LOCAL_WORK`; its settings are fields of :class:`server.training.spec.LocalWorkSection`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from proto.messages import RoundReport
from server.training.device_limits import OwnerDevice
from server.training.work import Work, check_step_count, micro_batches_for
from server.training.work_samples import SameSamples
from server.training.work_time import TimeBudget

if TYPE_CHECKING:
    from server.training.spec import LocalWorkSection, TrainingSection

__all__ = ["LOCAL_WORK", "FixedSteps", "LocalWork", "Work", "build_local_work"]


class LocalWork(Protocol):
    """How much each owner trains per round."""

    name: str

    def plan(self, owners: Mapping[str, OwnerDevice], training: TrainingSection) -> None:
        """The plan's owners and their devices, and how the run trains a step (before round 1)."""
        ...

    def assign(self, round: int, owner: str) -> Work:
        """What ``owner`` trains in round ``round`` (1-based)."""
        ...

    def check(self, asked: Work, report: RoundReport) -> None:
        """Raise ValueError when ``report`` (network input) is not the work that was asked."""
        ...

    def record(self, owner: str, report: RoundReport) -> int:
        """Take ``owner``'s checked report into account; the weight of its copy in the merge."""
        ...


class FixedSteps:
    """The same number of optimizer steps for every owner in every round."""

    name = "steps"

    def __init__(self, settings: LocalWorkSection) -> None:
        self.steps = settings.steps  # optimizer steps per owner and round
        self.device_batch = settings.batch == "device"  # each owner's batch is its largest micro-batch
        self.owners: dict[str, OwnerDevice] = {}
        self.batch_size = 0  # the run's (0 before plan: the Train command takes the run's own)
        self.micro_batches = 0

    def plan(self, owners: Mapping[str, OwnerDevice], training: TrainingSection) -> None:
        """Remember each owner's limit and the run's batch."""
        self.owners = dict(owners)
        self.batch_size, self.micro_batches = training.batch_size, training.micro_batches

    def assign(self, round: int, owner: str) -> Work:
        """``steps`` steps from where the previous round ended, in batches the owner's device takes."""
        device = self.owners.get(owner)
        if device is None or self.batch_size == 0:
            return Work(steps=self.steps, start=(round - 1) * self.steps)
        if self.device_batch:
            return Work(
                steps=self.steps,
                start=(round - 1) * self.steps,
                batch_size=device.max_micro_batch,
                micro_batches=1,
            )
        micro = micro_batches_for(self.batch_size, device.max_micro_batch, at_least=self.micro_batches)
        return Work(
            steps=self.steps,
            start=(round - 1) * self.steps,
            micro_batches=0 if micro == self.micro_batches else micro,
        )

    def check(self, asked: Work, report: RoundReport) -> None:
        """The report has one record per step asked."""
        check_step_count(report, least=asked.steps, most=asked.steps)

    def record(self, owner: str, report: RoundReport) -> int:
        """The owner's training sequences (every owner trained the same samples), or those it trained (device batches)."""
        return report.samples if self.device_batch else report.data_samples


#: name -> the member, built from the run file's [local_work] section
LOCAL_WORK: dict[str, Callable[[LocalWorkSection], LocalWork]] = {
    "steps": FixedSteps,
    "samples": SameSamples,
    "time": TimeBudget,
}


def build_local_work(settings: LocalWorkSection) -> LocalWork:
    """The member ``settings.mode`` names (ValueError naming the known ones)."""
    if settings.mode not in LOCAL_WORK:
        raise ValueError(f"[local_work] mode must be one of {', '.join(LOCAL_WORK)}, not {settings.mode!r}")
    return LOCAL_WORK[settings.mode](settings)
