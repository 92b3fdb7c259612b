"""--compare-topology: the run file written per path, the server's planning step, the closing line."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from server.training.spec import load_run_spec
from testbed import cli, topology

RUN_FILE = Path(__file__).resolve().parents[2] / "testbed" / "topology-run.toml"


def test_each_variant_changes_only_the_path_and_stays_a_valid_run_file(tmp_path: Path) -> None:
    """The chained and relayed variants parse as run files and differ from the original only in path."""
    run = topology.read_run_file(RUN_FILE)
    for path in ("chain", "relay"):
        variant = tmp_path / f"{path}.toml"
        variant.write_text(topology.dump_toml(topology.with_path(run, path)))
        written = tomllib.loads(variant.read_text())
        assert written["training"].pop("path") == path
        assert written == run
        assert load_run_spec(variant).training.path == path


def test_nested_tables_and_values_survive_the_writer() -> None:
    """Strings with quotes, lists, booleans, floats and sub-tables read back equal."""
    data = {"name": 'a "b"', "owners": ["c0", "c1"], "communication": {"error_feedback": True,
            "clients": {"c1": {"upload_density": 0.25}}}, "lr": 1e-4}  # fmt: skip
    assert tomllib.loads(topology.dump_toml(data)) == data


def test_server_plans_for_the_runs_step() -> None:
    """[planning] takes batch_size x seq_len tokens, the micro-batches and the steps of a round from the run."""
    config = tomllib.loads(topology.planning_config(topology.read_run_file(RUN_FILE)))
    assert config == {
        "planning": {"seq_len": 128, "batch_tokens": 16 * 128, "micro_batches": 1, "steps_per_round": 6}
    }


def test_topology_line_states_both_steps_their_ratio_and_the_estimate_error() -> None:
    """The closing line is step_s_chain, step_s_star, chain/star and |est - measured| / measured in %."""
    assert (
        topology.topology_line(2.0, 4.0, 2.5)
        == "step_s_chain=2.0000 step_s_star=4.0000 ratio=0.50 est_error_pct=25.0"
    )
    assert (
        topology.topology_line(None, 4.0, 2.5) == "step_s_chain=? step_s_star=4.0000 ratio=? est_error_pct=?"
    )


def test_estimate_is_read_from_the_plan_summary() -> None:
    """The first owner's estimate for the path, or None when the plan carries none."""
    plan = {"owners": ["c0"], "summary": {"est_step_s": {"c0": {"relay": 3.0, "chain": 1.5}}}}
    assert topology.estimated_step_s(plan, "chain") == 1.5
    assert topology.estimated_step_s({"owners": ["c0"], "summary": {}}, "chain") is None


def test_compare_topology_needs_a_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--compare-topology without --run ends with status 2 before anything is created."""
    argv = [
        "up",
        "--clients",
        "1",
        "--bandwidth",
        "10mbit",
        "--compare-topology",
        "--work-dir",
        str(tmp_path),
    ]
    assert cli.main(argv) == 2
    assert "--run" in capsys.readouterr().err


def test_small_vocabulary_is_gpt2_with_fewer_merges() -> None:
    """The truncated tokenizer round-trips text with ids below its size, sharing GPT-2's first ids."""
    from autograd_bridge.models import gpt2_tokenizer
    from testbed.tiny_model import truncated_gpt2_tokenizer

    small, full = truncated_gpt2_tokenizer(512), gpt2_tokenizer()
    text = "Owner 3 line 12: the quick brown fox jumps over the lazy dog."
    ids = small(text)["input_ids"]
    assert len(small) == 512 and max(ids) < 512 and small.eos_token_id == 511
    assert small.decode(ids) == text
    assert len(ids) > len(full(text)["input_ids"])  # fewer merges: more, shorter tokens
    assert small.convert_ids_to_tokens(list(range(300))) == full.convert_ids_to_tokens(list(range(300)))
