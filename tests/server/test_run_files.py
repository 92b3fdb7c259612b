"""Run files in sections: the documented reference, the flat keys of older files as aliases, and refusals."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from server.training import spec as spec_module
from server.training.spec import (
    FLAT_KEYS,
    SECTIONS,
    TOP_LEVEL,
    AggregationSection,
    FinetuneSection,
    LocalWorkSection,
    ParticipationSection,
    RunSpec,
    TrainingSection,
    load_run_spec,
    prepare_command,
    spec_from_mapping,
)

REPO = Path(__file__).resolve().parents[2]


def documented_run_file() -> str:
    """The complete run file in spec.py's docstring: the indented block after its first '::'."""
    doc = spec_module.__doc__ or ""
    block = doc.split("::\n\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines)


def test_the_documented_run_file_is_every_key_at_its_default() -> None:
    """The reference in spec.py parses, names every key of every section, and its values are the defaults."""
    values = tomllib.loads(documented_run_file())
    assert spec_from_mapping(values) == RunSpec()
    assert set(values) == set(TOP_LEVEL) | set(SECTIONS)
    for name, section in SECTIONS.items():
        assert set(values[name]) == {f.name for f in dataclasses.fields(section)}, name


def test_every_flat_key_is_documented() -> None:
    """The docstring's table of older keys names each alias."""
    doc = spec_module.__doc__ or ""
    table = doc.split("Run files written before sections", 1)[1]
    assert all(key in table for key in FLAT_KEYS)


def test_sections_and_flat_keys_mean_the_same() -> None:
    """A run file in sections equals the same run written with the flat keys of older files."""
    sectioned = """
rounds = 2
[participation]
mode = "parallel"
[local_work]
steps = 7
[training]
lr = 0.001
optimizer = "sgd"
[finetune]
mode = "lora"
r = 4
targets = ["q_proj"]
[aggregation]
rule = "fedadam"
server_lr = 0.05
[evaluation]
val_fraction = 0.2
"""
    flat = {
        "rounds": 2, "case": 3, "steps_per_round": 7, "lr": 0.001, "optimizer": "sgd", "finetune": "lora",
        "lora_r": 4, "lora_targets": ["q_proj"], "aggregator": "fedadam", "server_lr": 0.05, "val_fraction": 0.2,
    }
    assert spec_from_mapping(tomllib.loads(sectioned)) == spec_from_mapping(flat)


@pytest.mark.parametrize(("case", "mode"), [(1, "single"), (2, "sequential"), (3, "parallel")])
def test_case_is_an_alias_of_the_participation_mode(case: int, mode: str) -> None:
    """``case = N`` at the top or in [participation] is ``[participation] mode``."""
    want = RunSpec(participation=ParticipationSection(mode=mode))
    assert spec_from_mapping({"case": case}) == want
    assert spec_from_mapping({"participation": {"case": case}}) == want
    assert spec_from_mapping({"participation": {"mode": mode}}) == want


def test_unknown_sections_and_keys_are_named_with_the_known_ones() -> None:
    """A key a section does not have lists the section's keys; an unknown top-level name lists sections and keys."""
    with pytest.raises(ValueError, match=r"unknown key\(s\) stepz in \[local_work\]; known keys: accumulate, batch, mode, samples, seconds, steps"):
        spec_from_mapping({"local_work": {"stepz": 3}})
    with pytest.raises(ValueError, match=r"unknown run setting\(s\) trainin.*\[training\].*steps_per_round"):
        spec_from_mapping({"trainin": {"lr": 1.0}})
    with pytest.raises(ValueError, match=r"training must be a table \(\[training\] and its keys\)"):
        spec_from_mapping({"training": 3})


def test_a_key_set_twice_is_refused() -> None:
    """A flat key and its section key (or case and mode) together are refused, naming both."""
    with pytest.raises(ValueError, match=r"lr and \[training\] lr both set \[training\] lr"):
        spec_from_mapping({"lr": 0.1, "training": {"lr": 0.2}})
    with pytest.raises(ValueError, match=r"both set \[participation\] mode"):
        spec_from_mapping({"case": 3, "participation": {"mode": "parallel"}})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"participation": {"mode": "everyone"}}, r"\[participation\] mode must be one of single, sequential, parallel"),
        ({"local_work": {"mode": "forever"}}, r"\[local_work\] mode must be one of steps"),
        ({"local_work": {"steps": 0}}, r"\[local_work\] steps must be an integer >= 1"),
        ({"finetune": {"mode": "dora"}}, r"\[finetune\] mode must be one of full, lora, heads"),
        ({"finetune": {"r": 0}}, r"\[finetune\] r must be an integer >= 1"),
        ({"communication": {"codec": "zip"}}, r"\[communication\] codec must be one of dense, topk"),
        ({"training": {"method": "guess"}}, r"\[training\] method must be one of backprop"),
        ({"training": {"seq_len": 1}}, r"\[training\] seq_len must be an integer >= 2"),
        ({"evaluation": {"eval_batch_size": 0}}, r"\[evaluation\] eval_batch_size"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"owners": "alice"}, "owners must be a list"),
    ],
)
def test_each_section_checks_its_values(values: dict[str, object], message: str) -> None:
    """Bad values in a section are refused with a message that names the section and key."""
    with pytest.raises(ValueError, match=message):
        spec_from_mapping(values)


def test_flags_override_section_values(tmp_path: Path) -> None:
    """A flag (a flat key) wins over the same key set in its section, and unset flags change nothing."""
    path = tmp_path / "run.toml"
    path.write_text('[training]\nlr = 0.5\nbatch_size = 8\n[participation]\nmode = "sequential"\n')
    spec = load_run_spec(path, {"lr": 0.01, "case": 3, "rounds": None})
    assert spec.training == TrainingSection(lr=0.01, batch_size=8)
    assert spec.participation.mode == "parallel" and spec.rounds == RunSpec().rounds


def test_to_json_is_sections_and_reads_back() -> None:
    """to_json writes one object per section, which spec_from_mapping reads back to the same spec."""
    spec = RunSpec(
        owners=("a", "b"),
        stages=1,
        participation=ParticipationSection(mode="parallel"),
        local_work=LocalWorkSection(steps=3),
        finetune=FinetuneSection(mode="lora", r=2, targets=("q_proj", "v_proj")),
        aggregation=AggregationSection(rule="fedyogi", server_lr=0.5),
    )
    shown = spec.to_json()
    assert shown["finetune"] == {"mode": "lora", "r": 2, "alpha": 16, "targets": ["q_proj", "v_proj"],
                                 "head_fraction": 1.0, "head_choice": "random", "adapter": "full",
                                 "head_fraction_schedule": "fixed", "head_fractions": {}}  # fmt: skip
    assert shown["owners"] == ["a", "b"] and shown["participation"] == {"mode": "parallel", "fraction": 0.0, "count": 0}
    assert spec_from_mapping(shown) == spec


def test_prepare_commands_carry_the_chosen_members() -> None:
    """PrepareRun names the run's finetune mode, optimizer, codec and method, with the LoRA settings."""
    spec = spec_from_mapping({"finetune": {"mode": "lora", "r": 4, "alpha": 8}, "optimizer": "sgd", "seed": 3})
    command = prepare_command(spec, "plan-1-p0")
    assert (command.run_id, command.finetune, command.optimizer, command.codec.name, command.method) == (
        "plan-1-p0", "lora", "sgd", "dense", "backprop"
    )
    assert (command.lora.r, command.lora.alpha, command.seed) == (4, 8, 3)


@pytest.mark.parametrize("path", ["testbed/compose-run.toml"])
def test_the_repository_run_files_load(path: str) -> None:
    """The run files shipped in the repository are valid."""
    load_run_spec(REPO / path)


# ------------------------------------------------------------------------------ [aggregation]: outer optimizers


def _built(aggregation: dict[str, object]) -> Any:
    """The aggregator a parallel run with this [aggregation] table builds (Any: each rule has its own fields)."""
    return spec_from_mapping({"case": 3, "aggregation": aggregation}).aggregation.settings().build()


def test_an_unset_server_lr_is_the_rules_own() -> None:
    """Without server_lr (or with "auto") fedavg is plain averaging, fedmom/fednesterov take 0.7 and the adaptive rules 0.01."""
    from server.training.aggregation import FedAvg

    plain = spec_from_mapping({"aggregation": {"rule": "fedavg"}})
    assert plain.aggregation.server_lr is None and not plain.server_optimizer
    built = plain.aggregation.settings().build()
    assert isinstance(built, FedAvg) and built.lr == 1.0
    assert spec_from_mapping({"aggregation": {"server_lr": "auto"}}) == plain == RunSpec()
    rules = ("fedavg", "fedmom", "fednesterov", "fedadam", "fedyogi", "fedadagrad")
    lrs = {rule: _built({"rule": rule}).lr for rule in rules}
    assert lrs == {"fedavg": 1.0, "fedmom": 0.7, "fednesterov": 0.7, "fedadam": 0.01, "fedyogi": 0.01, "fedadagrad": 0.01}


def test_run_files_express_diloco_and_photon() -> None:
    """DiLoCo's outer Nesterov (lr 0.7, mu 0.9) is fednesterov's default; Photon's FedAdam (lr 0.1, betas 0.9/0.95) is three keys."""
    from server.training.aggregation import FedAdam, FedMom, FedNesterov

    diloco = _built({"rule": "fednesterov"})
    assert isinstance(diloco, FedNesterov) and (diloco.lr, diloco.momentum) == (0.7, 0.9)
    photon = spec_from_mapping(tomllib.loads(
        'case = 3\n[aggregation]\nrule = "fedadam"\nserver_lr = 0.1\nserver_beta1 = 0.9\nserver_beta2 = 0.95\n'
    )).aggregation.settings().build()
    assert isinstance(photon, FedAdam) and (photon.lr, photon.beta1, photon.beta2) == (0.1, 0.9, 0.95)
    mom = _built({"rule": "fedmom", "server_lr": 1, "server_momentum": 0})
    assert isinstance(mom, FedMom) and (mom.lr, mom.momentum) == (1.0, 0.0)


@pytest.mark.parametrize(
    "aggregation",
    [{"rule": "fedmom"}, {"rule": "fednesterov"}, {"rule": "fedadam"}, {"rule": "fedavg", "server_lr": 0.7}],
)
def test_rules_that_step_from_the_start_need_parallel_owners(aggregation: dict[str, object]) -> None:
    """Every rule that steps from the round's starting state (fedavg too at server_lr != 1) is refused in sequence."""
    assert spec_from_mapping({"case": 3, "aggregation": aggregation}).server_optimizer
    for mode in ("single", "sequential"):
        with pytest.raises(ValueError, match=rf"aggregator '{aggregation['rule']}' needs case = 3"):
            spec_from_mapping({"participation": {"mode": mode}, "aggregation": aggregation})


def test_fedavg_at_server_lr_one_works_in_sequence() -> None:
    """An explicit server_lr = 1 is today's fedavg: no starting state needed, any participation."""
    spec = spec_from_mapping({"case": 2, "aggregation": {"rule": "fedavg", "server_lr": 1}})
    assert not spec.server_optimizer and spec.aggregation.server_lr == 1


@pytest.mark.parametrize(
    ("aggregation", "message"),
    [
        ({"rule": "fedsgd"}, r"\[aggregation\] rule: the aggregator must be one of fedavg, .*fedmom, fednesterov"),
        ({"server_momentum": 1.0}, r"\[aggregation\] server_momentum must be a number in \[0, 1\)"),
        ({"server_momentum": -0.1}, r"\[aggregation\] server_momentum must be a number in \[0, 1\)"),
        ({"server_momentum": True}, r"\[aggregation\] server_momentum must be a number in \[0, 1\)"),
        ({"server_lr": 0}, r"\[aggregation\] server_lr must be a finite number > 0 \(or \"auto\""),
        ({"server_lr": -0.5}, r"\[aggregation\] server_lr must be a finite number > 0"),
        ({"server_lr": float("inf")}, r"\[aggregation\] server_lr must be a finite number > 0"),
        ({"server_lr": float("nan")}, r"\[aggregation\] server_lr must be a finite number > 0"),
        ({"server_lr": "fast"}, r"\[aggregation\] server_lr must be a finite number > 0"),
    ],
)
def test_the_aggregation_section_checks_rule_momentum_and_lr(aggregation: dict[str, object], message: str) -> None:
    """Unknown rules, a momentum outside [0, 1) and a server_lr that is not a finite positive number are refused."""
    with pytest.raises(ValueError, match=message):
        spec_from_mapping({"case": 3, "aggregation": aggregation})


@pytest.mark.parametrize(
    "aggregation",
    [AggregationSection(), AggregationSection(rule="fednesterov", server_lr=0.5, server_momentum=0.8)],
)
def test_aggregation_keys_survive_json(aggregation: AggregationSection) -> None:
    """to_json writes server_lr (null when it is the rule's own) and server_momentum, and reads them back."""
    spec = RunSpec(participation=ParticipationSection(mode="parallel"), aggregation=aggregation)
    shown = spec.to_json()["aggregation"]
    assert (shown["server_lr"], shown["server_momentum"]) == (aggregation.server_lr, aggregation.server_momentum)
    assert spec_from_mapping(spec.to_json()) == spec


def test_a_sampled_participation_reads_its_size_and_survives_json() -> None:
    """``[participation] mode = "sampled"`` with a fraction or a count is read into the section, and to_json keeps it."""
    by_share = spec_from_mapping(tomllib.loads('seed = 4\n[participation]\nmode = "sampled"\nfraction = 0.5\n'))
    assert by_share.participation == ParticipationSection(mode="sampled", fraction=0.5) and by_share.seed == 4
    by_count = spec_from_mapping(tomllib.loads('[participation]\nmode = "sampled"\ncount = 2\n[aggregation]\nrule = "fedadam"'))
    assert by_count.participation == ParticipationSection(mode="sampled", count=2)
    for spec in (by_share, by_count):
        assert spec_from_mapping(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("participation", "message"),
    [
        ({"mode": "sampled"}, r"\[participation\] mode 'sampled' needs exactly one of fraction and count, neither is set"),
        ({"mode": "sampled", "fraction": 0.5, "count": 2}, r"exactly one of fraction and count, both are set"),
        ({"mode": "sampled", "fraction": 1.5}, r"\[participation\] fraction must be a number in \(0, 1\].*e\.g\. 0\.5"),
        ({"mode": "sampled", "fraction": -0.5}, r"\[participation\] fraction must be a number in \(0, 1\]"),
        ({"mode": "sampled", "fraction": True}, r"\[participation\] fraction must be a number"),
        ({"mode": "sampled", "count": -1}, r"\[participation\] count must be an integer >= 0"),
        ({"mode": "sampled", "count": 1.5}, r"\[participation\] count must be an integer"),
        ({"mode": "parallel", "fraction": 0.5}, r"fraction and count size the subset mode 'sampled' draws.*mode 'parallel'"),
        ({"mode": "single", "count": 1}, r"mode 'single' draws none: remove them, or set mode = 'sampled'"),
        ({"case": 2, "fraction": 0.5}, r"mode 'sequential' draws none"),
    ],
)
def test_the_sampled_settings_are_checked(participation: dict[str, object], message: str) -> None:
    """Exactly one of fraction in (0, 1] and count >= 1, and only with mode "sampled"; each refusal says what to set."""
    with pytest.raises(ValueError, match=message):
        spec_from_mapping({"participation": participation})


def test_sampled_participation_takes_server_optimizers() -> None:
    """Sampled owners train copies in parallel, so a server optimizer may merge them; the refusal for others names it."""
    spec_from_mapping({"participation": {"mode": "sampled", "count": 1}, "aggregation": {"rule": "fedadam"}})
    with pytest.raises(ValueError, match=r"\[participation\] mode = 'parallel' or 'sampled'\)"):
        spec_from_mapping({"participation": {"mode": "sequential"}, "aggregation": {"rule": "fedadam"}})
