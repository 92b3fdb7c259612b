"""Local work: what each owner trains per round, and a new member chosen by name without touching the core."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from proto.messages import Evaluation, RoundReport, StepRecord
from server.training.device_limits import OwnerDevice
from server.training.local_work import LOCAL_WORK, FixedSteps, Work
from server.training.seams import seams_for
from server.training.spec import LocalWorkSection, TrainingSection, spec_from_mapping, train_command
from server.training.work import micro_batches_for
from server.training.work_samples import SameSamples
from server.training.work_time import MOST_STEPS_FACTOR, TimeBudget


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

    def plan(self, owners: Mapping[str, OwnerDevice], training: TrainingSection) -> None:
        pass

    def check(self, asked: Work, report: RoundReport) -> None:
        if len(report.steps) > asked.steps:
            raise ValueError("too many steps")

    def record(self, owner: str, report: RoundReport) -> int:
        return report.samples


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


# -- devices of the poster's setting: largest micro-batches 1:2:4:8, speeds 1:1:2:4 -------------------------------

LIMITS = {"a": 1, "b": 2, "c": 4, "d": 8}
SPEEDS = {"a": 1.0, "b": 1.0, "c": 2.0, "d": 4.0}
DEVICES = {o: OwnerDevice(max_micro_batch=LIMITS[o], declared=True, seconds_per_sequence=0.1 / SPEEDS[o]) for o in LIMITS}
TRAINING = TrainingSection(batch_size=8, seq_len=16)


def planned(member: object) -> object:
    member.plan(DEVICES, TRAINING)  # type: ignore[attr-defined]
    return member


def reported(steps: int, *, batch: int, step_s: float = 0.1, seconds: float | None = None) -> RoundReport:
    """A report of ``steps`` steps of ``batch`` sequences, each taking ``step_s`` (the round: ``seconds``)."""
    total = steps * step_s if seconds is None else seconds
    return RoundReport(round=1, steps=(StepRecord(loss=1.0, seconds=step_s),) * steps,
                       evaluation=Evaluation(loss=1.0, perplexity=2.7), samples=steps * batch, data_samples=100,
                       seconds=total)  # fmt: skip


@pytest.mark.parametrize(("batch", "limit", "least", "want"), [(8, 1, 1, 8), (8, 3, 1, 4), (8, 8, 1, 1), (8, 8, 2, 2), (6, 4, 1, 2)])
def test_micro_batches_split_the_batch_evenly_within_the_limit(batch: int, limit: int, least: int, want: int) -> None:
    """The fewest micro-batches (at least the run's) that divide the batch into pieces the device takes."""
    assert micro_batches_for(batch, limit, at_least=least) == want


def test_fixed_steps_micro_batch_the_run_batch_to_each_device() -> None:
    """Strategy 1 at the run's batch: the same steps, and a small device accumulates over micro-batches it takes."""
    steps = planned(FixedSteps(LocalWorkSection(steps=5)))
    assert steps.assign(2, "a") == Work(steps=5, start=5, micro_batches=8)  # type: ignore[attr-defined]
    assert steps.assign(2, "d") == Work(steps=5, start=5)  # type: ignore[attr-defined]
    assert steps.record("a", reported(5, batch=8)) == 100  # type: ignore[attr-defined]  # equal samples: the data held


def test_fixed_steps_at_device_batches_weigh_by_samples_trained() -> None:
    """Strategy 1 at device batches: each owner steps at its largest micro-batch, and its copy weighs by what it trained."""
    steps = planned(FixedSteps(LocalWorkSection(steps=5, batch="device")))
    assert steps.assign(3, "c") == Work(steps=5, start=10, batch_size=4, micro_batches=1)  # type: ignore[attr-defined]
    assert steps.record("c", reported(5, batch=4)) == 20  # type: ignore[attr-defined]


def test_samples_with_accumulation_give_everyone_the_run_batch() -> None:
    """2a: samples / batch_size steps for everyone, each split into micro-batches of the owner's limit."""
    work = planned(SameSamples(LocalWorkSection(mode="samples", samples=32)))
    got = {o: work.assign(2, o) for o in LIMITS}  # type: ignore[attr-defined]
    assert {o: (w.steps, w.start, w.batch_size, w.micro_batches) for o, w in got.items()} == {
        "a": (4, 4, 8, 8), "b": (4, 4, 8, 4), "c": (4, 4, 8, 2), "d": (4, 4, 8, 1)
    }


def test_samples_without_accumulation_take_more_steps_on_small_devices() -> None:
    """2b: one step per micro-batch of the owner's limit, so the same 32 samples are 32, 16, 8 and 4 steps."""
    work = planned(SameSamples(LocalWorkSection(mode="samples", samples=32, accumulate=False)))
    got = {o: work.assign(3, o) for o in LIMITS}  # type: ignore[attr-defined]
    assert {o: (w.steps, w.start, w.batch_size, w.micro_batches) for o, w in got.items()} == {
        "a": (32, 64, 1, 1), "b": (16, 32, 2, 1), "c": (8, 16, 4, 1), "d": (4, 8, 8, 1)
    }
    # Every copy trained 32 sequences and weighs the same.
    assert {work.record(o, reported(w.steps, batch=w.batch_size)) for o, w in got.items()} == {32}  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"31 step\(s\), 32 were asked"):
        work.check(got["a"], reported(31, batch=1))  # type: ignore[attr-defined]


def test_samples_default_to_steps_times_the_batch() -> None:
    """Without [local_work] samples, an owner trains steps x batch_size sequences a round."""
    work = planned(SameSamples(LocalWorkSection(mode="samples", steps=3, accumulate=False)))
    assert work.assign(1, "b").steps == 12  # type: ignore[attr-defined]  # 24 sequences in steps of 2


def test_the_first_time_budget_comes_from_the_profiles() -> None:
    """Round 1: steps x each owner's batch x its guessed seconds per sequence, averaged over the owners."""
    work = planned(TimeBudget(LocalWorkSection(mode="time", steps=10, batch="device")))
    guesses = [10 * LIMITS[o] * 0.1 / SPEEDS[o] for o in LIMITS]  # 1, 2, 2, 2 seconds
    first = work.assign(1, "a")  # type: ignore[attr-defined]
    assert first.time_budget_s == pytest.approx(sum(guesses) / 4)
    assert (first.steps, first.start, first.batch_size) == (10 * MOST_STEPS_FACTOR, 0, 1)
    assert work.assign(1, "d").time_budget_s == first.time_budget_s  # type: ignore[attr-defined]  # one budget per round


def test_later_time_budgets_come_from_the_measured_steps_and_streams_continue() -> None:
    """After a round: steps x the owner's measured step time plus its evaluation, averaged; each stream goes on after the steps used."""
    work = planned(TimeBudget(LocalWorkSection(mode="time", steps=10)))
    first = work.assign(1, "a")  # type: ignore[attr-defined]
    assert (first.batch_size, first.micro_batches) == (8, 8)
    assert work.record("a", reported(3, batch=8, step_s=0.5, seconds=2.0)) == 24  # type: ignore[attr-defined]
    assert work.record("d", reported(12, batch=8, step_s=0.1, seconds=1.5)) == 96  # type: ignore[attr-defined]
    # a: 10 x 0.5 + 0.5 (evaluation) = 5.5; d: 10 x 0.1 + 0.3 = 1.3
    assert work.assign(2, "a").time_budget_s == pytest.approx((5.5 + 1.3) / 2)  # type: ignore[attr-defined]
    assert (work.assign(2, "a").start, work.assign(2, "d").start, work.assign(2, "b").start) == (3, 12, 0)  # type: ignore[attr-defined]


def test_a_fixed_time_budget_and_its_checks() -> None:
    """[local_work] seconds fixes the budget; a report needs between one step and the most asked."""
    work = planned(TimeBudget(LocalWorkSection(mode="time", seconds=7.5)))
    asked = work.assign(4, "c")  # type: ignore[attr-defined]
    assert asked.time_budget_s == 7.5
    work.check(asked, reported(1, batch=8))  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="0 step"):
        work.check(asked, reported(0, batch=8))  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="between 1 and"):
        work.check(asked, reported(asked.steps + 1, batch=8))  # type: ignore[attr-defined]


def test_a_time_budget_without_speeds_asks_for_seconds() -> None:
    """No FLOP/s in a profile and nothing measured yet: the first budget cannot be sized, and the error names the key."""
    work = TimeBudget(LocalWorkSection(mode="time"))
    work.plan({"a": OwnerDevice(max_micro_batch=2, declared=False, seconds_per_sequence=0.0)}, TRAINING)
    with pytest.raises(ValueError, match=r"\[local_work\] seconds"):
        work.assign(1, "a")


def test_time_budget_travels_in_the_train_command() -> None:
    """The Train command carries the member's batch, micro-batches and budget."""
    spec = spec_from_mapping({"local_work": {"mode": "time", "seconds": 3.0, "batch": "device"}, "training": {"batch_size": 8}})
    local_work = seams_for(spec).local_work
    local_work.plan(DEVICES, spec.training)
    train = train_command(spec, bridge_run="p0", round=1, work=local_work.assign(1, "b"), model="m")
    assert (train.batch_size, train.micro_batches, train.time_budget_s) == (2, 1, 3.0)


@pytest.mark.parametrize(
    ("values", "message"),
    [({"batch": "huge"}, "batch must be"), ({"seconds": -1.0}, "seconds must be"), ({"samples": -2}, "samples must be"),
     ({"accumulate": "yes"}, "accumulate must be")],
)  # fmt: skip
def test_bad_local_work_keys_are_refused(values: dict[str, object], message: str) -> None:
    """Each new [local_work] key is checked with a message naming it."""
    with pytest.raises(ValueError, match=message):
        spec_from_mapping({"local_work": values})
