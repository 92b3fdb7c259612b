"""Photon's signals: per-layer norms of each merge and of the model, and the owners' perplexity around merges."""

from __future__ import annotations

import math

import pytest
import torch

from server.observe.tables import run_table
from server.training.reports import per_round
from server.training.signals import layer_norms


def test_layer_norms_group_tensors_by_block() -> None:
    """Update and model norms per decoder block, 'other' for tensors of no block, and the totals."""
    before = {"model.layers.0.w": torch.zeros(2), "model.layers.1.w": torch.ones(2), "model.embed.weight": torch.ones(1)}
    after = {"model.layers.0.w": torch.tensor([3.0, 4.0]), "model.layers.1.w": torch.ones(2), "model.embed.weight": torch.ones(1) * 2}
    norms = layer_norms(before, after)
    assert norms["update"] == pytest.approx({"block 0": 5.0, "block 1": 0.0, "other": 1.0, "total": math.sqrt(26.0)})
    assert norms["model"] == pytest.approx({"block 0": 5.0, "block 1": math.sqrt(2.0), "other": 2.0, "total": math.sqrt(31.0)})
    assert list(norms["model"]) == ["block 0", "block 1", "other", "total"]


def test_without_a_previous_state_the_update_is_not_guessed() -> None:
    """A first merge with no starting state reports the model's norms and no update."""
    norms = layer_norms({}, {"model.layers.2.w": torch.tensor([1.0, 0.0])})
    assert norms["update"] == {} and norms["model"] == pytest.approx({"block 2": 1.0, "total": 1.0})


def _entry(round_: int, owner: str, losses: list[float]) -> dict[str, object]:
    return {"round": round_, "owner": owner, "losses": losses, "ppl": 10.0, "val_loss": math.log(10.0), "val_tokens": 5}


def test_training_perplexity_before_and_after_each_merge() -> None:
    """Before: an owner's last step of the round; after: its first step of the next round (the merged model)."""
    history = [_entry(1, "a", [3.0, 2.0]), _entry(1, "b", [3.0, 1.0]), _entry(2, "a", [2.5, 2.0]), _entry(2, "b", [1.5, 1.2])]
    rounds = per_round(history)
    assert rounds[0]["train_ppl_before"] == pytest.approx({"a": math.exp(2.0), "b": math.exp(1.0)})
    assert rounds[0]["train_ppl_after"] == pytest.approx({"a": math.exp(2.5), "b": math.exp(1.5)})
    assert rounds[1]["train_ppl_after"] == {}  # no round after the last
    run = {"run_id": "run-1", "state": "done", "history": history, "per_round": rounds,
           "signals": [{"round": 1, "update": {"total": 0.5}, "model": {"total": 12.0}}]}  # fmt: skip
    shown = run_table(run)
    assert "train ppl before->after merge" in shown and "a 7.39->12.18" in shown and "0.5" in shown and "12" in shown


def test_runs_show_prints_the_bytes_each_client_moved() -> None:
    """The traffic table: per round and client, encoded bytes up and down."""
    run = {"run_id": "run-1", "state": "done", "history": [], "per_round": [],
           "traffic": [{"round": 1, "client": "alice", "uploaded": 1500, "downloaded": 2_500_000}]}  # fmt: skip
    shown = run_table(run)
    assert "uploaded" in shown and "alice" in shown and "1.50 kB" in shown and "2.50 MB" in shown
