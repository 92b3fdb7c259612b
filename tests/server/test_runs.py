"""Run files: RunSpec from TOML plus flags, its checks, and the Train settings it yields."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.training.aggregation import AGGREGATORS, AggregationSettings, FedAdagrad, FedAvg, FedYogi
from server.training.run_manager import from_peft_names, parse_metrics, per_round, to_peft_names
from server.training.spec import (
    AGGREGATOR_NAMES,
    RunSpec,
    aggregation_settings,
    load_run_spec,
    spec_from_mapping,
    train_settings,
)


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
        ({"optimizer": "adam"}, "optimizer must be .adamw. or .sgd."),
        ({"case": 4}, "case must be 1, 2 or 3"),
        ({"aggregator": "fedadam"}, r"needs case = 3.*merge of one copy is that copy"),
        ({"aggregator": "fedyogi", "case": 2}, r"needs case = 3"),
        ({"aggregator": "fedprox", "case": 3}, "aggregator must be one of fedavg, fedadam, fedyogi, fedadagrad"),
        ({"aggregator": "fedadam", "case": 3, "server_lr": 0.0}, "server_lr must be a finite number > 0"),
        ({"aggregator": "fedadam", "case": 3, "server_tau": float("nan")}, "server_tau must be a finite number > 0"),
        ({"aggregator": "fedadam", "case": 3, "server_beta1": 1.0}, r"server_beta1 must be a number in \[0, 1\)"),
        ({"aggregator": "fedadam", "case": 3, "server_beta2": True}, r"server_beta2 must be a number in \[0, 1\)"),
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


def test_owner_timing_metrics_are_optional_and_checked() -> None:
    """Stage and step seconds pass through when valid, stay absent when not sent, and are refused when negative or not finite."""
    base = '"losses": [1.0], "val_loss": 1.0, "ppl": 2.7, "samples": 8, "seconds": 0.5'
    got = parse_metrics("{" + base + ', "stage_seconds": [0.01, 2, 0.0], "step_seconds": 2.5}')
    assert got["stage_seconds"] == [0.01, 2.0, 0.0] and got["step_seconds"] == 2.5
    assert "stage_seconds" not in parse_metrics("{" + base + "}")
    for bad in ('"stage_seconds": [0.1, -1]', '"stage_seconds": [Infinity]', '"stage_seconds": 0.1',
                '"stage_seconds": [true]', '"step_seconds": NaN', '"step_seconds": "1"'):  # fmt: skip
        with pytest.raises(ValueError, match="_seconds"):
            parse_metrics("{" + base + ", " + bad + "}")


def test_a_run_file_chooses_a_server_optimizer(tmp_path: Path) -> None:
    """A case-3 run file with a server optimizer and its settings yields those aggregation settings."""
    path = tmp_path / "run.toml"
    path.write_text('case = 3\naggregator = "fedyogi"\nserver_lr = 0.05\nserver_beta1 = 0.5\nserver_beta2 = 0.9\nserver_tau = 0.01\n')
    spec = load_run_spec(path)
    assert spec.server_optimizer
    assert aggregation_settings(spec) == AggregationSettings(kind="fedyogi", server_lr=0.05, beta1=0.5, beta2=0.9, tau=0.01)
    built = aggregation_settings(spec).build()
    assert isinstance(built, FedYogi) and (built.lr, built.beta1, built.beta2, built.tau) == (0.05, 0.5, 0.9, 0.01)


def test_flags_can_switch_the_aggregator(tmp_path: Path) -> None:
    """An integer server_lr from TOML is accepted, and an override switches the aggregator to fedadagrad."""
    path = tmp_path / "run.toml"
    path.write_text("case = 3\nserver_lr = 1\n")
    spec = load_run_spec(path, {"aggregator": "fedadagrad"})
    assert isinstance(aggregation_settings(spec).build(), FedAdagrad) and aggregation_settings(spec).server_lr == 1.0


def test_the_default_run_merges_with_fedavg_and_the_aggregation_defaults() -> None:
    """Without aggregation keys a run uses FedAvg, and the server_* defaults are AggregationSettings' own."""
    spec = RunSpec()
    assert not spec.server_optimizer and isinstance(aggregation_settings(spec).build(), FedAvg)
    assert aggregation_settings(RunSpec(case=3, aggregator="fedadam")) == AggregationSettings(kind="fedadam")


def test_run_files_know_every_aggregator_the_server_implements() -> None:
    """The names RunSpec accepts (checked without torch) are exactly server.training.aggregation's."""
    assert AGGREGATOR_NAMES == AGGREGATORS


def test_a_server_optimizer_spec_survives_json() -> None:
    """to_json and spec_from_mapping round-trip the aggregation keys (the admin API carries them so)."""
    spec = RunSpec(case=3, aggregator="fedadam", server_lr=0.1, server_beta1=0.8, server_beta2=0.95, server_tau=1e-4)
    assert spec_from_mapping(spec.to_json()) == spec


def test_stages_auto_means_whatever_the_server_plans() -> None:
    """``stages = "auto"`` is no fixed count; a count below 2 or a string is refused with the choices."""
    import pytest

    from server.training.spec import spec_from_mapping

    assert spec_from_mapping({"stages": "auto"}).stages is None
    assert spec_from_mapping({"stages": 4}).stages == 4
    for bad in (1, "four", True):
        with pytest.raises(ValueError, match='"auto"'):
            spec_from_mapping({"stages": bad})
