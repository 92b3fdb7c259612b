"""titanic-testbed's command line: flags become settings, mistakes become fix-it errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed import cli
from testbed.orchestrate import ClientReport, RunTiming, report_table


def settings(*flags: str):  # type: ignore[no-untyped-def]
    return cli.settings_from_args(cli.build_parser().parse_args(["up", *flags]))


def test_up_flags_become_per_client_settings(tmp_path: Path) -> None:
    """Rates, CPU lists and declared FLOP/s are read one per client; '-' means measured."""
    s = settings("--clients", "3", "--bandwidth", "10mbit,20mbit,1gbit", "--cpus", "0;1;0-1",
                 "--declare-flops", "1e10,-,3e10", "--work-dir", str(tmp_path))  # fmt: skip
    assert s.rates_bits == (10_000_000, 20_000_000, 1_000_000_000)
    assert s.cpus == ("0", "1", "0-1")
    assert s.declare_flops == (1e10, None, 3e10)
    assert s.work_dir == tmp_path


def test_up_refuses_lists_of_the_wrong_length(tmp_path: Path) -> None:
    """A --cpus list that does not match --clients is a user error naming the flag."""
    with pytest.raises(ValueError, match="--cpus"):
        settings("--clients", "2", "--bandwidth", "10mbit", "--cpus", "0", "--work-dir", str(tmp_path))


def test_up_refuses_more_owners_than_clients(tmp_path: Path) -> None:
    """Owners are the first clients, so there cannot be more of them than clients."""
    with pytest.raises(ValueError, match="--owners"):
        settings("--clients", "2", "--bandwidth", "10mbit", "--owners", "3", "--work-dir", str(tmp_path))


def test_main_reports_a_bad_rate_with_status_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A malformed --bandwidth ends with status 2 and the reason, before anything is created."""
    assert cli.main(["up", "--clients", "1", "--bandwidth", "fast", "--work-dir", str(tmp_path)]) == 2
    assert "bad rate" in capsys.readouterr().err


def test_report_table_says_what_is_real_and_what_is_declared() -> None:
    """The table marks declared links and compute, and states that latency is not emulated."""
    report = ClientReport(name="c0", address="10.77.0.10", owner=True, shaped_bits=10_000_000, upload_bits=9.5e6,
                          download_bits=9.6e6, link_declared=True, flops_per_s=2e10, compute="declared",
                          partitions=(0, 3))  # fmt: skip
    table = report_table([report])
    assert "9.5 Mbit/s (declared)" in table
    assert "0,3" in table
    assert "not emulated" in table


def test_bandwidth_none_leaves_links_unshaped(tmp_path: Path) -> None:
    """'none' in --bandwidth gives an unshaped link, alone for every client or per client."""
    assert settings("--clients", "2", "--bandwidth", "none", "--work-dir", str(tmp_path)).rates_bits == (None, None)
    mixed = settings("--clients", "2", "--bandwidth", "10mbit,none", "--work-dir", str(tmp_path))
    assert mixed.rates_bits == (10_000_000, None)


def test_compare_unshaped_needs_a_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--compare-unshaped without --run ends with status 2 before anything is created."""
    argv = ["up", "--clients", "1", "--bandwidth", "10mbit", "--compare-unshaped", "--work-dir", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "--run" in capsys.readouterr().err


def test_comparison_line_gives_both_step_times_and_their_ratio() -> None:
    """The closing line states the shaped and unshaped step times and shaped/unshaped."""
    shaped = RunTiming(step_seconds=3.0, steps=15, stage_seconds={})
    unshaped = RunTiming(step_seconds=0.75, steps=15, stage_seconds={})
    assert cli.comparison_line(shaped, unshaped) == "step_s_shaped=3.0000 step_s_unshaped=0.7500 ratio=4.00"
    assert "ratio=?" in cli.comparison_line(shaped, RunTiming(step_seconds=None, steps=0, stage_seconds={}))
