"""Run files: RunSpec from TOML (sections, or the older flat keys) plus flags, its checks, and the commands it yields."""

from __future__ import annotations

from pathlib import Path

import pytest

from proto.messages import Evaluation, PeerBytes, RoundReport, StepRecord
from server.training.aggregation import AGGREGATORS, AggregationSettings, FedAdagrad, FedAvg, FedYogi
from server.training.checkpoints import from_peft_names, to_peft_names
from server.training.local_work import FixedSteps, Work
from server.training.reports import history_entry, per_round
from server.training.spec import (
    AggregationSection,
    LocalWorkSection,
    ParticipationSection,
    RunSpec,
    TrainingSection,
    aggregation_settings,
    load_run_spec,
    spec_from_mapping,
    train_command,
)


def test_a_run_file_with_flag_overrides(tmp_path: Path) -> None:
    """Values come from the file, flags win, and None flags are ignored."""
    path = tmp_path / "run.toml"
    path.write_text('rounds = 5\nlr = 0.001\nowners = ["a"]\nseq_len = 64\n')
    spec = load_run_spec(path, {"rounds": 2, "seq_len": None})
    assert spec == RunSpec(rounds=2, owners=("a",), training=TrainingSection(lr=0.001, seq_len=64))


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
        ({"codec": "zip"}, "unknown run setting"),
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
    """Each bad value (as the flat keys of older run files) is refused with a message naming the setting."""
    with pytest.raises(ValueError, match=message):
        spec_from_mapping(values)


def test_train_commands_continue_the_data_stream() -> None:
    """Round r starts at batch (r - 1) * steps, and the tokenizer defaults to the model."""
    spec = RunSpec(local_work=LocalWorkSection(steps=7))
    work = FixedSteps(spec.local_work).assign(3, "owner")
    train = train_command(spec, bridge_run="p0", round=3, work=work, model="/models/m")
    assert train.start == 14 and train.steps == 7 and train.tokenizer == "/models/m"


def report(**changes: object) -> RoundReport:
    """A round-1 report of two steps (losses 1 and 2.5), each sending bytes to stage 1, and its evaluation."""
    steps = (StepRecord(loss=1.0, tokens=4, seconds=0.2, peers=(PeerBytes(stage=1, sent=10, received=20),)),
             StepRecord(loss=2.5, tokens=6, seconds=0.3, peers=(PeerBytes(stage=1, sent=1, received=2),)))  # fmt: skip
    values: dict[str, object] = {
        "round": 1, "steps": steps, "evaluation": Evaluation(loss=1.0, perplexity=2.7, tokens=9),
        "samples": 8, "seconds": 0.5,
    }
    values.update(changes)
    return RoundReport(**values)  # type: ignore[arg-type]


def test_owner_round_reports_are_checked() -> None:
    """A round report becomes a history entry, and one with a non-finite number, or for another round, is refused."""
    entry = history_entry(report(), round=1)
    assert entry["losses"] == [1.0, 2.5] and entry["val_loss"] == 1.0 and entry["ppl"] == 2.7 and entry["val_tokens"] == 9
    with pytest.raises(ValueError, match="ppl"):
        history_entry(report(evaluation=Evaluation(loss=1.0, perplexity=float("nan"))), round=1)
    with pytest.raises(ValueError, match="round 2 was asked"):
        history_entry(report(), round=2)


def test_history_entries_keep_every_step_and_the_bytes_per_stage() -> None:
    """The entry holds each step's tokens and seconds and, per remote stage, the round's bytes sent and received."""
    entry = history_entry(report(), round=1)
    assert entry["tokens"] == [4, 6] and entry["step_times"] == [0.2, 0.3]
    assert entry["bytes_sent"] == {"1": 11} and entry["bytes_received"] == {"1": 22}
    assert entry["samples"] == 8 and entry["data_samples"] == 0 and entry["seconds"] == 0.5


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": (StepRecord(loss=float("inf")),)}, "finite loss"),
        ({"steps": (StepRecord(loss=1.0, tokens=-1),)}, "tokens >= 0"),
        ({"steps": (StepRecord(loss=1.0, seconds=float("nan")),)}, "finite seconds"),
        ({"steps": (StepRecord(loss=1.0, peers=(PeerBytes(stage=1, sent=-5),)),)}, "peer bytes"),
        ({"samples": -1}, "'samples'"),
        ({"data_samples": True}, "'data_samples'"),
        ({"evaluation": Evaluation(loss=1.0, perplexity=2.0, tokens=-3)}, "'val_tokens'"),
        ({"seconds": float("inf")}, "seconds"),
    ],
)
def test_round_report_values_are_checked_as_network_input(changes: dict[str, object], message: str) -> None:
    """Every number of a round report is checked: counts are integers >= 0, times and losses finite."""
    with pytest.raises(ValueError, match=message):
        history_entry(report(**changes), round=1)


def test_fixed_steps_want_one_record_per_step_asked() -> None:
    """The local work "steps" refuses a report with fewer or more steps than it asked for."""
    steps = FixedSteps(LocalWorkSection(steps=2))
    steps.check(Work(steps=2, start=0), report())
    with pytest.raises(ValueError, match=r"1 step.*2 were asked"):
        steps.check(Work(steps=2, start=0), report(steps=(StepRecord(loss=1.0),)))


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


def test_owner_timing_is_checked() -> None:
    """Stage and step seconds pass through when valid, are empty when not measured, and are refused when negative or not finite."""
    got = history_entry(report(stage_seconds=(0.01, 2, 0.0), step_seconds=2.5), round=1)
    assert got["stage_seconds"] == [0.01, 2.0, 0.0] and got["step_seconds"] == 2.5
    assert history_entry(report(), round=1)["stage_seconds"] == []
    for bad in ({"stage_seconds": (0.1, -1)}, {"stage_seconds": (float("inf"),)}, {"stage_seconds": (True,)},
                {"step_seconds": float("nan")}, {"step_seconds": "1"}):  # fmt: skip
        with pytest.raises(ValueError, match="_seconds"):
            history_entry(report(**bad), round=1)


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
    parallel = RunSpec(participation=ParticipationSection(mode="parallel"), aggregation=AggregationSection(rule="fedadam"))
    assert aggregation_settings(parallel) == AggregationSettings(kind="fedadam")


@pytest.mark.parametrize("rule", list(AGGREGATORS))
def test_run_files_know_every_aggregator_the_server_implements(rule: str) -> None:
    """Every rule in server.training.aggregation's registry is one a run file can name, and builds that rule."""
    spec = spec_from_mapping({"participation": {"mode": "parallel"}, "aggregation": {"rule": rule}})
    assert type(aggregation_settings(spec).build()) is AGGREGATORS[rule]


def test_a_server_optimizer_spec_survives_json() -> None:
    """to_json and spec_from_mapping round-trip the aggregation keys (the admin API carries them so)."""
    spec = spec_from_mapping(
        {"case": 3, "aggregator": "fedadam", "server_lr": 0.1, "server_beta1": 0.8, "server_beta2": 0.95, "server_tau": 1e-4}
    )
    assert spec_from_mapping(spec.to_json()) == spec


def test_stages_auto_means_whatever_the_server_plans() -> None:
    """``stages = "auto"`` is no fixed count; 1 (one stage: an owner holds the whole model) is a count; 0 or a string is refused."""
    import pytest

    from server.training.spec import spec_from_mapping

    assert spec_from_mapping({"stages": "auto"}).stages is None
    assert spec_from_mapping({"stages": 4}).stages == 4
    assert spec_from_mapping({"stages": 1}).stages == 1
    for bad in (0, "four", True):
        with pytest.raises(ValueError, match='"auto"'):
            spec_from_mapping({"stages": bad})
