"""The data owner's step through real stage hosts: the split model trains exactly as the whole one."""

from __future__ import annotations

import time

import pytest
import torch

from autograd_bridge.partition import causal_lm_loss
from autograd_bridge.pipeline import Pipeline, PipelineSettings, SplitModel
from autograd_bridge.remote import RemoteStage

from .bridge_helpers import grads_by_name, memory_split
from .conftest import padded_batch

pytestmark = pytest.mark.usefixtures("single_thread")


def _whole(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(out.loss.detach()), grads


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    assert set(got) == set(want)
    for name, g in want.items():
        assert torch.allclose(got[name], g, atol=tol, rtol=0), f"{name}: {(got[name] - g).abs().max()}"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_autograd_function_path_matches_whole_model(load_tiny, family):
    """loss.backward() through RemoteStage modules gives the whole model's loss and gradients."""
    model = load_tiny(family, attn_implementation="eager")
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="right")
    loss_whole, want = _whole(model, batch)
    split = memory_split(model, 4)
    try:
        modules = [split.stages[0]] + [RemoteStage(split.clients[i], split.runtime) for i in (1, 2)]
        modules.append(split.stages[3])
        logits = SplitModel(modules)(batch.input_ids, attention_mask=batch.attention_mask)
        loss = causal_lm_loss(logits, batch.labels)
        loss.backward()
        assert abs(float(loss) - loss_whole) < 1e-6
        _assert_close(grads_by_name(split.stages), want)
    finally:
        split.close()


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_micro_batched_step_equals_sequential_micro_batches_exactly(load_tiny, schedule):
    """A pipelined step with M=3 equals three sequential micro-batch steps bit for bit."""
    model = load_tiny("llama")
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="left", lengths=(12, 9, 5, 12, 7, 3))
    num_items = int((batch.labels[:, 1:] != -100).sum())

    sequential = memory_split(model, 3)
    try:
        chain = SplitModel(
            [sequential.stages[0], RemoteStage(sequential.clients[1], sequential.runtime), sequential.stages[2]]
        )
        total = 0.0
        for ids, mask, labels in zip(
            *(torch.tensor_split(t, 3) for t in (batch.input_ids, batch.attention_mask, batch.labels)),
            strict=True,
        ):
            loss = causal_lm_loss(chain(ids, attention_mask=mask), labels, num_items=num_items)
            loss.backward()
            total += float(loss)
        want = grads_by_name(sequential.stages)
    finally:
        sequential.close()

    piped = memory_split(model, 3)
    try:
        pipeline = Pipeline(piped.chain(), piped.runtime, PipelineSettings(micro_batches=3, schedule=schedule))
        result = pipeline.train_step(batch.input_ids, batch.attention_mask, batch.labels)
        got = grads_by_name(piped.stages)
        pipeline.close()
    finally:
        piped.close()
    assert result.tokens == num_items
    assert abs(result.loss - total) < 1e-6
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_micro_batched_step_matches_whole_batch(load_tiny):
    """M=4 micro-batches over 4 stages reproduce the whole batch's loss and gradients (fp32)."""
    model = load_tiny("gpt2")
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="right", lengths=(12, 9, 5, 11))
    loss_whole, want = _whole(model, batch)
    split = memory_split(model, 4)
    try:
        pipeline = Pipeline(split.chain(), split.runtime, PipelineSettings(micro_batches=4))
        result = pipeline.train_step(batch.input_ids, batch.attention_mask, batch.labels)
        pipeline.close()
        assert abs(result.loss - loss_whole) < 1e-5
        _assert_close(grads_by_name(split.stages), want)
    finally:
        split.close()


def test_training_steps_on_hosts_match_whole_model_training(load_tiny):
    """Three SGD steps, each host stepping its own optimizer, give the whole model's weights."""
    from autograd_bridge.host import HostSettings

    model = load_tiny("llama")
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="right")
    lr = 0.05
    split = memory_split(model, 4, host_settings=HostSettings(optimizer="sgd", lr=lr))
    try:
        local = [p for s in (split.stages[0], split.stages[-1]) for p in s.parameters()]
        local_opt = torch.optim.SGD(list({id(p): p for p in local}.values()), lr=lr)
        pipeline = Pipeline(split.chain(), split.runtime, PipelineSettings(micro_batches=2))
        whole_opt = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(3):
            pipeline.train_step(batch.input_ids, batch.attention_mask, batch.labels)
            pipeline.optimizer_step(local_opt)
            _whole(model, batch)
            whole_opt.step()
        pipeline.close()
        assert all(h.steps_taken == 3 for h in split.hosts.values())
        trained = {n: p for s in split.stages for n, p in s.named_model_parameters()}
        for name, p in model.named_parameters():
            assert torch.allclose(trained[name], p, atol=1e-5), name
    finally:
        split.close()


def test_eval_loss_keeps_no_state_on_hosts(load_tiny):
    """Evaluation goes forward only: same loss as the whole model and nothing held on the hosts."""
    model = load_tiny("llama")
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="left")
    with torch.no_grad():
        want = float(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss)
    split = memory_split(model, 3)
    try:
        pipeline = Pipeline(split.chain(), split.runtime)
        got = pipeline.eval_loss(batch.input_ids, batch.attention_mask, batch.labels)
        pipeline.close()
        assert abs(got.loss - want) < 1e-5
        assert split.hosts[1].held_micro_batches == 0
    finally:
        split.close()


def test_pipeline_rejects_more_micro_batches_than_rows(load_tiny):
    """Asking for more micro-batches than batch rows is a clear ValueError."""
    model = load_tiny("llama")
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="right")
    split = memory_split(model, 3)
    try:
        pipeline = Pipeline(split.chain(), split.runtime, PipelineSettings(micro_batches=8))
        with pytest.raises(ValueError, match="cannot be split into 8 micro-batches"):
            pipeline.train_step(batch.input_ids, batch.attention_mask, batch.labels)
        pipeline.close()
    finally:
        split.close()


def test_stage_times_show_the_slow_host_and_fit_in_the_step(load_tiny):
    """A host slowed by 0.1 s per forward has the largest stage time, and one micro-batch's stage times fit in the step."""
    model = load_tiny("llama")
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="right")
    split = memory_split(model, 3)
    try:
        split.stages[1].register_forward_hook(lambda *_: time.sleep(0.1))  # runs on the host's thread
        pipeline = Pipeline(split.chain(), split.runtime)
        pipeline.train_step(batch.input_ids, batch.attention_mask, batch.labels)  # warm-up, not counted
        pipeline.optimizer_step(None)
        pipeline.reset_stage_times()
        for _ in range(2):
            pipeline.train_step(batch.input_ids, batch.attention_mask, batch.labels)
            pipeline.optimizer_step(None)
        stages, step, steps = pipeline.stage_seconds(), pipeline.step_seconds(), pipeline.timed_steps
        pipeline.close()
    finally:
        split.close()
    assert steps == 2
    assert len(stages) == 3 and all(t > 0 for t in stages), stages
    assert stages[1] >= 0.1 and stages[1] > max(stages[0], stages[2]), stages
    assert sum(stages) <= step, (stages, step)
