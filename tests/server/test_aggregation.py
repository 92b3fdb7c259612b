"""Merging partition copies: FedAvg exactness and weighting, server optimizers, real model states."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from autograd_bridge.models import tiny_config
from autograd_bridge.partition import even_stage_specs, split_model
from server.training.aggregation import (
    AggregationSettings,
    Aggregator,
    ClientUpdate,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedMom,
    FedNesterov,
    FedYogi,
    weighted_mean,
)


def _update(state: dict[str, Tensor], n: int, **kwargs: object) -> ClientUpdate:
    return ClientUpdate(state=state, num_samples=n, **kwargs)  # type: ignore[arg-type]


def test_fedavg_matches_hand_computed_weighted_mean() -> None:
    """FedAvg of [1,2],[5,6] weighted 1:3 is [(1+15)/4, (2+18)/4] = [4, 5], and a scalar likewise."""
    global_state = {"w": torch.zeros(2), "b": torch.tensor(0.0)}
    updates = [
        _update({"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(2.0)}, 1),
        _update({"w": torch.tensor([5.0, 6.0]), "b": torch.tensor(10.0)}, 3),
    ]
    merged = FedAvg().aggregate(global_state, updates)
    assert torch.equal(merged["w"], torch.tensor([4.0, 5.0]))
    assert torch.equal(merged["b"], torch.tensor(8.0))


def test_fedavg_is_weighted_by_samples_not_by_clients() -> None:
    """Changing only the sample counts moves the average toward the larger client."""
    global_state = {"w": torch.zeros(1)}
    a, b = {"w": torch.tensor([0.0])}, {"w": torch.tensor([10.0])}
    equal = FedAvg().aggregate(global_state, [_update(a, 5), _update(b, 5)])["w"].item()
    skewed = FedAvg().aggregate(global_state, [_update(a, 1), _update(b, 9)])["w"].item()
    assert equal == 5.0
    assert skewed == 9.0


def test_fedavg_ignores_a_client_with_zero_samples() -> None:
    """An update with num_samples=0 has no weight."""
    global_state = {"w": torch.zeros(3)}
    merged = FedAvg().aggregate(
        global_state, [_update({"w": torch.full((3,), 7.0)}, 4), _update({"w": torch.full((3,), -100.0)}, 0)]
    )
    assert torch.equal(merged["w"], torch.full((3,), 7.0))


def test_fedavg_of_deltas_equals_fedavg_of_states() -> None:
    """Updates sent as changes from the global tensors give the same average as trained tensors."""
    torch.manual_seed(0)
    global_state = {"w": torch.randn(4, 3, dtype=torch.float64)}
    trained = [global_state["w"] + torch.randn(4, 3, dtype=torch.float64) for _ in range(3)]
    counts = [2, 5, 11]
    as_states = FedAvg().aggregate(global_state, [_update({"w": t}, n) for t, n in zip(trained, counts, strict=True)])
    as_deltas = FedAvg().aggregate(
        global_state,
        [_update({"w": t - global_state["w"]}, n, delta=True) for t, n in zip(trained, counts, strict=True)],
    )
    torch.testing.assert_close(as_deltas["w"], as_states["w"], rtol=0, atol=1e-12)


def test_fedavg_accumulates_bf16_in_high_precision_and_casts_back() -> None:
    """Eight bf16 copies [256, 1 x 7] average to bf16(263/8), which a bf16 running sum (256) cannot reach."""
    global_state = {"w": torch.zeros(1, dtype=torch.bfloat16)}
    values = [256.0] + [1.0] * 7
    updates = [_update({"w": torch.tensor([v], dtype=torch.bfloat16)}, 1) for v in values]
    merged = FedAvg().aggregate(global_state, updates)["w"]
    naive = torch.zeros(1, dtype=torch.bfloat16)
    for v in values:
        naive += torch.tensor([v], dtype=torch.bfloat16)
    assert merged.dtype == torch.bfloat16
    assert merged.item() == torch.tensor(263 / 8, dtype=torch.float64).to(torch.bfloat16).item()
    assert merged.item() != (naive / 8).item()


def test_fedavg_refuses_mismatched_names() -> None:
    """A copy missing a tensor, or holding an extra one, is refused and named."""
    global_state = {"a": torch.zeros(2), "b": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"client 'c2'.*missing \['b'\]"):
        FedAvg().aggregate(
            global_state,
            [_update({"a": torch.ones(2), "b": torch.ones(2)}, 1), _update({"a": torch.ones(2)}, 1, client_id="c2")],
        )


def test_fedavg_refuses_mismatched_shapes() -> None:
    """A copy whose tensor shape differs from the global one is refused with both shapes."""
    with pytest.raises(ValueError, match=r"'a' has shape \(3,\), the global one \(2,\)"):
        FedAvg().aggregate({"a": torch.zeros(2)}, [_update({"a": torch.zeros(3)}, 1)])


def test_fedavg_refuses_zero_total_samples() -> None:
    """Updates that all report zero samples cannot be averaged."""
    with pytest.raises(ValueError, match="num_samples=0"):
        FedAvg().aggregate({"a": torch.zeros(2)}, [_update({"a": torch.ones(2)}, 0), _update({"a": torch.ones(2)}, 0)])


def test_fedavg_refuses_no_updates() -> None:
    """An empty list of updates is an error, not the unchanged global state."""
    with pytest.raises(ValueError, match="no client updates"):
        FedAvg().aggregate({"a": torch.zeros(2)}, [])


def test_client_update_refuses_negative_samples() -> None:
    """num_samples below zero is refused when the update is built."""
    with pytest.raises(ValueError, match="num_samples"):
        ClientUpdate(state={}, num_samples=-1)


def test_integer_tensors_pass_through_and_changes_are_refused() -> None:
    """Integer tensors equal in every copy pass unchanged; a copy that changed one is refused."""
    global_state = {"w": torch.zeros(2), "count": torch.tensor([3, 4])}
    same = FedAvg().aggregate(
        global_state, [_update({"w": torch.ones(2), "count": torch.tensor([3, 4])}, 1)]
    )
    assert torch.equal(same["count"], torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="integer tensor 'count'"):
        FedAvg().aggregate(global_state, [_update({"w": torch.ones(2), "count": torch.tensor([3, 5])}, 1)])


def test_fedadam_first_step_follows_the_paper() -> None:
    """One FedAdam step: m = (1-b1) D, v = b2 tau^2 + (1-b2) D^2, x + lr m / (sqrt(v) + tau)."""
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    x0 = torch.tensor([1.0, -2.0, 0.5])
    copies = [torch.tensor([1.5, -2.0, 0.0]), torch.tensor([0.5, -1.0, 0.0])]
    weights = [3, 1]
    delta = (3 * copies[0] + 1 * copies[1]) / 4 - x0  # weighted mean of copies minus global
    m = (1 - b1) * delta
    v = b2 * tau**2 + (1 - b2) * delta**2
    expected = x0 + lr * m / (v.sqrt() + tau)
    server = FedAdam(lr=lr, beta1=b1, beta2=b2, tau=tau)
    out = server.aggregate({"x": x0}, [_update({"x": c}, n) for c, n in zip(copies, weights, strict=True)])
    torch.testing.assert_close(out["x"], expected, rtol=1e-6, atol=1e-7)


def test_fedyogi_second_moment_uses_the_sign_rule() -> None:
    """Yogi's v moves by (1-b2) D^2 toward D^2 (v = tau^2 + (1-b2) D^2 here), unlike Adam's decay."""
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    x0, copy = torch.tensor([0.0]), torch.tensor([0.2])
    delta = copy - x0
    v_yogi = tau**2 + (1 - b2) * delta**2  # v < D^2, so sign(v - D^2) = -1
    expected = x0 + lr * (1 - b1) * delta / (v_yogi.sqrt() + tau)
    out = FedYogi(lr=lr, beta1=b1, beta2=b2, tau=tau).aggregate({"x": x0}, [_update({"x": copy}, 1)])
    adam = FedAdam(lr=lr, beta1=b1, beta2=b2, tau=tau).aggregate({"x": x0}, [_update({"x": copy}, 1)])
    torch.testing.assert_close(out["x"], expected, rtol=1e-6, atol=1e-8)
    assert not torch.equal(out["x"], adam["x"])


def test_fedadagrad_accumulates_squared_changes() -> None:
    """Two Adagrad rounds: v = tau^2 + D1^2 + D2^2 and the moment carries over."""
    lr, b1, tau = 0.5, 0.5, 1e-2
    server = FedAdagrad(lr=lr, beta1=b1, tau=tau)
    x = torch.tensor([0.0])
    m, v = torch.tensor([0.0]), torch.tensor([tau**2])
    for target in (1.0, 3.0):
        delta = torch.tensor([target]) - x
        m = b1 * m + (1 - b1) * delta
        v = v + delta**2
        expected = x + lr * m / (v.sqrt() + tau)
        x = server.aggregate({"x": x}, [_update({"x": torch.tensor([target])}, 2)])["x"]
        torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-7)


def _rounds(server: Aggregator, state: dict[str, Tensor], rounds: range) -> dict[str, Tensor]:
    """Run rounds whose client copies are deterministic functions of the round number."""
    for r in rounds:
        gen = torch.Generator().manual_seed(r)
        updates = [
            _update({k: t + 0.1 * torch.randn(t.shape, generator=gen) for k, t in state.items()}, n)
            for n in (3, 7)
        ]
        state = server.aggregate(state, updates)
    return state


def test_fedadam_resumes_exactly_from_its_state_dict() -> None:
    """Three rounds in one go equal one round, state_dict -> a fresh FedAdam, then two rounds."""
    start = {"a": torch.zeros(4, 2), "b": torch.ones(3)}
    straight = _rounds(FedAdam(lr=0.05), dict(start), range(3))
    first = FedAdam(lr=0.05)
    middle = _rounds(first, dict(start), range(1))
    resumed_server = FedAdam(lr=0.05)
    resumed_server.load_state_dict(first.state_dict())
    resumed = _rounds(resumed_server, middle, range(1, 3))
    for name in start:
        assert torch.equal(resumed[name], straight[name])
    assert resumed_server.state_dict()["rounds"] == 3


def test_server_optimizer_refuses_state_of_another_kind() -> None:
    """Loading FedYogi's state into FedAdam (or FedAvg's into either) is refused."""
    with pytest.raises(ValueError, match="'fedyogi'"):
        FedAdam().load_state_dict(FedYogi().state_dict())
    with pytest.raises(ValueError, match="'fedavg'"):
        FedYogi().load_state_dict(FedAvg().state_dict())


def test_refused_call_leaves_optimizer_state_unchanged() -> None:
    """A call that fails on a later tensor does not half-update the moments."""
    server = FedAdam()
    global_state = {"w": torch.zeros(2), "count": torch.tensor([1])}
    with pytest.raises(ValueError):
        server.aggregate(global_state, [_update({"w": torch.ones(2), "count": torch.tensor([2])}, 1)])
    assert server.state_dict()["m"] == {}
    assert server.rounds == 0


def test_settings_build_each_aggregator() -> None:
    """AggregationSettings builds the named aggregator with its numbers, and refuses unknown names."""
    assert isinstance(AggregationSettings().build(), FedAvg)
    built = AggregationSettings(kind="fedyogi", server_lr=0.3, tau=0.01).build()
    assert isinstance(built, FedYogi) and built.lr == 0.3 and built.tau == 0.01
    assert isinstance(built, Aggregator)
    with pytest.raises(ValueError, match="fedavg, fedadam"):
        AggregationSettings(kind="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta2"):
        AggregationSettings(kind="fedadam", beta2=1.0).build()


def test_fedavg_merges_partition_copies_of_a_real_model() -> None:
    """Averaging two trained copies of a tiny Llama's second stage, keyed by whole-model names."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    stage = split_model(model, even_stage_specs(4, 2))[1]
    global_state = {name: p.detach().clone() for name, p in stage.named_model_parameters()}
    assert "lm_head.weight" in global_state and "model.layers.2.mlp.up_proj.weight" in global_state
    copies = [{n: t + torch.randn_like(t) for n, t in global_state.items()} for _ in range(2)]
    merged = FedAvg().aggregate(global_state, [_update(copies[0], 100), _update(copies[1], 300)])
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, 0.25 * copies[0][name] + 0.75 * copies[1][name], rtol=1e-6, atol=1e-6)


def test_fedadam_merges_real_lora_adapter_states() -> None:
    """PEFT LoRA adapter states of a tiny Llama go through FedAdam and load back into the model."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config("llama"))
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    global_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    assert global_state and all("lora_" in k for k in global_state)
    copies = [{k: v + 0.01 * torch.randn_like(v) for k, v in global_state.items()} for _ in range(2)]
    merged = FedAdam(lr=0.01).aggregate(global_state, [_update(copies[0], 1), _update(copies[1], 1)])
    for name, tensor in merged.items():
        direction = (copies[0][name] + copies[1][name]) / 2 - global_state[name]
        moved = tensor - global_state[name]
        # Adam's first step moves each entry by lr (1-b1) D / (sqrt(v) + tau) <= lr, in the sign of D.
        assert torch.all(torch.sign(moved) == torch.sign(direction))
        assert moved.abs().max().item() <= 0.01 + 1e-6
    result = set_peft_model_state_dict(peft_model, merged)
    assert not result.unexpected_keys  # type: ignore[attr-defined]
    after = get_peft_model_state_dict(peft_model)
    assert all(torch.equal(after[k], merged[k]) for k in merged)


# --------------------------------------------------------------------------- outer optimizers (Photon, DiLoCo)

# Every rule as a run would build it: (label, settings); fedavg's own default lr is 1.
RULES = [
    ("fedavg-lr1", AggregationSettings(kind="fedavg")),
    ("fedavg-lr0.7", AggregationSettings(kind="fedavg", server_lr=0.7)),
    ("fedmom", AggregationSettings(kind="fedmom")),
    ("fednesterov", AggregationSettings(kind="fednesterov")),
    ("fedadam", AggregationSettings(kind="fedadam")),
    ("fedadam-photon", AggregationSettings(kind="fedadam", server_lr=0.1, beta1=0.9, beta2=0.95)),
    ("fedyogi", AggregationSettings(kind="fedyogi")),
    ("fedadagrad", AggregationSettings(kind="fedadagrad")),
]


@pytest.mark.parametrize("settings", [s for _, s in RULES], ids=[label for label, _ in RULES])
def test_one_client_pulls_the_global_toward_its_copy(settings: AggregationSettings) -> None:
    """With one client every rule moves each entry toward the client's copy, never away (Photon's FedAdam sign bug)."""
    x0 = torch.tensor([0.0, 1.0, -2.0, 3.0])
    copy = torch.tensor([0.5, 0.5, -1.0, 2.0])
    out = settings.build().aggregate({"x": x0}, [_update({"x": copy}, 5)])["x"]
    assert torch.equal(torch.sign(out - x0), torch.sign(copy - x0))
    assert torch.all((out - copy).abs() < (x0 - copy).abs())


def test_fedavg_at_lr_one_is_the_mean_and_ignores_the_starting_values() -> None:
    """At lr 1 FedAvg is the weighted mean bit for bit, whatever values the global tensors hold (only names and dtypes count)."""
    copies = [torch.tensor([0.1, 1e-8, 3.3], dtype=torch.float64), torch.tensor([0.7, -2.0, 1e8], dtype=torch.float64)]
    updates = [_update({"w": c}, n) for c, n in zip(copies, (3, 4), strict=True)]
    want = dict(weighted_mean({"w": copies[0]}, updates))["w"]
    assert want is not None
    for start in (copies[0], torch.full((3,), 1e30, dtype=torch.float64)):
        server = FedAvg(lr=1.0)
        assert torch.equal(server.aggregate({"w": start}, updates)["w"], want)
    assert not FedAvg().steps_from_start and FedAvg(lr=0.7).steps_from_start


def test_fedavg_with_a_server_lr_two_rounds_by_hand() -> None:
    """x - lr (x - mean), lr 0.5, over two rounds of numbers worked out by hand."""
    server = FedAvg(lr=0.5)
    x0 = torch.tensor([1.0, -2.0])
    # Round 1: mean of [3, 0] (x1) and [1, -4] (x3) = [6/4, -12/4] = [1.5, -3];
    # Delta = x0 - mean = [-0.5, 1]; x1 = x0 - 0.5 Delta = [1.25, -2.5].
    x1 = server.aggregate(
        {"x": x0}, [_update({"x": torch.tensor([3.0, 0.0])}, 1), _update({"x": torch.tensor([1.0, -4.0])}, 3)]
    )["x"]
    assert torch.equal(x1, torch.tensor([1.25, -2.5]))
    # Round 2: one copy [2.25, -0.5]; Delta = x1 - copy = [-1, -2]; x2 = x1 - 0.5 Delta = [1.25 + 0.5, -2.5 + 1] = [1.75, -1.5].
    x2 = server.aggregate({"x": x1}, [_update({"x": torch.tensor([2.25, -0.5])}, 2)])["x"]
    assert torch.equal(x2, torch.tensor([1.75, -1.5]))


def test_fedmom_two_rounds_by_hand() -> None:
    """m = mu m + Delta; x - lr m with lr 0.5, mu 0.5: the momentum keeps moving an entry whose copy did not."""
    server = FedMom(lr=0.5, momentum=0.5)
    x0 = torch.tensor([0.0, 4.0])
    # Round 1: copy [2, 2]; Delta = [-2, 2]; m = [-2, 2]; x1 = x0 - 0.5 m = [1, 3].
    x1 = server.aggregate({"x": x0}, [_update({"x": torch.tensor([2.0, 2.0])}, 1)])["x"]
    assert torch.equal(x1, torch.tensor([1.0, 3.0]))
    # Round 2: copy [1, 5]; Delta = x1 - copy = [0, -2]; m = 0.5 [-2, 2] + [0, -2] = [-1, -1];
    # x2 = x1 - 0.5 m = [1.5, 3.5].
    x2 = server.aggregate({"x": x1}, [_update({"x": torch.tensor([1.0, 5.0])}, 1)])["x"]
    assert torch.equal(x2, torch.tensor([1.5, 3.5]))
    assert torch.equal(server.state_dict()["m"]["x"], torch.tensor([-1.0, -1.0]))


def test_fednesterov_two_rounds_by_hand() -> None:
    """m = mu m + Delta; x - lr (Delta + mu m) with lr 0.5, mu 0.5."""
    server = FedNesterov(lr=0.5, momentum=0.5)
    x0 = torch.tensor([0.0, 4.0])
    # Round 1: copy [2, 2]; Delta = [-2, 2]; m = [-2, 2]; Delta + 0.5 m = [-3, 3]; x1 = x0 - 0.5 [-3, 3] = [1.5, 2.5].
    x1 = server.aggregate({"x": x0}, [_update({"x": torch.tensor([2.0, 2.0])}, 1)])["x"]
    assert torch.equal(x1, torch.tensor([1.5, 2.5]))
    # Round 2: copy [1.5, 4.5]; Delta = [0, -2]; m = 0.5 [-2, 2] + [0, -2] = [-1, -1];
    # Delta + 0.5 m = [-0.5, -2.5]; x2 = x1 - 0.5 [-0.5, -2.5] = [1.75, 3.75].
    x2 = server.aggregate({"x": x1}, [_update({"x": torch.tensor([1.5, 4.5])}, 1)])["x"]
    assert torch.equal(x2, torch.tensor([1.75, 3.75]))


@pytest.mark.parametrize(("rule", "nesterov"), [(FedNesterov, True), (FedMom, False)])
def test_outer_sgd_is_torch_sgd_on_the_pseudo_gradient(rule: type[FedMom], nesterov: bool) -> None:
    """Three rounds of DiLoCo's setting (lr 0.7, mu 0.9) equal torch.optim.SGD stepping with grad = x - mean."""
    torch.manual_seed(0)
    start = {"a": torch.randn(4, 3), "b": torch.randn(5)}
    copies = [[{k: torch.randn_like(t) for k, t in start.items()} for _ in range(3)] for _ in range(3)]
    counts = (2, 5, 1)
    params = {k: torch.nn.Parameter(t.clone()) for k, t in start.items()}
    reference = torch.optim.SGD(list(params.values()), lr=0.7, momentum=0.9, nesterov=nesterov)
    server, state = rule(lr=0.7, momentum=0.9), dict(start)
    for round_copies in copies:
        updates = [_update(c, n) for c, n in zip(round_copies, counts, strict=True)]
        for name, p in params.items():
            mean = sum(n * c[name] for c, n in zip(round_copies, counts, strict=True)) / sum(counts)
            p.grad = p.detach() - mean
        reference.step()
        state = server.aggregate(state, updates)
    for name, p in params.items():
        torch.testing.assert_close(state[name], p.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: FedMom(lr=0.5, momentum=0.8), lambda: FedNesterov()], ids=["fedmom", "fednesterov"])
def test_outer_sgd_resumes_exactly_from_its_state_dict(make: object) -> None:
    """Three rounds in one go equal one round, state_dict -> a fresh optimizer, then two rounds."""
    assert callable(make)
    start = {"a": torch.zeros(4, 2), "b": torch.ones(3)}
    straight = _rounds(make(), dict(start), range(3))
    first = make()
    middle = _rounds(first, dict(start), range(1))
    saved = first.state_dict()
    assert set(saved) == {"kind", "lr", "momentum", "rounds", "m"}
    assert all(isinstance(saved[key], float) for key in ("lr", "momentum")) and saved["rounds"] == 1
    assert set(saved["m"]) == set(start) and all(t.dtype == torch.float32 for t in saved["m"].values())
    resumed_server = make()
    resumed_server.load_state_dict(saved)
    resumed = _rounds(resumed_server, middle, range(1, 3))
    for name in start:
        assert torch.equal(resumed[name], straight[name])
    assert resumed_server.state_dict()["rounds"] == 3


def test_outer_sgd_refuses_foreign_or_mismatched_state() -> None:
    """FedMom refuses FedNesterov's state, a state without moments, and moments of another shape."""
    with pytest.raises(ValueError, match="'fednesterov'"):
        FedMom().load_state_dict(FedNesterov().state_dict())
    with pytest.raises(ValueError, match="needs 'm' dicts"):
        FedMom().load_state_dict({"kind": "fedmom"})
    server = FedNesterov()
    server.load_state_dict({"kind": "fednesterov", "m": {"x": torch.zeros(3)}, "rounds": 4})
    with pytest.raises(ValueError, match=r"saved moments of 'x' have shape \(3,\)"):
        server.aggregate({"x": torch.zeros(2)}, [_update({"x": torch.ones(2)}, 1)])
    assert server.rounds == 4


def test_settings_resolve_each_rules_own_server_lr() -> None:
    """Unset server_lr is the rule's default (fedavg 1, fedmom and fednesterov 0.7, adaptive 0.01); momentum is checked."""
    built: dict[str, Any] = {k: AggregationSettings(kind=k).build() for k in ("fedavg", "fedmom", "fednesterov", "fedadam")}
    assert [b.lr for b in built.values()] == [1.0, 0.7, 0.7, 0.01]
    assert isinstance(built["fednesterov"], FedNesterov) and built["fednesterov"].momentum == 0.9
    assert [b.steps_from_start for b in built.values()] == [False, True, True, True]
    mom = AggregationSettings(kind="fedmom", server_lr=0.3, momentum=0.5).build()
    assert isinstance(mom, FedMom) and (mom.lr, mom.momentum) == (0.3, 0.5) and isinstance(mom, Aggregator)
    for momentum in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"fednesterov: momentum must be in \[0, 1\)"):
            AggregationSettings(kind="fednesterov", momentum=momentum).build()
    with pytest.raises(ValueError, match="fedavg: lr must be a finite number > 0"):
        AggregationSettings(kind="fedavg", server_lr=0.0).build()
