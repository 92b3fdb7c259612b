"""Which data owners train in a round, and in what order: the Participation seam.

A plan has one pipeline per data owner. A round is a sequence of *turns*: in a turn some
pipelines train from the global model, then the server merges what they trained into the
next global model (one copy merges to itself). A participation mode decides the turns, and
with them two consequences the run manager needs without knowing the mode's name:

* ``parallel``: whether a merge can see several copies trained from the same state. Only
  then is a server optimizer (FedAdam, ...) meaningful: it steps along the copies' mean
  change from that state.
* ``shared_optimizer``: whether one optimizer state follows the model from pipeline to
  pipeline (the owners in turn then train exactly like one process on their batches in
  order), or each pipeline keeps its own moments across merges (the merge averages weights,
  not moments).

Members (``[participation] mode``; ``case = 1, 2, 3`` in a run file is an alias of the first
three)::

    single      one owner; one turn per round              (case 1)
    sequential  one turn per owner, in order: a hand-over  (case 2)
    parallel    one turn with every owner at once          (case 3)

A new member is a class with these attributes and methods (in a module of its own when it
is more than a few lines) plus one line in :data:`PARTICIPATIONS`. It is built from the run
file's ``[participation]`` section, so a member with settings of its own (a sampled
fraction, say) adds them to :class:`server.training.spec.ParticipationSection`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from server.training.spec import ParticipationSection

__all__ = ["CASES", "PARTICIPATIONS", "Parallel", "Participation", "Sequential", "Single", "build_participation"]


class Participation(Protocol):
    """Who trains in each turn of a round."""

    name: str
    parallel: bool  # a merge can hold several copies trained from the same state
    shared_optimizer: bool  # one optimizer state travels with the model (else: one per owner, kept by its pipeline)

    def check_owners(self, owners: Sequence[str]) -> None:
        """Raise ValueError (saying what to set) when this mode cannot train with these data owners."""
        ...

    def turns(self, round: int, bridge_runs: Sequence[str]) -> list[tuple[str, ...]]:
        """The turns of round ``round`` (1-based): the pipelines that train together, in order."""
        ...


class Single:
    """One data owner trains one pipeline; each round is one turn."""

    name = "single"
    parallel = False
    shared_optimizer = True

    def __init__(self, settings: ParticipationSection | None = None) -> None:
        """Nothing to set."""

    def check_owners(self, owners: Sequence[str]) -> None:
        """Exactly one owner."""
        if len(owners) != 1:
            raise ValueError(
                f"participation 'single' (case 1) needs exactly one data owner, the plan has {len(owners)}: "
                f"{list(owners)}; set owners, or [participation] mode = 'sequential' or 'parallel'"
            )

    def turns(self, round: int, bridge_runs: Sequence[str]) -> list[tuple[str, ...]]:
        """The one pipeline."""
        return [tuple(bridge_runs)]


class Sequential:
    """The owners train in turn, each from the model the previous one handed over."""

    name = "sequential"
    parallel = False
    shared_optimizer = True

    def __init__(self, settings: ParticipationSection | None = None) -> None:
        """Nothing to set."""

    def check_owners(self, owners: Sequence[str]) -> None:
        """Any number of owners (one at least, which the run manager checks)."""

    def turns(self, round: int, bridge_runs: Sequence[str]) -> list[tuple[str, ...]]:
        """One turn per pipeline, in plan order."""
        return [(run,) for run in bridge_runs]


class Parallel:
    """Every owner trains its own copy from the same global model; the copies merge once per round."""

    name = "parallel"
    parallel = True
    shared_optimizer = False

    def __init__(self, settings: ParticipationSection | None = None) -> None:
        """Nothing to set."""

    def check_owners(self, owners: Sequence[str]) -> None:
        """Any number of owners."""

    def turns(self, round: int, bridge_runs: Sequence[str]) -> list[tuple[str, ...]]:
        """One turn with every pipeline."""
        return [tuple(bridge_runs)]


#: name -> the mode, built from the run file's [participation] section
PARTICIPATIONS: dict[str, Callable[[ParticipationSection], Participation]] = {
    "single": Single,
    "sequential": Sequential,
    "parallel": Parallel,
}

#: ``case = N`` in a run file (the keys before sections) -> the mode it means
CASES: dict[int, str] = {1: "single", 2: "sequential", 3: "parallel"}


def build_participation(settings: ParticipationSection) -> Participation:
    """The mode ``settings.mode`` names (ValueError naming the known ones)."""
    if settings.mode not in PARTICIPATIONS:
        raise ValueError(f"[participation] mode must be one of {', '.join(PARTICIPATIONS)}, not {settings.mode!r}")
    return PARTICIPATIONS[settings.mode](settings)
