"""The owner's round settings: what arrives in a Train or PrepareRun command is checked before use."""

from __future__ import annotations

import dataclasses

import pytest

from client.errors import HostingError
from client.trainer import check_train, prepare_from_command
from proto.messages import CodecSettings, HeadSettings, LoraSettings, PrepareRun, Train

GOOD = Train(
    run_id="p", round=2, steps=3, start=3, batch_size=4, seq_len=32, micro_batches=1, lr=1e-3,
    seed=0, val_fraction=0.1, eval_batch_size=8, tokenizer="/models/m",
)  # fmt: skip


def test_valid_settings_pass() -> None:
    """Every field of a well-formed Train command arrives as sent."""
    settings = check_train(GOOD)
    assert settings.round == 2 and settings.lr == 1e-3 and settings.tokenizer == "/models/m"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": 0}, "steps"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"tokenizer": ""}, "tokenizer"),
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"round": 0}, "round"),
        ({"batch_size": 6, "micro_batches": 4}, "micro_batches"),
        ({"method": "telepathy"}, "method"),
        ({"time_budget_s": -1.0}, "time_budget_s"),
        ({"time_budget_s": float("nan")}, "time_budget_s"),
    ],
)
def test_bad_settings_are_refused(change: dict[str, object], message: str) -> None:
    """A bad value is a HostingError naming it, not a crash later in training."""
    with pytest.raises(HostingError, match=message):
        check_train(dataclasses.replace(GOOD, **change))  # type: ignore[arg-type]


def test_prepare_settings_carry_the_run_optimizer() -> None:
    """PrepareRun names the optimizer every stage uses; unknown names are refused with the known ones."""
    base = PrepareRun(run_id="p", finetune="full")
    assert prepare_from_command(dataclasses.replace(base, optimizer="sgd")).optimizer == "sgd"
    assert prepare_from_command(base).optimizer == "adamw"
    with pytest.raises(HostingError, match=r"optimizer must be 'adamw' or 'sgd'"):
        prepare_from_command(dataclasses.replace(base, optimizer="lion"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"finetune": "prefix"}, "finetune mode must be one of full, heads, lora"),
        ({"finetune": "heads", "heads": HeadSettings(fraction=0.0)}, "head_fraction in"),
        ({"finetune": "heads", "heads": HeadSettings(fraction=0.5, choice="best")}, "head_choice must be one of"),
        ({"codec": CodecSettings(name="zip")}, "codec must be one of dense, seeds, topk"),
        ({"method": "telepathy"}, "training method must be one of backprop, forward_gradient"),
        ({"finetune": "lora", "lora": LoraSettings(r=0)}, "lora_r >= 1"),
        ({"finetune": "lora", "lora": LoraSettings(targets=("",))}, "module names"),
    ],
)
def test_prepare_refuses_unknown_members_and_bad_lora(change: dict[str, object], message: str) -> None:
    """Every seam's name is checked against its registry before the stages are touched."""
    with pytest.raises(HostingError, match=message):
        prepare_from_command(dataclasses.replace(PrepareRun(run_id="p"), **change))  # type: ignore[arg-type]


def test_prepare_resolves_one_object_per_seam() -> None:
    """A LoRA PrepareRun gives the lora finetune, the dense codec and backprop."""
    prepared = prepare_from_command(PrepareRun(run_id="p", finetune="lora", lora=LoraSettings(r=4, alpha=8), seed=3))
    assert (prepared.finetune.name, prepared.codec, prepared.method.name) == ("lora", "dense", "backprop")
    assert prepared.finetune.adapter and prepared.settings.lora_r == 4 and prepared.settings.seed == 3


def test_the_owner_optimizer_is_the_one_the_run_names() -> None:
    """The owner's ends get SGD or AdamW as asked, and no optimizer when they train nothing."""
    import torch

    from client.trainer import build_owner_optimizer

    layer = torch.nn.Linear(3, 3)
    assert isinstance(build_owner_optimizer([layer], "sgd"), torch.optim.SGD)
    assert isinstance(build_owner_optimizer([layer]), torch.optim.AdamW)
    layer.requires_grad_(False)
    assert build_owner_optimizer([layer], "sgd") is None
