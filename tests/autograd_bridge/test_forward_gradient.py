"""Forward gradients (FwdLLM): the estimate, seeded updates, split equals whole, hosts that never see BACKWARD."""

from __future__ import annotations

import math

import pytest
import torch

from autograd_bridge.frames import MessageKind
from autograd_bridge.methods import ForwardGradientSettings, get_method
from autograd_bridge.methods.forward_gradient import ForwardGradient
from autograd_bridge.methods.perturbation import ParameterSpace, rebuild_change, replay
from autograd_bridge.partition import causal_lm_loss, even_stage_specs, split_model
from autograd_bridge.pipeline import Pipeline
from autograd_bridge.runtime import EventLoopThread

from .bridge_helpers import memory_split
from .conftest import padded_batch

pytestmark = pytest.mark.usefixtures("single_thread")


def _whole_loss(model, batch) -> float:
    with torch.no_grad():
        return float(causal_lm_loss(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                    batch.labels))  # fmt: skip


def test_many_perturbations_average_to_the_backprop_gradient(load_tiny) -> None:
    """Averaged over N directions the estimate's cosine with the true gradient is near 1/sqrt(1 + (D+1)/N).

    For v ~ N(0, I) in D dimensions, E[(g.v)v] = g and E|(g.v)v - g|^2 = (D+1)|g|^2, so the mean of
    N has error (D+1)|g|^2/N and cosine about 1/sqrt(1 + (D+1)/N): 0.93 for D = 64, N = 400. The
    test asks for 0.8 (the cosine's spread at that N is a few hundredths) and checks that a
    random direction is nowhere near (|cos| ~ 1/sqrt(D) = 0.12).
    """
    model = load_tiny("llama")
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="right")
    model.requires_grad_(False)
    weight = model.model.norm.weight  # D = 64: the final norm's scale
    weight.requires_grad_(True)
    loss = causal_lm_loss(
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels
    )
    (true,) = torch.autograd.grad(loss, [weight])
    space = ParameterSpace(model.named_parameters())
    n = 400
    method = ForwardGradient(ForwardGradientSettings(h=1e-3, perturbations=n, max_perturbations=n, seed=3))
    estimate = method.estimate([space], lambda: _whole_loss(model, batch))
    got = rebuild_change(
        [list(zip(estimate.seeds, [d / n for d in estimate.slopes], strict=True))], space.shapes
    )
    cosine = float(torch.nn.functional.cosine_similarity(got["model.norm.weight"], true, dim=0))
    bound = 1 / math.sqrt(1 + (weight.numel() + 1) / n)
    assert cosine > 0.8 and abs(cosine - bound) < 0.1, (cosine, bound)
    random = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    assert abs(float(torch.nn.functional.cosine_similarity(random, true, dim=0))) < 0.5
    assert torch.equal(space.values()["model.norm.weight"], weight.detach())  # perturbing restored it exactly


def test_seeds_rebuild_exactly_the_update_the_owner_applied(load_tiny) -> None:
    """Three steps on a whole model: replaying the (seed, alpha) pairs from the start gives its tensors bit for bit."""
    model = load_tiny("llama")
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="right")
    stages = split_model(model, even_stage_specs(model.config.num_hidden_layers, 2))
    runtime = EventLoopThread()
    pipeline = Pipeline(stages, runtime)
    start = {n: p.detach().clone() for s in stages for n, p in s.named_model_parameters()}
    method = get_method("forward_gradient")
    losses = [method.step(pipeline, batch, None, lr=0.05, clip_norm=1.0).loss for _ in range(3)]
    pipeline.close()
    runtime.close()
    assert len(method.applied) == 3 and all(
        len(pairs) == method.settings.perturbations for pairs in method.applied
    )
    now = {n: p.detach() for s in stages for n, p in s.named_model_parameters()}
    rebuilt = replay(start, method.applied)
    assert all(torch.equal(rebuilt[n], t) for n, t in now.items())
    assert any(not torch.equal(start[n], t) for n, t in now.items())
    assert all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("sampler", [False, True])
def test_a_split_forward_gradient_step_equals_the_whole_model_step(load_tiny, sampler) -> None:
    """Owner ends plus a host in the middle take the steps the whole model takes (fp32, 1e-5); no BACKWARD reaches the host."""
    model = load_tiny("llama")
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="right")
    whole = type(model)(model.config)
    whole.load_state_dict(model.state_dict())
    whole.eval()
    settings = ForwardGradientSettings(perturbations=2, max_perturbations=4, var_threshold=1e-9, sampler=sampler,
                                       candidates=3, seed=11)  # fmt: skip
    split = memory_split(model, 3)
    try:
        pipeline = Pipeline(split.chain(), split.runtime)
        method = ForwardGradient(settings)
        reference = ForwardGradient(settings)
        space = ParameterSpace(whole.named_parameters())
        for step in range(3):
            if step == 2:  # a "server merge" between rounds: both sides load the same values
                with torch.no_grad():
                    for s in split.stages:
                        for _, p in s.named_model_parameters():
                            p.mul_(0.999)
                    for _, p in whole.named_parameters():
                        p.mul_(0.999)
            got = method.step(pipeline, batch, None, lr=0.02, clip_norm=5.0)
            space.observe()
            want = reference.estimate([space], lambda: _whole_loss(whole, batch))
            k = len(want.seeds)
            coefficients = [(s, d / k) for s, d in zip(want.seeds, want.slopes, strict=True)]
            norm = math.sqrt(space.sq_norm(coefficients))
            scale = min(1.0, 5.0 / (norm + 1e-6))
            space.apply([(s, -0.02 * scale * c) for s, c in coefficients])
            assert [s for s, _ in method.applied[-1]] == want.seeds
            assert got.grad_norm == pytest.approx(norm, rel=1e-5)
        pipeline.close()
        host = split.hosts[1]
        assert host.received[MessageKind.BACKWARD] == 0 and host.received[MessageKind.FORWARD] == 0
        assert host.received[MessageKind.PERTURB] > 0 and host.received[MessageKind.APPLY_DIRECTIONAL] == 6
        assert host.received[MessageKind.ALIGNMENT] == (
            2 if sampler else 0
        )  # the merge before step 3 is known
        got_params = {n: p.detach() for s in split.stages for n, p in s.named_model_parameters()}
    finally:
        split.close()
    for name, p in whole.named_parameters():
        assert torch.allclose(got_params[name], p.detach(), atol=1e-5, rtol=0), name


def test_the_variance_rule_adds_directions_until_the_estimate_is_steady(load_tiny) -> None:
    """A threshold above the variance keeps K at its start; one far below it draws up to max_perturbations."""
    model = load_tiny("llama")
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="right")
    space = ParameterSpace(model.named_parameters())
    loss = lambda: _whole_loss(model, batch)  # noqa: E731
    low = ForwardGradient(
        ForwardGradientSettings(perturbations=2, max_perturbations=6, var_threshold=1e9, seed=0)
    )
    high = ForwardGradient(
        ForwardGradientSettings(perturbations=2, max_perturbations=6, var_threshold=1e-9, seed=0)
    )
    assert len(low.estimate([space], loss).seeds) == 2
    estimate = high.estimate([space], loss)
    assert len(estimate.seeds) == 6 and estimate.variance > 1e-9


@pytest.mark.parametrize(
    ("options", "tensors", "says"),
    [
        ({"seed": "-1", "scale": "0.1"}, {}, "seed"),
        ({"seed": "5", "scale": "nan"}, {}, "scale"),
    ],
)
def test_a_host_refuses_malformed_perturbations(load_tiny, options, tensors, says) -> None:
    """A bad PERTURB is BAD_REQUEST naming the option; the host's tensors are untouched and it keeps serving."""
    from autograd_bridge.errors import RemoteStageError

    split = memory_split(load_tiny("llama"), 3)
    try:
        client = split.clients[1]
        before = {n: p.detach().clone() for n, p in split.stages[1].named_model_parameters()}
        with pytest.raises(RemoteStageError) as caught:
            split.runtime.run(client.request(MessageKind.PERTURB, options=options, tensors=tensors))
        assert caught.value.code == "BAD_REQUEST" and says in str(caught.value)
        bad = {"seeds": torch.tensor([1, 2]), "alphas": torch.tensor([0.5])}
        with pytest.raises(RemoteStageError, match="alphas"):
            split.runtime.run(client.request(MessageKind.APPLY_DIRECTIONAL, tensors=bad))
        assert all(torch.equal(p.detach(), before[n]) for n, p in split.stages[1].named_model_parameters())
        assert split.runtime.run(client.grad_sq_norm(0)) == 0.0
    finally:
        split.close()
