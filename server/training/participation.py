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

    single      one owner; one turn per round                     (case 1)
    sequential  one turn per owner, in order: a hand-over         (case 2)
    parallel    one turn with every owner at once                 (case 3)
    sampled     one turn with a subset of the owners, drawn anew each round
                ([participation] fraction or count; the run's seed and the round number
                seed the draw, so the same run file trains the same subsets)

A pipeline that sat a round out holds an older model: the round machine has every pipeline
of a turn load the global state first, unless that pipeline alone made it (a FedAvg merge of
its one copy in the turn before).

A new member is a class with these attributes and methods (in a module of its own when it
is more than a few lines) plus one line in :data:`PARTICIPATIONS`. It is built from the run
file's ``[participation]`` section and the run's seed; a member with settings of its own
adds them to :class:`server.training.spec.ParticipationSection` and checks them when it is
built (the section builds it to check them), as :class:`Sampled` does.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from server.training.spec import ParticipationSection

__all__ = [
    "CASES",
    "PARTICIPATIONS",
    "Parallel",
    "Participation",
    "Sampled",
    "Sequential",
    "Single",
    "build_participation",
]


class Participation(Protocol):
    """Who trains in each turn of a round."""

    name: str
    parallel: bool  # a merge can hold several copies trained from the same state
    shared_optimizer: bool  # one optimizer state travels with the model (else: one per owner, kept by its pipeline)

    def __init__(self, settings: ParticipationSection, *, seed: int = 0) -> None:
        """Built from the [participation] section and the run's seed (ValueError for settings it cannot use)."""
        ...

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

    def __init__(self, settings: ParticipationSection | None = None, *, seed: int = 0) -> None:
        """Nothing to set."""
        _takes_no_settings(self.name, settings)

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

    def __init__(self, settings: ParticipationSection | None = None, *, seed: int = 0) -> None:
        """Nothing to set."""
        _takes_no_settings(self.name, settings)

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

    def __init__(self, settings: ParticipationSection | None = None, *, seed: int = 0) -> None:
        """Nothing to set."""
        _takes_no_settings(self.name, settings)

    def check_owners(self, owners: Sequence[str]) -> None:
        """Any number of owners."""

    def turns(self, round: int, bridge_runs: Sequence[str]) -> list[tuple[str, ...]]:
        """One turn with every pipeline."""
        return [tuple(bridge_runs)]


class Sampled:
    """A subset of the owners trains each round, each its own copy from the same global model; the copies merge.

    The subset has ``count`` owners, or ``ceil(fraction * owners)`` (a share never trains
    fewer owners than it names; at least one). It is drawn without replacement from a
    generator seeded with the run's seed and the round number, so every round draws anew
    and the same run file (the same owners in the same order) trains the same subsets. The
    drawn pipelines train in plan order.
    """

    name = "sampled"
    parallel = True
    shared_optimizer = False

    def __init__(self, settings: ParticipationSection, *, seed: int = 0) -> None:
        """Exactly one of ``fraction`` and ``count`` sizes the subset."""
        if bool(settings.fraction) == bool(settings.count):
            given = "both are" if settings.fraction else "neither is"
            raise ValueError(
                f"[participation] mode 'sampled' needs exactly one of fraction and count, {given} set: "
                "fraction = 0.5 trains half the owners each round, count = 2 two of them"
            )
        self.fraction = float(settings.fraction)  # share of the owners per round, in (0, 1]; 0 when count sizes it
        self.count = int(settings.count)  # owners per round; 0 when fraction sizes it
        self.seed = seed

    def size(self, owners: int) -> int:
        """How many of ``owners`` train each round."""
        if self.count:
            return self.count
        # Rounded to 9 places first, so 0.1 * 30 (3.0000000000000004) is 3 owners, not 4.
        return max(1, math.ceil(round(self.fraction * owners, 9)))

    def check_owners(self, owners: Sequence[str]) -> None:
        """No more owners asked for each round than the plan has."""
        if self.count > len(owners):
            raise ValueError(
                f"[participation] count = {self.count}, but the plan has {len(owners)} data owner(s) {list(owners)}; "
                f"set count <= {len(owners)}, or a fraction"
            )

    def turns(self, round: int, bridge_runs: Sequence[str]) -> list[tuple[str, ...]]:
        """One turn with this round's subset, in plan order."""
        # A string seed is hashed with SHA-512 (no per-process hash randomisation): every server draws alike.
        rng = random.Random(f"sampled:{self.seed}:{round}")
        drawn = rng.sample(range(len(bridge_runs)), self.size(len(bridge_runs)))
        return [tuple(bridge_runs[i] for i in sorted(drawn))]


def _takes_no_settings(name: str, settings: ParticipationSection | None) -> None:
    """Refuse the subset settings for a mode that trains every owner it has."""
    if settings is not None and (settings.fraction or settings.count):
        raise ValueError(
            f"[participation] fraction and count size the subset mode 'sampled' draws each round; mode {name!r} "
            "draws none: remove them, or set mode = 'sampled'"
        )


#: name -> the mode, built from the run file's [participation] section and the run's seed
PARTICIPATIONS: dict[str, type[Participation]] = {
    "single": Single,
    "sequential": Sequential,
    "parallel": Parallel,
    "sampled": Sampled,
}

#: ``case = N`` in a run file (the keys before sections) -> the mode it means
CASES: dict[int, str] = {1: "single", 2: "sequential", 3: "parallel"}


def build_participation(settings: ParticipationSection, *, seed: int = 0) -> Participation:
    """The mode ``settings.mode`` names, drawing with the run's ``seed`` (ValueError naming the known ones)."""
    if settings.mode not in PARTICIPATIONS:
        raise ValueError(f"[participation] mode must be one of {', '.join(PARTICIPATIONS)}, not {settings.mode!r}")
    return PARTICIPATIONS[settings.mode](settings, seed=seed)
