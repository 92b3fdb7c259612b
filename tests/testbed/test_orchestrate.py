"""Turning the owners' reported step times into per-client figures (no root needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from testbed.orchestrate import ClientReport, RunTiming, report_table, run_timing, with_stage_times


def _row(run_id: str, partition: int, client: str) -> dict[str, Any]:
    return {"run_id": run_id, "partition": partition, "client_id": client, "owner_id": "c0"}


PLAN = {"rows": [_row("p0", 0, "c0"), _row("p0", 1, "c2"), _row("p0", 2, "c3"), _row("p0", 3, "c0")]}


def _report(name: str, partitions: tuple[int, ...], shaped: int | None = 10_000_000) -> ClientReport:
    return ClientReport(name=name, address="10.77.0.10", owner=name == "c0", shaped_bits=shaped, upload_bits=9.5e6,
                        download_bits=9.6e6, link_declared=False, flops_per_s=2e10, compute="unlimited (real)",
                        partitions=partitions)  # fmt: skip


def test_run_timing_maps_each_stage_to_its_holder_weighting_rounds_by_steps() -> None:
    """Stage k of an owner's pipeline goes to the plan row's client, and a 3-step round weighs three times a 1-step one."""
    history = [
        {"round": 1, "bridge_run": "p0", "owner": "c0", "losses": [1.0], "stage_seconds": [0.1, 1.0, 2.0, 0.3], "step_seconds": 4.0},
        {"round": 2, "bridge_run": "p0", "owner": "c0", "losses": [1.0] * 3, "stage_seconds": [0.5, 2.0, 4.0, 0.7],
         "step_seconds": 8.0},
    ]  # fmt: skip
    timing = run_timing([{"run_id": "run-1", "history": history}], PLAN)
    assert timing.steps == 4
    assert timing.step_seconds == pytest.approx((4.0 + 3 * 8.0) / 4)
    assert timing.stage_seconds["c2"] == pytest.approx((1.75,))
    assert timing.stage_seconds["c3"] == pytest.approx((3.5,))
    assert timing.stage_seconds["c0"] == pytest.approx((0.4, 0.6))  # partitions 0 then 3


def test_run_timing_leaves_unreported_stages_unknown() -> None:
    """Owners that send no timing (older clients) leave the step time and every stage time None."""
    history = [{"round": 1, "bridge_run": "p0", "owner": "c0", "losses": [1.0, 0.9]}]
    timing = run_timing([{"run_id": "run-1", "history": history}], PLAN)
    assert timing.step_seconds is None and timing.steps == 0
    assert timing.stage_seconds["c2"] == (None,)


def test_report_table_adds_stage_times_after_a_run_and_marks_unshaped_links() -> None:
    """With timing the table gets a stage s/step column per partition, and a link without tc says unshaped."""
    timing = RunTiming(step_seconds=1.0, steps=5, stage_seconds={"c0": (0.01234, 0.5), "c2": (None,)})
    reports = with_stage_times([_report("c0", (0, 3)), _report("c2", (1,), shaped=None), _report("c1", ())], timing)
    lines = report_table(reports).splitlines()
    assert "stage s/step" in lines[0]
    assert lines[1].split()[-2:] == ["0,3", "0.012,0.500"]
    assert "unshaped" in lines[2] and lines[2].split()[-2:] == ["1", "?"]
    assert lines[3].split()[-2:] == ["-", "-"]


def test_report_table_has_no_stage_column_before_a_run() -> None:
    """Before any run the table shows the links and partitions only."""
    assert "stage s/step" not in report_table([_report("c0", (0, 3))])


def test_report_table_says_when_no_link_is_shaped() -> None:
    """With every link unshaped the note says so instead of claiming tc shaping."""
    table = report_table([_report("c0", (0, 3), shaped=None), _report("c1", (1,), shaped=None)])
    assert "links: unshaped" in table and "shaped with tc" not in table


def test_command_lines_survive_tokens_that_begin_with_a_dash(tmp_path: Path) -> None:
    """A random URL-safe token can begin with "-": the server, client and CLI command lines still parse it."""
    from client.cli import build_parser as client_parser
    from server.cli import build_parser as server_parser
    from testbed.orchestrate import Testbed, TestbedSettings

    bed = Testbed(TestbedSettings(rates_bits=(None, None), work_dir=tmp_path, tag="tdash"), log=lambda s: None)
    bed.join_token, bed.admin_token = "-Join_tok", "--admin-tok"
    server_argv = bed.server_argv(tmp_path / "model")
    args = server_parser().parse_args(server_argv[server_argv.index("server.cli") + 1 :])
    assert args.join_token == ["-Join_tok"] and args.admin_token == "--admin-tok"
    client_argv = bed.client_argv(0, bed.topology.clients[0])
    args = client_parser().parse_args(client_argv[client_argv.index("client.cli") + 1 :])
    assert args.token == "-Join_tok"


def test_run_timing_matches_stages_by_owner_after_the_plan_is_redone() -> None:
    """A run that ends retires its plan: the plan served afterwards has new bridge runs, and stages still match by owner."""
    history = [{"round": 1, "bridge_run": "p0", "owner": "c0", "losses": [1.0], "stage_seconds": [0.1, 1.0, 2.0, 0.3]}]
    redone = {"rows": [_row("p9", 0, "c0"), _row("p9", 1, "c2"), _row("p9", 2, "c3"), _row("p9", 3, "c0")]}
    timing = run_timing([{"run_id": "run-1", "history": history}], redone)
    assert timing.stage_seconds["c2"] == pytest.approx((1.0,)) and timing.stage_seconds["c0"] == pytest.approx((0.1, 0.3))
