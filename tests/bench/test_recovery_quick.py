"""bench/recovery.py: its settings and its last line (the trials themselves run the machinery that
tests/server/test_recovery_system.py checks over real processes, which a second federation here
would only repeat)."""

from __future__ import annotations

import math
import re

import pytest

from bench.recovery import RecoverySettings, Trial, _parse, summary_line

LINE = re.compile(
    r"^trials=(\d+) completed=(\d+) detect_s_max=(\S+) recover_s_p50=(\S+) recover_s_max=(\S+) "
    r"redo_steps_mean=(\S+) final_max_diff=(\S+)$"
)


def trial(recover_s: float, *, completed: bool = True, diff: float = 0.0) -> Trial:
    return Trial(kill_round=1, kill_step=2, victim="helper0", completed=completed, detect_s=recover_s / 4,
                 recover_s=recover_s, redo_steps=int(recover_s), final_diff=diff)  # fmt: skip


def test_the_last_line_has_every_figure_the_issue_names() -> None:
    """Counts, the slowest detection, the median and slowest recovery, mean steps redone, the largest difference."""
    line = summary_line([trial(2.0), trial(4.0, diff=3e-7), trial(3.0)])
    match = LINE.match(line)
    assert match is not None, line
    assert match.groups() == ("3", "3", "1", "3", "4", "3", "3e-07")


def test_a_trial_that_did_not_complete_is_counted_and_makes_the_difference_infinite() -> None:
    """completed < trials, and final_max_diff says the run's model was never compared."""
    match = LINE.match(summary_line([trial(2.0), trial(0.0, completed=False, diff=math.inf)]))
    assert match is not None and match.group(1, 2) == ("2", "1") and match.group(7) == "inf"


def test_quick_and_flags_choose_the_settings() -> None:
    """--quick is 2 trials of 6 steps; --trials and --steps override; a kill needs two steps at least."""
    assert _parse(["--quick"]) == RecoverySettings(trials=2, steps=6)
    assert _parse(["--trials", "4", "--steps", "9"]) == RecoverySettings(trials=4, steps=9)
    with pytest.raises(SystemExit):
        _parse(["--steps", "1"])
