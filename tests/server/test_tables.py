"""Plain-text tables of the admin CLI."""

from __future__ import annotations

from server.tables import format_table, plan_table


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
