"""The owner's round settings: what arrives in a Train command is checked before use."""

from __future__ import annotations

import json

import pytest

from client.errors import HostingError
from client.trainer import RoundSettings

GOOD = {
    "round": 2, "steps": 3, "start": 3, "batch_size": 4, "seq_len": 32, "micro_batches": 1, "lr": 1e-3,
    "seed": 0, "val_fraction": 0.1, "eval_batch_size": 8, "tokenizer": "/models/m",
}


def test_valid_settings_parse() -> None:
    """Every field of a well-formed Train command arrives typed."""
    settings = RoundSettings.from_json(json.dumps(GOOD))
    assert settings.round == 2 and settings.lr == 1e-3 and settings.tokenizer == "/models/m"


@pytest.mark.parametrize(
    ("change", "message"),
    [({"steps": -1}, "steps"), ({"lr": "fast"}, "lr"), ({"tokenizer": ""}, "tokenizer"), ({"batch_size": 0}, "batch_size")],
)
def test_bad_settings_are_refused(change: dict[str, object], message: str) -> None:
    """A bad value is a HostingError naming it, not a crash later in training."""
    with pytest.raises(HostingError, match=message):
        RoundSettings.from_json(json.dumps({**GOOD, **change}))


def test_settings_that_are_not_json_are_refused() -> None:
    """Garbage in the command is reported as such."""
    with pytest.raises(HostingError, match="not JSON"):
        RoundSettings.from_json("{")


def test_prepare_settings_carry_the_run_optimizer() -> None:
    """PrepareRun names the optimizer every stage uses; AdamW when a server sends none; others are refused."""
    from client.trainer import PrepareSettings

    base = {"finetune": "full", "lora_r": 8, "lora_alpha": 16, "seed": 0}
    assert PrepareSettings.from_json(json.dumps({**base, "optimizer": "sgd"})).optimizer == "sgd"
    assert PrepareSettings.from_json(json.dumps(base)).optimizer == "adamw"
    with pytest.raises(HostingError, match="optimizer"):
        PrepareSettings.from_json(json.dumps({**base, "optimizer": "lion"}))


def test_the_owner_optimizer_is_the_one_the_run_names() -> None:
    """The owner's ends get SGD or AdamW as asked, and no optimizer when they train nothing."""
    import torch

    from client.trainer import build_owner_optimizer

    layer = torch.nn.Linear(3, 3)
    assert isinstance(build_owner_optimizer([layer], "sgd"), torch.optim.SGD)
    assert isinstance(build_owner_optimizer([layer]), torch.optim.AdamW)
    layer.requires_grad_(False)
    assert build_owner_optimizer([layer], "sgd") is None
