"""Plain-text tables of the admin CLI."""

from __future__ import annotations

from server.observe.tables import format_table, plan_table


def test_columns_are_aligned() -> None:
    """Text is left-aligned, numbers right-aligned, every column as wide as its widest cell."""
    text = format_table(["name", "n"], [["a", 1], ["longer", 1234]])
    lines = text.splitlines()
    assert lines[0] == "name        n"
    assert lines[2] == "a           1"
    assert lines[3] == "longer  1,234"


def test_plan_table_without_plan_says_why() -> None:
    """With no plan the table is one line with the reason."""
    assert plan_table({"plan_id": "", "error": "too few clients"}) == "no plan: too few clients"


def test_plan_table_has_one_row_per_partition() -> None:
    """Each partition is a row with its blocks, client and reason."""
    row = {
        "run_id": "plan-1-p0", "partition": 1, "layer_start": 2, "layer_end": 4, "blocks": 2, "params": 1000,
        "client_id": "fast", "local": False, "est_compute_s": 0.5, "est_transfer_s": 0.25, "why": "fastest eligible",
    }
    text = plan_table({"plan_id": "plan-1", "state": "serving", "owners": ["o"], "rows": [row], "summary": {"integral": True}})
    lines = text.splitlines()
    assert lines[0] == "plan-1 (serving; owners: o)"
    assert "partition" in lines[1] and "why" in lines[1]
    assert "2-3" in lines[3] and "fast" in lines[3] and "fastest eligible" in lines[3]
    assert lines[-1] == "integral=True"


def test_plan_table_shows_each_pipelines_stage_count() -> None:
    """Pipelines cut differently: an owner alone has one partition, and the facts give every owner's stages."""
    common = {"params": 1000, "est_compute_s": 0.5, "est_transfer_s": 0.25, "why": "w"}
    rows = [
        {**common, "run_id": "plan-1-p0", "partition": 0, "layer_start": 0, "layer_end": 4, "blocks": 4,
         "client_id": "big", "local": True},
        *[
            {**common, "run_id": "plan-1-p1", "partition": k, "layer_start": start, "layer_end": end,
             "blocks": end - start, "client_id": client, "local": client == "small"}
            for k, (start, end, client) in enumerate([(0, 0, "small"), (0, 4, "helper"), (4, 4, "small")])
        ],
    ]
    summary = {"num_stages": 3, "stages": {"big": 1, "small": 3}}
    text = plan_table({"plan_id": "plan-1", "state": "serving", "owners": ["big", "small"], "rows": rows, "summary": summary})
    lines = text.splitlines()
    assert lines[0] == "plan-1 (serving; owners: big, small)"
    assert lines[3].split()[:4] == ["plan-1-p0", "0", "0-3", "1,000"] and "big (owner)" in lines[3]
    assert [line.split()[1] for line in lines[4:7]] == ["0", "1", "2"]
    assert lines[-1] == "num_stages=3, stages={big: 1, small: 3}"


def test_run_table_shows_step_and_stage_times_when_reported() -> None:
    """A round with timing shows its step time and each stage's; one without shows dashes."""
    from server.observe.tables import run_table

    timed = {"round": 1, "owner": "o", "losses": [2.0, 1.5], "val_loss": 1.4, "ppl": 4.055, "samples": 8,
             "step_seconds": 0.25, "stage_seconds": [0.01, 0.2, 0.04]}
    untimed = {**timed, "round": 2, "step_seconds": None, "stage_seconds": []}
    text = run_table({"run_id": "run-1", "state": "done", "round": 2, "rounds": 2, "history": [timed, untimed]})
    lines = text.splitlines()
    assert "step s" in lines[1] and "s/step per stage" in lines[1]
    assert lines[3].split()[-4:] == ["0.250", "0.010", "0.200", "0.040"]
    assert lines[4].split()[-2:] == ["-", "-"]


def test_run_table_puts_the_plans_estimate_beside_the_measured_step() -> None:
    """Rounds that carry the plan's estimate get an 'est. step s' column naming the path."""
    from server.observe.tables import run_table

    entry = {"round": 1, "owner": "o", "losses": [2.0], "val_loss": 1.4, "ppl": 4.0, "samples": 8,
             "step_seconds": 3.995, "stage_seconds": [], "path": "chain", "est_step_s": 4.1028}  # fmt: skip
    lines = run_table({"run_id": "run-1", "state": "done", "round": 1, "rounds": 1, "history": [entry]}).splitlines()
    assert lines[1].endswith("est. step s")
    assert lines[3].split()[-3:] == ["-", "4.103", "(chain)"]


def test_run_table_lists_what_recovery_did() -> None:
    """Each recovery is a row: round, kind, the client lost, steps redone, seconds until training resumed."""
    from server.observe.tables import run_table

    entry = {"kind": "lost client", "round": 2, "lost": "helper0", "steps_redone": 5, "recover_s": 1.25, "reason": "gone"}
    text = run_table({"run_id": "run-1", "state": "done", "round": 2, "rounds": 2, "history": [], "recoveries": [entry]})
    assert "lost client" in text and "helper0" in text and "1.25" in text
    assert "recovery" not in run_table({"run_id": "run-1", "state": "done", "round": 2, "rounds": 2, "history": []})
