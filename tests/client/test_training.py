"""The owner's loop: split training through stage hosts reproduces centralized training."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from autograd_bridge.host import HostSettings
from autograd_bridge.models import tiny_config
from autograd_bridge.partition import causal_lm_loss
from autograd_bridge.pipeline import Pipeline
from client.data import DataSettings, OwnerDataset
from client.training import build_local_optimizer, evaluate, train_steps, trainable_parameters
from tests.autograd_bridge.bridge_helpers import memory_split

LR = 3e-3


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread: tiny models run several times faster so on the shared 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(**overrides: object) -> PreTrainedModel:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", **overrides), dtype=torch.float32)


def _dataset(seed: int = 0) -> OwnerDataset:
    ids = torch.randint(3, 256, (24 * 16,), generator=torch.Generator().manual_seed(seed)).tolist()
    return OwnerDataset(ids, settings=DataSettings(seq_len=16, val_fraction=0.25, seed=seed))


def _centralized_losses(model: PreTrainedModel, dataset: OwnerDataset, steps: int, batch_size: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses = []
    stream = dataset.stream(batch_size)
    for _ in range(steps):
        batch = next(stream)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = causal_lm_loss(logits, batch.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def test_split_training_in_two_rounds_equals_centralized():
    """Two rounds of 3 AdamW steps through hosts give the loss curve of 6 centralized steps."""
    model = _model()
    dataset = _dataset()
    split = memory_split(model, 3, host_settings=HostSettings(optimizer="adamw", lr=LR))
    try:
        owner = [split.stages[0], split.stages[-1]]
        optimizer = build_local_optimizer(owner, lr=LR)
        pipeline = Pipeline(split.chain(), split.runtime)
        losses = train_steps(pipeline, dataset, steps=3, batch_size=4, start=0, local_optimizer=optimizer)
        losses += train_steps(pipeline, dataset, steps=3, batch_size=4, start=3, local_optimizer=optimizer)
        pipeline.close()
    finally:
        split.close()
    want = _centralized_losses(model, dataset, 6, 4)
    assert len(losses) == 6
    assert max(abs(a - b) for a, b in zip(losses, want, strict=True)) < 1e-5
    assert losses[-1] < losses[0]


def test_evaluate_is_token_weighted_and_forward_only():
    """Validation loss through hosts equals the whole model's over all tokens, for any batch size."""
    model = _model()
    dataset = OwnerDataset(
        torch.randint(3, 256, (24 * 16 + 5,), generator=torch.Generator().manual_seed(1)).tolist(),
        settings=DataSettings(seq_len=16, val_fraction=0.25, last_block="pad"),
    )
    batch = next(dataset.validation_batches(dataset.num_validation))
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        want = float(causal_lm_loss(logits, batch.labels))
    split = memory_split(model, 3)
    try:
        pipeline = Pipeline(split.chain(), split.runtime)
        loss_a, ppl_a = evaluate(pipeline, dataset, batch_size=2)
        loss_b, _ = evaluate(pipeline, dataset, batch_size=5)
        pipeline.close()
        assert all(p.grad is None for s in split.stages for p in s.parameters())
        assert all(host.held_micro_batches == 0 for host in split.hosts.values())
    finally:
        split.close()
    assert abs(loss_a - want) < 1e-5 and abs(loss_b - want) < 1e-5
    assert ppl_a == pytest.approx(math.exp(loss_a))


def test_local_optimizer_counts_a_tied_weight_once():
    """The owner's optimizer holds the tied embedding/head weight a single time."""
    model = _model(tie_word_embeddings=True)
    split = memory_split(model, 3)
    try:
        owner = [split.stages[0], split.stages[-1]]
        params = trainable_parameters(owner)
        optimizer = build_local_optimizer(owner, lr=LR)
    finally:
        split.close()
    assert len(params) == len({id(p) for p in params})
    embedding = split.stages[0].get_submodule("model.embed_tokens").weight
    assert sum(p is embedding for p in optimizer.param_groups[0]["params"]) == 1
    assert sum(p.numel() for p in params) < sum(p.numel() for s in owner for p in s.parameters())


def test_a_time_budget_stops_the_loop_at_the_nearest_step_boundary():
    """With a time budget the loop takes steps until the next would end past it: at least one, at most ``steps``."""
    from client.training import run_steps

    model = _model()
    dataset = _dataset()
    split = memory_split(model, 1)
    try:
        optimizer = build_local_optimizer(split.stages, lr=LR)
        pipeline = Pipeline(split.chain(), split.runtime)
        one = run_steps(pipeline, dataset, steps=50, batch_size=4, start=0, local_optimizer=optimizer, lr=LR,
                        time_budget_s=1e-6)  # fmt: skip
        assert len(one) == 1  # at least one step, whatever the budget
        reserved = run_steps(pipeline, dataset, steps=50, batch_size=4, start=1, local_optimizer=optimizer, lr=LR,
                             time_budget_s=10.0, after_s=lambda step_s: 10.0)  # fmt: skip
        assert len(reserved) == 1  # what comes after the loop (its evaluation) takes the whole budget
        step_s = max(r.seconds for r in one + reserved)
        budget = 12 * step_s
        began = time.perf_counter()
        records = run_steps(pipeline, dataset, steps=500, batch_size=4, start=2, local_optimizer=optimizer, lr=LR,
                            time_budget_s=budget)  # fmt: skip
        spent = time.perf_counter() - began
        pipeline.close()
    finally:
        split.close()
    assert 1 < len(records) < 500
    # Each step began with less than the budget spent, so they end within one step of it; and the loop stopped only
    # when the time spent plus half a step reached the budget.
    assert sum(r.seconds for r in records[:-1]) < budget
    assert spent + max(r.seconds for r in records) / 2 >= budget


def test_a_time_budget_must_be_positive():
    """A budget that is not a finite number > 0 is refused before any step."""
    from client.training import run_steps

    with pytest.raises(ValueError, match="time_budget_s"):
        run_steps(None, _dataset(), steps=1, batch_size=1, start=0, local_optimizer=None, time_budget_s=0.0)  # type: ignore[arg-type]


def test_micro_batches_skip_an_epoch_end_too_small_to_split():
    """With 4 micro-batches, an epoch's last batch of 2 rows is left out and the stream goes on into the next epoch."""
    from autograd_bridge.pipeline import PipelineSettings
    from client.training import run_steps

    dataset = _dataset()
    assert dataset.num_samples % 4 == 2  # the epoch ends in a batch of 2 rows
    split = memory_split(_model(), 1)
    try:
        optimizer = build_local_optimizer(split.stages, lr=LR)
        pipeline = Pipeline(split.chain(), split.runtime, PipelineSettings(micro_batches=4))
        records = run_steps(pipeline, dataset, steps=dataset.num_samples // 4 + 1, batch_size=4, start=0,
                            local_optimizer=optimizer, lr=LR)  # fmt: skip
        pipeline.close()
    finally:
        split.close()
    assert len(records) == dataset.num_samples // 4 + 1 and all(r.tokens > 0 for r in records)
