"""Run files: RunSpec from TOML plus flags, its checks, and the Train settings it yields."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.run_manager import from_peft_names, parse_metrics, per_round, to_peft_names
from server.runs import RunSpec, load_run_spec, spec_from_mapping, train_settings


def test_a_run_file_with_flag_overrides(tmp_path: Path) -> None:
    """Values come from the file, flags win, and None flags are ignored."""
    path = tmp_path / "run.toml"
    path.write_text('rounds = 5\nlr = 0.001\nowners = ["a"]\nseq_len = 64\n')
    spec = load_run_spec(path, {"rounds": 2, "seq_len": None})
    assert spec == RunSpec(rounds=2, lr=0.001, owners=("a",), seq_len=64)


def test_unknown_settings_are_named(tmp_path: Path) -> None:
    """A typo in a run file is an error that lists the known settings."""
    with pytest.raises(ValueError, match=r"unknown run setting.*roundz.*known:"):
        spec_from_mapping({"roundz": 3})


def test_invalid_toml_is_a_clear_error(tmp_path: Path) -> None:
    """A file that is not TOML says so."""
    path = tmp_path / "run.toml"
    path.write_text("rounds = = 3")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_run_spec(path)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rounds": 0}, "rounds must be an integer >= 1"),
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"batch_size": 6, "micro_batches": 4}, "multiple of micro_batches"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"optimizer": "sgd"}, "AdamW"),
        ({"case": 4}, "case must be 1, 2 or 3"),
        ({"aggregator": "fedadam"}, "fedavg"),
    ],
)
def test_bad_values_are_refused(values: dict[str, object], message: str) -> None:
    """Each bad value is refused with a message naming the setting."""
    with pytest.raises(ValueError, match=message):
        RunSpec(**values)  # type: ignore[arg-type]


def test_train_settings_continue_the_data_stream() -> None:
    """Round r starts at batch (r - 1) * steps, and the tokenizer defaults to the model."""
    spec = RunSpec(steps_per_round=7)
    settings = train_settings(spec, round=3, model="/models/m")
    assert settings["start"] == 14 and settings["steps"] == 7 and settings["tokenizer"] == "/models/m"


def test_owner_metrics_are_checked() -> None:
    """Metrics from the owner are parsed, and a report missing a number is refused."""
    good = '{"losses": [1, 2.5], "val_loss": 1.0, "ppl": 2.7, "samples": 8, "seconds": 0.5, "val_tokens": 9}'
    assert parse_metrics(good)["losses"] == [1.0, 2.5]
    with pytest.raises(ValueError, match="ppl"):
        parse_metrics('{"losses": [], "val_loss": 1.0, "ppl": NaN, "samples": 8, "seconds": 0.5}')
    with pytest.raises(ValueError, match="not JSON"):
        parse_metrics("done")


def test_per_round_perplexity_is_weighted_by_validation_tokens() -> None:
    """The all-owner perplexity of a round is exp of the token-weighted mean validation loss."""
    history = [
        {"round": 1, "owner": "a", "val_loss": 1.0, "ppl": 2.718, "val_tokens": 30},
        {"round": 1, "owner": "b", "val_loss": 2.0, "ppl": 7.389, "val_tokens": 10},
    ]
    (entry,) = per_round(history)
    assert entry["owners"] == {"a": 2.718, "b": 7.389}
    assert abs(entry["ppl"] - 2.718281828 ** 1.25) < 1e-6


def test_adapter_names_round_trip_through_peft_names() -> None:
    """Adapter names become peft's saved names and back."""
    state = {"model.layers.1.self_attn.q_proj.lora_A.default.weight": 1}
    peft = to_peft_names(state)
    assert list(peft) == ["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    assert from_peft_names(peft) == state
