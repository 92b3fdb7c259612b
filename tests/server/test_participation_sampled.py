"""Sampled participation: how many owners train each round, which ones, and that the draw repeats with the seed."""

from __future__ import annotations

import pytest

from server.training.participation import Sampled, build_participation
from server.training.seams import seams_for
from server.training.spec import ParticipationSection, spec_from_mapping

RUNS = ["p0", "p1", "p2", "p3"]


def sampled(*, fraction: float = 0.0, count: int = 0, seed: int = 0) -> Sampled:
    """A sampled mode sized by ``fraction`` or ``count``."""
    return Sampled(ParticipationSection(mode="sampled", fraction=fraction, count=count), seed=seed)


def subsets(mode: Sampled, rounds: int, runs: list[str] = RUNS) -> list[tuple[str, ...]]:
    """The one turn of each of rounds 1..``rounds``."""
    out = []
    for round in range(1, rounds + 1):
        turns = mode.turns(round, runs)
        assert len(turns) == 1, "a sampled round is one turn"
        out.append(turns[0])
    return out


@pytest.mark.parametrize(
    ("fraction", "owners", "size"),
    [
        (0.5, 4, 2),
        (0.5, 3, 2),  # 1.5 rounds up: a share never trains fewer owners than it names
        (0.34, 3, 2),
        (0.25, 4, 1),
        (0.1, 4, 1),  # 0.4 rounds up to one owner
        (0.001, 1, 1),
        (1.0, 4, 4),
        (0.1, 30, 3),  # 0.1 * 30 is 3.0000000000000004 in floating point: still 3
        (0.7, 10, 7),  # 7.000000000000001
    ],
)
def test_a_fraction_trains_the_owners_it_names_rounded_up(fraction: float, owners: int, size: int) -> None:
    """ceil(fraction * owners) owners train each round, at least one, with floating-point noise ignored."""
    mode = sampled(fraction=fraction)
    runs = [f"p{i}" for i in range(owners)]
    assert mode.size(owners) == size
    assert all(len(subset) == size for subset in subsets(mode, 10, runs))


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_a_count_trains_that_many_owners(count: int) -> None:
    """count = k trains k owners each round, whatever the number of owners."""
    assert all(len(subset) == count for subset in subsets(sampled(count=count), 10))


def test_a_count_above_the_owners_is_refused() -> None:
    """A plan with fewer owners than count is refused, saying what to set."""
    mode = sampled(count=3)
    mode.check_owners(["a", "b", "c"])
    with pytest.raises(ValueError, match=r"count = 3, but the plan has 2 data owner\(s\).*set count <= 2"):
        mode.check_owners(["a", "b"])
    sampled(fraction=1.0).check_owners(["a"])


def test_the_draw_repeats_with_the_seed() -> None:
    """The same seed draws the same subsets; the seed is the run's, given to the mode when it is built."""
    assert subsets(sampled(fraction=0.5, seed=7), 20) == subsets(sampled(fraction=0.5, seed=7), 20)
    assert subsets(sampled(fraction=0.5, seed=7), 20) != subsets(sampled(fraction=0.5, seed=8), 20)
    run_file = {"seed": 7, "participation": {"mode": "sampled", "fraction": 0.5}}
    first, second = (seams_for(spec_from_mapping(run_file)).participation for _ in range(2))
    assert [first.turns(r, RUNS) for r in range(1, 21)] == [second.turns(r, RUNS) for r in range(1, 21)]
    assert [first.turns(r, RUNS)[0] for r in range(1, 21)] == subsets(sampled(fraction=0.5, seed=7), 20)


def test_the_draw_is_the_documented_one() -> None:
    """Seed 0, half of four owners: the subsets are pinned, so a change of the rule (or of Python's generator) shows."""
    assert subsets(sampled(fraction=0.5), 3) == [("p0", "p2"), ("p1", "p3"), ("p0", "p2")]


def test_rounds_draw_anew_and_every_owner_gets_turns() -> None:
    """Over 20 rounds the subsets vary, every owner trains in some, and each subset is distinct owners in plan order."""
    drawn = subsets(sampled(fraction=0.5, seed=3), 20)
    assert len(set(drawn)) > 1
    assert set().union(*drawn) == set(RUNS)
    for subset in drawn:
        assert len(set(subset)) == len(subset) and list(subset) == sorted(subset, key=RUNS.index)


def test_sampled_keeps_one_optimizer_per_owner_and_merges_copies() -> None:
    """Like parallel: copies merge (server optimizers allowed) and each pipeline keeps its own optimizer state."""
    mode = build_participation(ParticipationSection(mode="sampled", count=2), seed=1)
    assert isinstance(mode, Sampled) and mode.parallel and not mode.shared_optimizer and mode.seed == 1


@pytest.mark.parametrize(
    ("fraction", "count", "message"),
    [
        (0.0, 0, r"needs exactly one of fraction and count, neither is set: fraction = 0.5 trains half"),
        (0.5, 2, r"needs exactly one of fraction and count, both are set"),
    ],
)
def test_exactly_one_of_fraction_and_count_sizes_the_subset(fraction: float, count: int, message: str) -> None:
    """Neither or both of fraction and count is refused, with an example of each."""
    with pytest.raises(ValueError, match=message):
        ParticipationSection(mode="sampled", fraction=fraction, count=count)
