"""Idle accounting: busy, bubble and waiting time per device, computed by hand from a turn's timings."""

from __future__ import annotations

import pytest

from server.observe.tables import idle_table
from server.training.idle import PipelineTiming, per_round_idle, turn_idle
from server.training.reports import per_round


def test_owner_and_helper_of_a_three_stage_pipeline() -> None:
    """The owner waits for its helper's stage (its bubble); the helper works that long and idles the rest; both wait for the slowest pipeline."""
    # alice: 4 steps, per step 0.1 s on stage 0, 0.5 s on stage 1 (helper), 0.2 s on stage 2; active 3 s of a 4 s turn.
    alice = PipelineTiming(owner="alice", active_s=3.0, steps=4, stage_seconds=(0.1, 0.5, 0.2),
                           holders={0: "alice", 1: "helper", 2: "alice"})  # fmt: skip
    carol = PipelineTiming(owner="carol", active_s=4.0, steps=2, stage_seconds=(1.5,), holders={0: "carol"})
    got = turn_idle(4.0, [alice, carol])
    assert got["alice"]["busy_s"] == pytest.approx(1.0) and got["alice"]["bubble_s"] == pytest.approx(2.0)
    assert got["alice"]["wait_s"] == pytest.approx(1.0) and got["alice"]["idle"] == pytest.approx(0.75)
    assert got["helper"]["busy_s"] == pytest.approx(2.0) and got["helper"]["bubble_s"] == pytest.approx(1.0)
    assert got["helper"]["wait"] == pytest.approx(0.25) and got["helper"]["role"] == "helper"
    assert got["carol"]["busy"] == pytest.approx(1.0) and got["carol"]["idle"] == 0.0
    for figures in got.values():
        assert figures["busy"] + figures["bubble"] + figures["wait"] == pytest.approx(1.0)


def test_a_helper_of_two_pipelines_adds_its_work() -> None:
    """A device serving two owners is busy for both and active as long as the longer one."""
    one = PipelineTiming(
        owner="a", active_s=2.0, steps=1, stage_seconds=(0.2, 0.6, 0.2), holders={0: "a", 1: "h", 2: "a"}
    )
    two = PipelineTiming(
        owner="b", active_s=1.0, steps=1, stage_seconds=(0.2, 0.3, 0.2), holders={0: "b", 1: "h", 2: "b"}
    )
    got = turn_idle(2.0, [one, two])["h"]
    assert (
        got["busy_s"] == pytest.approx(0.9) and got["bubble_s"] == pytest.approx(1.1) and got["wait_s"] == 0.0
    )


def test_rounds_count_each_device_once_per_turn() -> None:
    """per_round sums a device's seconds over a round's turns, once each even when two entries of a turn carry it."""

    def fig(wall: float, busy: float, wait: float) -> dict[str, float]:
        return {"wall_s": wall, "busy_s": busy, "bubble_s": 0.0, "wait_s": wait}

    history = [
        {
            "round": 1,
            "turn": 0,
            "owner": "a",
            "val_loss": 1.0,
            "ppl": 2.7,
            "idle": {"a": fig(2, 2, 0), "h": fig(2, 1, 1)},
        },
        {
            "round": 1,
            "turn": 0,
            "owner": "b",
            "val_loss": 1.0,
            "ppl": 2.7,
            "idle": {"b": fig(2, 1, 1), "h": fig(2, 1, 1)},
        },
        {"round": 1, "turn": 1, "owner": "a", "val_loss": 1.0, "ppl": 2.7, "idle": {"a": fig(6, 3, 3)}},
    ]
    idle = per_round_idle(history)[1]
    assert (
        idle["a"]["wait"] == pytest.approx(3 / 8)
        and idle["h"]["idle"] == pytest.approx(0.5)
        and idle["b"]["busy"] == 0.5
    )
    (entry,) = per_round(history)
    assert entry["idle"] == idle
    table = idle_table({"per_round": [entry]})
    assert "waiting" in table and "37.5 %" in table
