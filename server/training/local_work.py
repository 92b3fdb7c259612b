"""How much each data owner trains in a round: the LocalWork seam.

The run manager asks the run's one :class:`LocalWork` what an owner trains in a round
(:meth:`LocalWork.assign` gives the :class:`Work` that fills the ``Train`` command's
``steps`` and ``start``), and hands it the owner's report to check against what was asked
(:meth:`LocalWork.check`). It never asks which member it holds.

Members (``[local_work] mode``)::

    steps   a fixed number of optimizer steps per owner and round ([local_work] steps);
            round r starts at batch (r - 1) * steps of the owner's stream, so a resumed run
            continues where the checkpointed round ended

A new member (a number of samples, a time budget) is a class with these methods, in a
module of its own, plus one line in :data:`LOCAL_WORK`; its settings are fields of
:class:`server.training.spec.LocalWorkSection`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from proto.messages import RoundReport

if TYPE_CHECKING:
    from server.training.spec import LocalWorkSection

__all__ = ["LOCAL_WORK", "FixedSteps", "LocalWork", "Work", "build_local_work"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Work:
    """What one owner trains in one round (the ``steps`` and ``start`` of its Train command)."""

    steps: int  # optimizer steps this round
    start: int  # the first batch of the owner's stream this round (batches used before it)


class LocalWork(Protocol):
    """How much each owner trains per round."""

    name: str

    def assign(self, round: int, owner: str) -> Work:
        """What ``owner`` trains in round ``round`` (1-based)."""
        ...

    def check(self, asked: Work, report: RoundReport) -> None:
        """Raise ValueError when ``report`` (network input) is not the work that was asked."""
        ...


class FixedSteps:
    """The same number of optimizer steps for every owner in every round."""

    name = "steps"

    def __init__(self, settings: LocalWorkSection) -> None:
        self.steps = settings.steps  # optimizer steps per owner and round

    def assign(self, round: int, owner: str) -> Work:
        """``steps`` steps from where the previous round ended."""
        return Work(steps=self.steps, start=(round - 1) * self.steps)

    def check(self, asked: Work, report: RoundReport) -> None:
        """The report has one record per step asked."""
        if len(report.steps) != asked.steps:
            raise ValueError(f"the round report has {len(report.steps)} step(s), {asked.steps} were asked")


#: name -> the member, built from the run file's [local_work] section
LOCAL_WORK: dict[str, Callable[[LocalWorkSection], LocalWork]] = {
    "steps": FixedSteps,
}


def build_local_work(settings: LocalWorkSection) -> LocalWork:
    """The member ``settings.mode`` names (ValueError naming the known ones)."""
    if settings.mode not in LOCAL_WORK:
        raise ValueError(f"[local_work] mode must be one of {', '.join(LOCAL_WORK)}, not {settings.mode!r}")
    return LOCAL_WORK[settings.mode](settings)
