"""Local work: what each owner trains per round, and a new member chosen by name without touching the core."""

from __future__ import annotations

import pytest

from proto.messages import Evaluation, RoundReport, StepRecord
from server.training.local_work import LOCAL_WORK, FixedSteps, Work
from server.training.seams import seams_for
from server.training.spec import LocalWorkSection, spec_from_mapping, train_command


@pytest.mark.parametrize(("round", "start"), [(1, 0), (2, 5), (4, 15)])
def test_fixed_steps_continue_the_stream_each_round(round: int, start: int) -> None:
    """``steps``: every owner trains ``steps`` steps, round r from batch (r - 1) * steps."""
    assert FixedSteps(LocalWorkSection(steps=5)).assign(round, "alice") == Work(steps=5, start=start)


def test_steps_per_round_is_the_steps_of_fixed_steps() -> None:
    """The flat key steps_per_round sets [local_work] steps, which the Train command carries."""
    spec = spec_from_mapping({"steps_per_round": 4})
    work = seams_for(spec).local_work.assign(2, "alice")
    train = train_command(spec, bridge_run="p0", round=2, work=work, model="m")
    assert (train.round, train.steps, train.start) == (2, 4, 4)


class Halving:
    """A toy member: each round half the steps of the one before (at least one), from where that one ended."""

    name = "halving"

    def __init__(self, settings: LocalWorkSection) -> None:
        self.first = settings.steps

    def assign(self, round: int, owner: str) -> Work:
        sizes = [max(self.first >> r, 1) for r in range(round)]
        return Work(steps=sizes[-1], start=sum(sizes[:-1]))

    def check(self, asked: Work, report: RoundReport) -> None:
        if len(report.steps) > asked.steps:
            raise ValueError("too many steps")


def test_a_new_member_is_one_registry_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A member added to LOCAL_WORK is chosen by [local_work] mode and decides the Train command's steps and start."""
    monkeypatch.setitem(LOCAL_WORK, "halving", Halving)
    spec = spec_from_mapping({"local_work": {"mode": "halving", "steps": 8}})
    local_work = seams_for(spec).local_work
    train = train_command(spec, bridge_run="p0", round=3, work=local_work.assign(3, "alice"), model="m")
    assert (train.steps, train.start) == (2, 12)
    report = RoundReport(round=3, steps=(StepRecord(loss=1.0),) * 3, evaluation=Evaluation(loss=1.0, perplexity=2.7))
    with pytest.raises(ValueError, match="too many"):
        local_work.check(local_work.assign(3, "alice"), report)
