"""Participation modes: their turns, their checks, and a new member chosen by name without touching the core."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import pytest

from server.training.participation import (
    PARTICIPATIONS,
    Parallel,
    Sampled,
    Sequential,
    Single,
    build_participation,
)
from server.training.rounds import PipelineInfo, RoundMachine, SendTrain
from server.training.seams import seams_for
from server.training.spec import ParticipationSection, spec_from_mapping

RUNS = ["p0", "p1", "p2"]


def test_single_trains_its_one_pipeline_per_round() -> None:
    """single: one turn with the one pipeline, and exactly one owner."""
    assert Single().turns(1, ["p0"]) == [("p0",)]
    Single().check_owners(["a"])
    with pytest.raises(ValueError, match="exactly one data owner, the plan has 2"):
        Single().check_owners(["a", "b"])


def test_sequential_gives_each_owner_a_turn_in_order() -> None:
    """sequential: one turn per pipeline, in plan order, every round."""
    assert Sequential().turns(1, RUNS) == Sequential().turns(2, RUNS) == [("p0",), ("p1",), ("p2",)]


def test_parallel_trains_every_pipeline_in_one_turn() -> None:
    """parallel: one turn with all pipelines."""
    assert Parallel().turns(1, RUNS) == [("p0", "p1", "p2")]


def test_only_parallel_merges_copies_and_keeps_optimizers_per_owner() -> None:
    """The two facts the run manager reads: whether copies merge, whether the optimizer state travels."""
    facts = {name: (mode.parallel, mode.shared_optimizer) for name, mode in PARTICIPATIONS.items()}
    assert facts == {
        "single": (False, True), "sequential": (False, True), "parallel": (True, False), "sampled": (True, False)
    }  # fmt: skip
    built = {name: build_participation(ParticipationSection(mode=name)) for name in ("single", "sequential", "parallel")}
    assert {name: (mode.parallel, mode.shared_optimizer) for name, mode in built.items()} == {
        name: facts[name] for name in built
    }


class Reverse:
    """A toy member: the owners in turn, last first."""

    name = "reverse"
    parallel = False
    shared_optimizer = True

    def __init__(self, settings: ParticipationSection, *, seed: int = 0) -> None:
        pass

    def check_owners(self, owners: Sequence[str]) -> None:
        pass

    def turns(self, round: int, bridge_runs: Sequence[str]) -> list[tuple[str, ...]]:
        return [(run,) for run in reversed(bridge_runs)]


def test_a_new_member_is_one_registry_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A member added to PARTICIPATIONS is chosen by name in a run file and drives the round machine."""
    monkeypatch.setitem(PARTICIPATIONS, "reverse", Reverse)
    spec = spec_from_mapping({"participation": {"mode": "reverse"}})
    participation = seams_for(spec).participation
    assert isinstance(participation, Reverse)
    machine = RoundMachine(rounds=1, participation=participation)
    pipelines = {run: PipelineInfo(owner=f"o{i}", holders={f"o{i}": (0,)}) for i, run in enumerate(RUNS)}
    for prepare in machine.pipelines_ready(pipelines):
        actions = machine.command_done(prepare.bridge_run, prepare.client_id)  # type: ignore[union-attr]
    assert actions == [SendTrain(client_id="o2", bridge_run="p2", round=1)]


def test_unknown_modes_name_the_known_ones() -> None:
    """build_participation refuses a name not in the registry."""
    with pytest.raises(ValueError, match="single, sequential, parallel"):
        build_participation(SimpleNamespace(mode="everyone"))  # type: ignore[arg-type]  # past the section's own check


def test_sampled_is_chosen_by_name_and_draws_with_the_runs_seed() -> None:
    """A run file's ``[participation] mode = "sampled"`` builds the member with the run's top-level seed."""
    spec = spec_from_mapping({"seed": 11, "participation": {"mode": "sampled", "fraction": 0.5}})
    participation = seams_for(spec).participation
    assert isinstance(participation, Sampled) and participation.seed == 11
    reference = Sampled(ParticipationSection(mode="sampled", fraction=0.5), seed=11)
    assert [participation.turns(r, RUNS) for r in range(1, 6)] == [reference.turns(r, RUNS) for r in range(1, 6)]
