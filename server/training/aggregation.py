"""Merging the copies of a partition that several clients trained into the next global one.

When owners train in parallel every data owner drives its own pipeline, so at the end of a
round the server holds, for each partition, one trained copy per pipeline. An
:class:`Aggregator` turns the global tensors of the round and those copies into the next
global tensors:

- :class:`FedAvg` (McMahan et al. 2017): the sample-weighted average of the copies.
- :class:`FedAdam`, :class:`FedYogi`, :class:`FedAdagrad` (Reddi et al. 2021, "Adaptive
  Federated Optimization", Algorithm 2): the weighted mean change of the copies is a
  pseudo-gradient that a server optimizer applies, with moments kept across rounds.

State dicts are keyed by whole-model parameter names (``model.layers.3.mlp.up_proj.weight``)
or by PEFT adapter names (``...q_proj.lora_A.weight``); names are unique across partitions,
so one aggregator instance can merge every partition of a model, one call per partition,
and a server optimizer keeps its moments per name. Sums run in float64 and the result is
cast back to the global tensor's dtype, so a bf16 model does not lose the small updates.

A run file chooses the rule by name (``[aggregation] rule``); the run manager holds the one
aggregator :meth:`AggregationSettings.build` makes and never asks which it is. A new rule is
a class with the :class:`Aggregator` members plus one line in :data:`AGGREGATORS`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "AGGREGATORS",
    "AggregationSettings",
    "Aggregator",
    "ClientUpdate",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedYogi",
    "weighted_mean",
]

@dataclass(frozen=True, slots=True, kw_only=True)
class ClientUpdate:
    """One client's trained copy of a partition (or of its adapters)."""

    state: Mapping[str, Tensor]  # name -> trained tensor, or the change from the global tensor
    num_samples: int  # training sequences behind this copy; its weight in the average
    delta: bool = False  # True when ``state`` holds changes (trained - global), not trained values
    client_id: str = ""  # who sent it, for error messages only

    def __post_init__(self) -> None:
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 0:
            raise ValueError(
                f"num_samples of update {self.client_id!r} must be an integer >= 0, got {self.num_samples!r}"
            )


@runtime_checkable
class Aggregator(Protocol):
    """Turns a round's global tensors and the clients' copies into the next global tensors."""

    # Whether aggregate() steps from the state the copies started from (a server optimizer):
    # then the run needs that state before round 1, and several copies per merge to mean much.
    steps_from_start: ClassVar[bool]

    @classmethod
    def from_settings(cls, settings: AggregationSettings) -> Aggregator:
        """A fresh aggregator with the run's settings (ValueError for numbers it cannot use)."""
        ...

    def aggregate(self, global_state: Mapping[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        """The next global tensors: same names, shapes and dtypes as ``global_state``."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: JSON values and tensors only."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


# --------------------------------------------------------------------------- checks and the mean


def _describe(update: ClientUpdate, index: int) -> str:
    return f"update {index}" + (f" (client {update.client_id!r})" if update.client_id else "")


def _check_updates(global_state: Mapping[str, Tensor], updates: Sequence[ClientUpdate]) -> int:
    """Validate names, shapes and weights; return the total number of samples."""
    if not updates:
        raise ValueError("no client updates to aggregate; wait for at least one copy of the partition")
    expected = set(global_state)
    for index, update in enumerate(updates):
        names = set(update.state)
        if names != expected:
            missing = sorted(expected - names)[:5]
            extra = sorted(names - expected)[:5]
            raise ValueError(
                f"{_describe(update, index)} does not hold the same tensors as the global state "
                f"(missing {missing}, unexpected {extra}); every copy must come from the same partition"
            )
        for name, tensor in update.state.items():
            want = global_state[name]
            if tensor.shape != want.shape:
                raise ValueError(
                    f"{_describe(update, index)}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"the global one {tuple(want.shape)}; the copies come from a different model or plan"
                )
            if tensor.is_floating_point() != want.is_floating_point():
                raise ValueError(
                    f"{_describe(update, index)}: tensor {name!r} is {tensor.dtype}, the global one "
                    f"{want.dtype}; floating and integer tensors cannot be averaged together"
                )
    total = sum(update.num_samples for update in updates)
    if total == 0:
        raise ValueError("every update reports num_samples=0; a weighted average needs at least one sample")
    return total


def _client_values(global_tensor: Tensor, update: ClientUpdate, name: str) -> Tensor:
    """The client's trained tensor in float64 (adding the global tensor to a delta)."""
    value = update.state[name].detach().to(device="cpu", dtype=torch.float64)
    if update.delta:
        value = value + global_tensor.detach().to(device="cpu", dtype=torch.float64)
    return value


def _integer_tensor(name: str, global_tensor: Tensor, updates: Sequence[ClientUpdate]) -> Tensor:
    """Integer tensors (step counters, index buffers) cannot be averaged: all copies must agree."""
    for index, update in enumerate(updates):
        value = update.state[name]
        trained = global_tensor + value if update.delta else value
        if not torch.equal(trained.cpu(), global_tensor.cpu()):
            raise ValueError(
                f"{_describe(update, index)} changed the integer tensor {name!r}; only floating "
                "tensors can be averaged, keep integer buffers out of the trained state"
            )
    return global_tensor.detach().clone()


def weighted_mean(
    global_state: Mapping[str, Tensor], updates: Sequence[ClientUpdate]
) -> Iterator[tuple[str, Tensor | None]]:
    """``(name, float64 sample-weighted mean of the trained copies)`` per floating tensor.

    Integer tensors yield ``None`` after checking that no copy changed them. One tensor is
    summed at a time, so the float64 copies never hold more than one tensor per client.
    """
    total = _check_updates(global_state, updates)
    for name, global_tensor in global_state.items():
        if not global_tensor.is_floating_point():
            _integer_tensor(name, global_tensor, updates)
            yield name, None
            continue
        accumulated = torch.zeros(global_tensor.shape, dtype=torch.float64)
        for update in updates:
            if update.num_samples:
                accumulated += update.num_samples * _client_values(global_tensor, update, name)
        yield name, accumulated / total


# --------------------------------------------------------------------------- FedAvg


class FedAvg:
    """The sample-weighted average of the copies: sum_i n_i x_i / sum_i n_i, exact in float64."""

    steps_from_start: ClassVar[bool] = False

    @classmethod
    def from_settings(cls, settings: AggregationSettings) -> FedAvg:
        """FedAvg has no settings."""
        return cls()

    def aggregate(self, global_state: Mapping[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        """The weighted average, in each global tensor's dtype and device."""
        merged: dict[str, Tensor] = {}
        for name, mean in weighted_mean(global_state, updates):
            target = global_state[name]
            merged[name] = target.detach().clone() if mean is None else mean.to(target.dtype).to(target.device)
        return merged

    def state_dict(self) -> dict[str, Any]:
        """FedAvg keeps nothing between rounds."""
        return {"kind": "fedavg"}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check that ``state`` came from a FedAvg."""
        _check_kind(state, "fedavg")


def _check_kind(state: Mapping[str, Any], kind: str) -> None:
    found = state.get("kind")
    if found != kind:
        raise ValueError(
            f"the saved aggregator state is {found!r}, this run uses {kind!r}; resume with the "
            "aggregator the run started with"
        )


# --------------------------------------------------------------------------- adaptive server optimizers


class _AdaptiveServerOptimizer:
    """Reddi et al. 2021, Algorithm 2, for one second-moment rule (set by subclasses).

    With Delta = (weighted mean of the client copies) - global, i.e. minus the pseudo-gradient::

        m = beta1 * m + (1 - beta1) * Delta
        v = <second-moment rule>(v, Delta^2)
        global = global + lr * m / (sqrt(v) + tau)

    m starts at 0 and v at tau^2, as in the paper (no bias correction). Moments are float32
    and kept per tensor name, so one instance serves every partition of a model.
    """

    kind: str = ""
    steps_from_start: ClassVar[bool] = True

    @classmethod
    def from_settings(cls, settings: AggregationSettings) -> _AdaptiveServerOptimizer:
        """The optimizer with the run's server_lr, beta1, beta2 and tau."""
        return cls(lr=settings.server_lr, beta1=settings.beta1, beta2=settings.beta2, tau=settings.tau)

    def __init__(self, *, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        for name, value in (("lr", lr), ("tau", tau)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{self.kind}: {name} must be a finite number > 0, got {value!r}")
        for name, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{self.kind}: {name} must be in [0, 1), got {value!r}")
        self.lr = lr  # server learning rate (eta in the paper)
        self.beta1 = beta1  # decay of the first moment
        self.beta2 = beta2  # decay of the second moment (unused by FedAdagrad)
        self.tau = tau  # adaptivity: added to sqrt(v); v starts at tau^2
        self.rounds = 0  # aggregate() calls so far (bookkeeping for resumed runs)
        self._m: dict[str, Tensor] = {}
        self._v: dict[str, Tensor] = {}

    def _second_moment(self, v: Tensor, delta_squared: Tensor) -> Tensor:
        raise NotImplementedError

    def aggregate(self, global_state: Mapping[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        """One server optimizer step on every floating tensor of ``global_state``."""
        merged: dict[str, Tensor] = {}
        moments: dict[str, tuple[Tensor, Tensor]] = {}
        for name, mean in weighted_mean(global_state, updates):
            target = global_state[name]
            if mean is None:
                merged[name] = target.detach().clone()
                continue
            current = target.detach().to(device="cpu", dtype=torch.float64)
            delta = (mean - current).float()  # minus the pseudo-gradient
            m = self._m.get(name, torch.zeros_like(delta))
            v = self._v.get(name, torch.full_like(delta, self.tau**2))
            if m.shape != delta.shape or v.shape != delta.shape:
                raise ValueError(
                    f"{self.kind}: saved moments of {name!r} have shape {tuple(m.shape)}, the tensor "
                    f"{tuple(delta.shape)}; the optimizer state belongs to another model"
                )
            m = self.beta1 * m + (1.0 - self.beta1) * delta
            v = self._second_moment(v, delta * delta)
            step = self.lr * m / (v.sqrt() + self.tau)
            merged[name] = (current + step.double()).to(target.dtype).to(target.device)
            moments[name] = (m, v)
        # Commit the moments only when every tensor went through, so a refused call changes nothing.
        for name, (m, v) in moments.items():
            self._m[name] = m
            self._v[name] = v
        self.rounds += 1
        return merged

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters, the round count and both moments (float32 tensors, per name)."""
        return {
            "kind": self.kind,
            "lr": self.lr,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "tau": self.tau,
            "rounds": self.rounds,
            "m": {name: tensor.clone() for name, tensor in self._m.items()},
            "v": {name: tensor.clone() for name, tensor in self._v.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore moments and round count; the hyperparameters stay those of the constructor."""
        _check_kind(state, self.kind)
        m, v = state.get("m"), state.get("v")
        if not isinstance(m, Mapping) or not isinstance(v, Mapping) or set(m) != set(v):
            raise ValueError(f"{self.kind}: the saved state needs 'm' and 'v' dicts with the same names")
        for name in m:
            if not isinstance(m[name], Tensor) or not isinstance(v[name], Tensor) or m[name].shape != v[name].shape:
                raise ValueError(f"{self.kind}: the saved moments of {name!r} are not two tensors of one shape")
        self._m = {name: tensor.detach().float().cpu().clone() for name, tensor in m.items()}
        self._v = {name: tensor.detach().float().cpu().clone() for name, tensor in v.items()}
        self.rounds = int(state.get("rounds", 0))


class FedAdam(_AdaptiveServerOptimizer):
    """Server Adam: v = beta2 * v + (1 - beta2) * Delta^2."""

    kind = "fedadam"

    def _second_moment(self, v: Tensor, delta_squared: Tensor) -> Tensor:
        return self.beta2 * v + (1.0 - self.beta2) * delta_squared


class FedYogi(_AdaptiveServerOptimizer):
    """Server Yogi: v = v - (1 - beta2) * Delta^2 * sign(v - Delta^2); v grows slower than Adam's."""

    kind = "fedyogi"

    def _second_moment(self, v: Tensor, delta_squared: Tensor) -> Tensor:
        return v - (1.0 - self.beta2) * delta_squared * torch.sign(v - delta_squared)


class FedAdagrad(_AdaptiveServerOptimizer):
    """Server Adagrad: v = v + Delta^2."""

    kind = "fedadagrad"

    def _second_moment(self, v: Tensor, delta_squared: Tensor) -> Tensor:
        return v + delta_squared


# --------------------------------------------------------------------------- the registry and settings

#: name -> the rule; a run file names one in ``[aggregation] rule``
AGGREGATORS: dict[str, type[Aggregator]] = {
    "fedavg": FedAvg,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class AggregationSettings:
    """How the server merges the copies of a partition (from the ``[aggregation]`` table of a run)."""

    kind: str = "fedavg"  # a name in AGGREGATORS: fedavg, or a server optimizer (fedadam, fedyogi, fedadagrad)
    server_lr: float = 1e-2  # server learning rate of the optimizers (unused by fedavg)
    beta1: float = 0.9  # first-moment decay of the optimizers
    beta2: float = 0.99  # second-moment decay of fedadam and fedyogi
    tau: float = 1e-3  # adaptivity of the optimizers: larger is closer to plain averaging steps

    def __post_init__(self) -> None:
        if self.kind not in AGGREGATORS:
            raise ValueError(f"[aggregation] rule must be one of {', '.join(AGGREGATORS)}, got {self.kind!r}")

    def build(self) -> Aggregator:
        """A fresh aggregator with these settings (checks the numbers)."""
        return AGGREGATORS[self.kind].from_settings(self)
