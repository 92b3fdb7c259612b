"""Run files for heads mode (SMHA): fractions per owner, the choice and adapter, and what is refused."""

from __future__ import annotations

import tomllib

import pytest

from proto.messages import HeadSettings
from server.training.spec import prepare_command, spec_from_mapping

RUN = """
[participation]
mode = "parallel"
[finetune]
mode = "heads"
head_fraction = 0.25
head_choice = "importance"
adapter = "lora"
r = 4
[finetune.head_fractions]
fast = 1.0
middle = 0.5
"""


def test_each_owner_gets_its_fraction_in_prepare_run() -> None:
    """Owners named in [finetune.head_fractions] get theirs, the others head_fraction; all holders get the choice."""
    spec = spec_from_mapping(tomllib.loads(RUN))
    got = {owner: prepare_command(spec, f"p-{owner}", owner).heads for owner in ("fast", "middle", "slow")}
    assert got == {
        "fast": HeadSettings(fraction=1.0, choice="importance", adapter="lora", key="fast"),
        "middle": HeadSettings(fraction=0.5, choice="importance", adapter="lora", key="middle"),
        "slow": HeadSettings(fraction=0.25, choice="importance", adapter="lora", key="slow"),
    }
    assert prepare_command(spec, "p-fast", "fast").finetune == "heads"
    assert spec.finetune.settings(seed=4, owner="middle").head_fraction == 0.5


def test_a_run_with_no_owner_training_every_head_is_refused() -> None:
    """SMHA needs one owner on every head: a run file where no fraction is 1 says so."""
    values = tomllib.loads(RUN.replace("fast = 1.0", "fast = 0.75"))
    with pytest.raises(ValueError, match="at least one owner that trains every head"):
        spec_from_mapping(values)


def test_the_plans_owners_must_include_one_training_every_head() -> None:
    """A file that gives 1.0 only to a client that is not an owner of this run fails when the owners are known."""
    spec = spec_from_mapping(tomllib.loads(RUN))
    spec.finetune.check_owners(["slow", "fast"])
    with pytest.raises(ValueError, match=r"slow: 0.25, middle: 0.5"):
        spec.finetune.check_owners(["slow", "middle"])


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (("head_fraction = 0.25", "head_fraction = 0.0"), r"\[finetune\] head_fraction must be a share"),
        (("middle = 0.5", "middle = 1.5"), r"\[finetune.head_fractions\] middle must be a share"),
        (("middle = 0.5", 'middle = "half"'), r"\[finetune.head_fractions\] middle must be a share"),
        (
            ('head_choice = "importance"', 'head_choice = "best"'),
            "head_choice must be one of random, importance",
        ),
        (('adapter = "lora"', 'adapter = "dora"'), "adapter must be one of full, lora"),
        (('adapter = "lora"', 'head_fraction_schedule = "cosine"'), "head_fraction_schedule must be one of"),
    ],
)
def test_bad_heads_settings_are_refused(edit: tuple[str, str], match: str) -> None:
    """Fractions outside (0, 1], an unknown choice or adapter are refused, naming the key."""
    with pytest.raises(ValueError, match=match):
        spec_from_mapping(tomllib.loads(RUN.replace(*edit)))


def test_the_redundancy_schedule_reaches_every_holder() -> None:
    """head_fraction_schedule travels in PrepareRun's HeadSettings."""
    spec = spec_from_mapping(
        tomllib.loads(RUN.replace('adapter = "lora"', 'head_fraction_schedule = "redundancy"'))
    )
    assert prepare_command(spec, "p", "slow").heads.schedule == "redundancy"
    assert spec.finetune.settings(owner="slow").head_schedule == "redundancy"
