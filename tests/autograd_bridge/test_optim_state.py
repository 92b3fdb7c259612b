"""Optimizer state as named tensors: a second optimizer continues exactly where the first stopped."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autograd_bridge.optim_state import (
    load_optimizer_tensors,
    optimizer_parameter_name,
    optimizer_tensors,
    split_optimizer_tensors,
)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 6, generator=generator)
    model(x).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_adamw_state_moved_to_another_optimizer_continues_identically() -> None:
    """Three steps, a hand-over by names (parameters in another order there), three more: equal to six in one."""
    whole = _model()
    whole_opt = torch.optim.AdamW(whole.parameters(), lr=1e-2, weight_decay=0.0)
    first = _model()
    first_opt = torch.optim.AdamW(first.parameters(), lr=1e-2, weight_decay=0.0)
    for s in range(3):
        _step(whole, whole_opt, s)
        _step(first, first_opt, s)
    tensors = optimizer_tensors(first_opt, first.named_parameters())
    assert {n.split("/")[1] for n in tensors} == {"step", "exp_avg", "exp_avg_sq"}
    second = _model(seed=1)
    second.load_state_dict(first.state_dict())
    second_opt = torch.optim.AdamW(list(second.parameters())[::-1], lr=1e-2, weight_decay=0.0)
    assert load_optimizer_tensors(second_opt, second.named_parameters(), tensors) == 4
    for s in range(3, 6):
        _step(whole, whole_opt, s)
        _step(second, second_opt, s)
    for a, b in zip(whole.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


def test_without_the_state_the_continuation_differs() -> None:
    """The check above can fail: a fresh AdamW after the hand-over gives other weights."""
    whole = _model()
    whole_opt = torch.optim.AdamW(whole.parameters(), lr=1e-2)
    for s in range(6):
        _step(whole, whole_opt, s)
    first = _model()
    first_opt = torch.optim.AdamW(first.parameters(), lr=1e-2)
    for s in range(3):
        _step(first, first_opt, s)
    fresh = torch.optim.AdamW(first.parameters(), lr=1e-2)
    for s in range(3, 6):
        _step(first, fresh, s)
    assert not all(torch.equal(a, b) for a, b in zip(whole.parameters(), first.parameters(), strict=True))


def test_a_parameter_without_entries_gets_an_empty_state() -> None:
    """Loading a state that lacks a parameter clears what the receiving optimizer had for it."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, optimizer, 0)
    tensors = {n: t for n, t in optimizer_tensors(optimizer, model.named_parameters()).items() if not n.endswith("0.bias")}
    assert load_optimizer_tensors(optimizer, model.named_parameters(), tensors) == 3
    assert model[0].bias not in optimizer.state and model[0].weight in optimizer.state


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("optimizer/exp_avg/9.weight", torch.zeros(3, 8), "does not train"),
        ("optimizer/exp_avg/2.weight", torch.zeros(8, 3), "is (8, 3)"),
        ("2.weight", torch.zeros(3, 8), "not an optimizer-state name"),
        ("optimizer/exp_avg", torch.zeros(3, 8), "is not 'optimizer/"),
    ],
)
def test_bad_state_is_refused_before_anything_changes(name: str, value: torch.Tensor, message: str) -> None:
    """Unknown parameters, wrong shapes and malformed names raise ValueError; the optimizer keeps its state."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, optimizer, 0)
    before = optimizer_tensors(optimizer, model.named_parameters())
    good = dict(before)
    good["optimizer/exp_avg/0.weight"] = torch.ones(8, 6)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_optimizer_tensors(optimizer, model.named_parameters(), {**good, name: value})
    after = optimizer_tensors(optimizer, model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_state_for_an_optimizer_that_trains_nothing_is_refused() -> None:
    """A stage with nothing to train (no optimizer) cannot take state, but takes an empty one."""
    assert load_optimizer_tensors(None, [], {}) == 0
    with pytest.raises(ValueError, match="train nothing"):
        load_optimizer_tensors(None, [], {"optimizer/step/x": torch.tensor(1.0)})


def test_split_separates_weights_from_state() -> None:
    """A file holding both splits by the name prefix; a state name tells its parameter."""
    weights, state = split_optimizer_tensors({"a.weight": torch.zeros(1), "optimizer/step/a.weight": torch.zeros(())})
    assert list(weights) == ["a.weight"] and list(state) == ["optimizer/step/a.weight"]
    assert optimizer_parameter_name("optimizer/exp_avg/model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
