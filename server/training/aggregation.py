"""Merging the copies of a partition that several clients trained into the next global one.

When owners train in parallel every data owner drives its own pipeline, so at the end of a
round the server holds, for each partition, one trained copy per pipeline. An
:class:`Aggregator` turns the global tensors of the round and those copies into the next
global tensors. With ``x`` the round's global tensor, ``mean`` the sample-weighted mean of
the copies and ``Delta = x - mean`` the pseudo-gradient (Photon, DiLoCo)::

    rule         class          next global tensor                             default lr
    fedavg       FedAvg         x - lr Delta  (lr = 1: mean, exactly)          1.0
    fedmom       FedMom         m = mu m + Delta;  x - lr m                    0.7
    fednesterov  FedNesterov    m = mu m + Delta;  x - lr (Delta + mu m)       0.7
    fedadam      FedAdam        m = b1 m + (1 - b1) (-Delta)                   0.01
                                v = b2 v + (1 - b2) Delta^2
                                x + lr m / (sqrt(v) + tau)
    fedyogi      FedYogi        as fedadam, v = v - (1 - b2) Delta^2 sign(v - Delta^2)
    fedadagrad   FedAdagrad     as fedadam, v = v + Delta^2

- :class:`FedAvg` (McMahan et al. 2017) with a server learning rate (Photon uses 0.7-1.0);
  at ``lr = 1`` it is the plain weighted average and needs nothing but the copies.
- :class:`FedMom` and :class:`FedNesterov`: outer SGD with heavy-ball or Nesterov momentum,
  exactly ``torch.optim.SGD(momentum=mu, nesterov=...)`` stepping with ``Delta`` as the
  gradient (m starts at 0). DiLoCo's outer optimizer is FedNesterov with lr 0.7, mu 0.9.
- :class:`FedAdam`, :class:`FedYogi`, :class:`FedAdagrad` (Reddi et al. 2021, "Adaptive
  Federated Optimization", Algorithm 2; m starts at 0, v at tau^2, no bias correction).
  Photon's FedAdam is ``lr = 0.1, b1 = 0.9, b2 = 0.95``.

Every rule moves the global tensor toward the copies' mean (tests check each sign with one
client). All but FedAvg at ``lr = 1`` step from the state the copies started from
(:attr:`Aggregator.steps_from_start`), and the momentum rules keep their moments per tensor
name across rounds, in float32, in :meth:`~Aggregator.state_dict` (so in checkpoints).

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
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from proto.messages import TrainedSlices

__all__ = [
    "AGGREGATORS",
    "AggregationSettings",
    "Aggregator",
    "ClientUpdate",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedMom",
    "FedNesterov",
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
    # Tensors the client trained only in parts (heads mode), by name: its other entries of such a
    # tensor do not count in the average. A tensor not named here was trained whole.
    slices: Mapping[str, TrainedSlices] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 0:
            raise ValueError(
                f"num_samples of update {self.client_id!r} must be an integer >= 0, got {self.num_samples!r}"
            )


@runtime_checkable
class Aggregator(Protocol):
    """Turns a round's global tensors and the clients' copies into the next global tensors."""

    @property
    def steps_from_start(self) -> bool:
        """Whether aggregate() steps from the state the copies started from (a server optimizer).

        Then the run needs that state before round 1, and several copies per merge to mean much.
        """
        ...

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
        for name, part in update.slices.items():
            _check_slices(_describe(update, index), name, part, global_state.get(name))
    total = sum(update.num_samples for update in updates)
    if total == 0:
        raise ValueError("every update reports num_samples=0; a weighted average needs at least one sample")
    return total


def _check_slices(who: str, name: str, part: TrainedSlices, tensor: Tensor | None) -> None:
    """The slices a client says it trained must name a tensor of the state and fit its shape (network input)."""
    if tensor is None:
        raise ValueError(f"{who} names trained slices of {name!r}, which is not a tensor of the partition")
    if part.tensor != name:
        raise ValueError(f"{who}: the trained slices filed under {name!r} describe {part.tensor!r}")
    if not part.blocks:
        return  # nothing of it trained
    if not 0 <= part.dim < tensor.dim() or part.width < 1 or tensor.shape[part.dim] % part.width:
        raise ValueError(
            f"{who}: slices of {name!r} along axis {part.dim} of width {part.width} do not fit its shape "
            f"{tuple(tensor.shape)}; the client runs another model or version"
        )
    count = tensor.shape[part.dim] // part.width
    bad = [b for b in part.blocks if not 0 <= b < count]
    if bad:
        raise ValueError(f"{who}: slice {bad[0]} of {name!r} is out of range; it has {count} along axis {part.dim}")


def _trained_mask(update: ClientUpdate, name: str, tensor: Tensor) -> Tensor | None:
    """Where ``update`` trained ``name``, as a float64 0/1 tensor broadcasting against it (None: everywhere)."""
    part = update.slices.get(name)
    if part is None:
        return None
    if not part.blocks:
        return torch.zeros((1,) * tensor.dim(), dtype=torch.float64)
    slices = torch.zeros(tensor.shape[part.dim] // part.width, dtype=torch.float64)
    slices[list(part.blocks)] = 1.0
    shape = [1] * tensor.dim()
    shape[part.dim] = tensor.shape[part.dim]
    return slices.repeat_interleave(part.width).view(shape)


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
    Where copies trained a tensor only in parts (:attr:`ClientUpdate.slices`), each entry is
    the weighted mean over the copies that trained it, and an entry none trained keeps the
    global value (so a server optimizer sees no change there).
    """
    total = _check_updates(global_state, updates)
    for name, global_tensor in global_state.items():
        if not global_tensor.is_floating_point():
            _integer_tensor(name, global_tensor, updates)
            yield name, None
            continue
        if any(name in update.slices for update in updates):
            yield name, _sliced_mean(name, global_tensor, updates)
            continue
        accumulated = torch.zeros(global_tensor.shape, dtype=torch.float64)
        for update in updates:
            if update.num_samples:
                accumulated += update.num_samples * _client_values(global_tensor, update, name)
        yield name, accumulated / total


def _sliced_mean(name: str, global_tensor: Tensor, updates: Sequence[ClientUpdate]) -> Tensor:
    """Per entry, the sample-weighted mean over the copies that trained it; the global value where none did."""
    accumulated = torch.zeros(global_tensor.shape, dtype=torch.float64)
    weight = torch.zeros(global_tensor.shape, dtype=torch.float64)
    for update in updates:
        if not update.num_samples:
            continue
        mask = _trained_mask(update, name, global_tensor)
        share = update.num_samples * (mask if mask is not None else torch.ones((), dtype=torch.float64))
        accumulated += share * _client_values(global_tensor, update, name)
        weight += share
    kept = global_tensor.detach().to(device="cpu", dtype=torch.float64)
    return torch.where(weight > 0, accumulated / weight.clamp_min(1e-300), kept)


# --------------------------------------------------------------------------- shared checks


def _check_kind(state: Mapping[str, Any], kind: str) -> None:
    found = state.get("kind")
    if found != kind:
        raise ValueError(
            f"the saved aggregator state is {found!r}, this run uses {kind!r}; resume with the "
            "aggregator the run started with"
        )


def _check_lr(kind: str, lr: float) -> None:
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{kind}: lr must be a finite number > 0, got {lr!r}")


def _check_decay(kind: str, name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{kind}: {name} must be in [0, 1), got {value!r}")


def _server_lr(settings: AggregationSettings, default: float) -> float:
    """The run's server learning rate, or the rule's own ``default`` when the run leaves it unset."""
    return default if settings.server_lr is None else settings.server_lr


# --------------------------------------------------------------------------- FedAvg


class FedAvg:
    """The sample-weighted mean of the copies, reached by a server step: x - lr (x - mean).

    At ``lr = 1`` (the default) the result is the mean itself, sum_i n_i x_i / sum_i n_i, exact
    in float64, and the round's starting state is not needed. Other rates interpolate
    (lr < 1) or extrapolate (lr > 1) from the starting state, which the run must then keep.
    """

    kind: ClassVar[str] = "fedavg"
    default_lr: ClassVar[float] = 1.0

    @classmethod
    def from_settings(cls, settings: AggregationSettings) -> FedAvg:
        """FedAvg with the run's server_lr (1.0 when unset: plain averaging)."""
        return cls(lr=_server_lr(settings, cls.default_lr))

    def __init__(self, *, lr: float = 1.0) -> None:
        _check_lr(self.kind, lr)
        self.lr = lr  # server learning rate; 1.0 is plain averaging

    @property
    def steps_from_start(self) -> bool:
        """Only a server learning rate other than 1 needs the state the copies started from."""
        return self.lr != 1.0

    def aggregate(self, global_state: Mapping[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        """The (stepped) weighted average, in each global tensor's dtype and device."""
        merged: dict[str, Tensor] = {}
        for name, mean in weighted_mean(global_state, updates):
            target = global_state[name]
            if mean is None:
                merged[name] = target.detach().clone()
                continue
            if self.lr != 1.0:
                current = target.detach().to(device="cpu", dtype=torch.float64)
                mean = current - self.lr * (current - mean)
            merged[name] = mean.to(target.dtype).to(target.device)
        return merged

    def state_dict(self) -> dict[str, Any]:
        """FedAvg keeps nothing between rounds (lr is recorded for reading only)."""
        return {"kind": self.kind, "lr": self.lr}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check that ``state`` came from a FedAvg."""
        _check_kind(state, self.kind)


# --------------------------------------------------------------------------- server optimizers


class _ServerOptimizer:
    """A server optimizer step on the pseudo-gradient, with per-name buffers kept across rounds.

    Subclasses name their buffers (:attr:`buffers`), say how they start and how one step
    changes the global tensor; this class runs the step over every floating tensor, commits
    the buffers only when the whole call succeeds, and saves and restores them.
    """

    kind: ClassVar[str] = ""
    default_lr: ClassVar[float]
    buffers: ClassVar[tuple[str, ...]]  # names of the per-tensor moments (float32, one per name)
    steps_from_start: ClassVar[bool] = True

    def __init__(self, *, lr: float) -> None:
        _check_lr(self.kind, lr)
        self.lr = lr  # server learning rate
        self.rounds = 0  # aggregate() calls so far (bookkeeping for resumed runs)
        self._moments: dict[str, dict[str, Tensor]] = {buffer: {} for buffer in self.buffers}

    def _hyperparameters(self) -> dict[str, float]:
        raise NotImplementedError

    def _initial(self, like: Tensor) -> tuple[Tensor, ...]:
        """The buffers of a tensor seen for the first time."""
        raise NotImplementedError

    def _step(self, gradient: Tensor, moments: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """(change to add to the global tensor, new buffers) for pseudo-gradient x - mean (float32)."""
        raise NotImplementedError

    def _moments_of(self, name: str, gradient: Tensor) -> tuple[Tensor, ...]:
        if name not in self._moments[self.buffers[0]]:
            return self._initial(gradient)
        moments = tuple(self._moments[buffer][name] for buffer in self.buffers)
        if any(moment.shape != gradient.shape for moment in moments):
            raise ValueError(
                f"{self.kind}: saved moments of {name!r} have shape {tuple(moments[0].shape)}, the tensor "
                f"{tuple(gradient.shape)}; the optimizer state belongs to another model"
            )
        return moments

    def aggregate(self, global_state: Mapping[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        """One server optimizer step on every floating tensor of ``global_state``."""
        merged: dict[str, Tensor] = {}
        stepped: dict[str, tuple[Tensor, ...]] = {}
        for name, mean in weighted_mean(global_state, updates):
            target = global_state[name]
            if mean is None:
                merged[name] = target.detach().clone()
                continue
            current = target.detach().to(device="cpu", dtype=torch.float64)
            gradient = (current - mean).float()  # the pseudo-gradient Delta
            change, stepped[name] = self._step(gradient, self._moments_of(name, gradient))
            merged[name] = (current + change.double()).to(target.dtype).to(target.device)
        # Commit the moments only when every tensor went through, so a refused call changes nothing.
        for name, moments in stepped.items():
            for buffer, moment in zip(self.buffers, moments, strict=True):
                self._moments[buffer][name] = moment
        self.rounds += 1
        return merged

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters, the round count and the moments (float32 tensors, per name)."""
        return {
            "kind": self.kind,
            **self._hyperparameters(),
            "rounds": self.rounds,
            **{buffer: {name: t.clone() for name, t in self._moments[buffer].items()} for buffer in self.buffers},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore moments and round count; the hyperparameters stay those of the constructor."""
        _check_kind(state, self.kind)
        saved: list[Mapping[str, Any]] = []
        for buffer in self.buffers:
            moments = state.get(buffer)
            if not isinstance(moments, Mapping) or (saved and set(moments) != set(saved[0])):
                wanted = " and ".join(repr(buffer) for buffer in self.buffers)
                raise ValueError(f"{self.kind}: the saved state needs {wanted} dicts with the same names")
            saved.append(moments)
        for name in saved[0]:
            tensors = [moments[name] for moments in saved]
            if not all(isinstance(t, Tensor) and t.shape == tensors[0].shape for t in tensors):
                raise ValueError(f"{self.kind}: the saved moments of {name!r} are not tensors of one shape")
        self._moments = {
            buffer: {name: t.detach().float().cpu().clone() for name, t in moments.items()}
            for buffer, moments in zip(self.buffers, saved, strict=True)
        }
        self.rounds = int(state.get("rounds", 0))


# --------------------------------------------------------------------------- outer SGD with momentum


class _OuterSGD(_ServerOptimizer):
    """Outer SGD with momentum on the pseudo-gradient Delta (torch.optim.SGD, dampening 0)::

        m = mu * m + Delta                      (m starts at 0)
        heavy ball:  x = x - lr * m
        Nesterov:    x = x - lr * (Delta + mu * m)
    """

    nesterov: ClassVar[bool] = False
    default_lr: ClassVar[float] = 0.7
    buffers: ClassVar[tuple[str, ...]] = ("m",)

    @classmethod
    def from_settings(cls, settings: AggregationSettings) -> _OuterSGD:
        """The optimizer with the run's server_lr (0.7 when unset) and momentum."""
        return cls(lr=_server_lr(settings, cls.default_lr), momentum=settings.momentum)

    def __init__(self, *, lr: float = 0.7, momentum: float = 0.9) -> None:
        _check_decay(self.kind, "momentum", momentum)
        super().__init__(lr=lr)
        self.momentum = momentum  # mu: how much of the last round's step carries over

    def _hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "momentum": self.momentum}

    def _initial(self, like: Tensor) -> tuple[Tensor, ...]:
        return (torch.zeros_like(like),)

    def _step(self, gradient: Tensor, moments: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        m = self.momentum * moments[0] + gradient
        direction = gradient + self.momentum * m if self.nesterov else m
        return -self.lr * direction, (m,)


class FedMom(_OuterSGD):
    """Outer SGD with heavy-ball momentum (Photon's FedMom): m = mu m + Delta; x - lr m."""

    kind = "fedmom"


class FedNesterov(_OuterSGD):
    """Outer SGD with Nesterov momentum (DiLoCo, lr 0.7, mu 0.9): m = mu m + Delta; x - lr (Delta + mu m)."""

    kind = "fednesterov"
    nesterov = True


# --------------------------------------------------------------------------- adaptive server optimizers


class _AdaptiveServerOptimizer(_ServerOptimizer):
    """Reddi et al. 2021, Algorithm 2, for one second-moment rule (set by subclasses).

    With D = (weighted mean of the client copies) - global = -Delta, minus the pseudo-gradient::

        m = beta1 * m + (1 - beta1) * D
        v = <second-moment rule>(v, D^2)
        global = global + lr * m / (sqrt(v) + tau)

    m starts at 0 and v at tau^2, as in the paper (no bias correction). Moments are float32
    and kept per tensor name, so one instance serves every partition of a model.
    """

    default_lr: ClassVar[float] = 1e-2
    buffers: ClassVar[tuple[str, ...]] = ("m", "v")

    @classmethod
    def from_settings(cls, settings: AggregationSettings) -> _AdaptiveServerOptimizer:
        """The optimizer with the run's server_lr (0.01 when unset), beta1, beta2 and tau."""
        lr = _server_lr(settings, cls.default_lr)
        return cls(lr=lr, beta1=settings.beta1, beta2=settings.beta2, tau=settings.tau)

    def __init__(self, *, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        _check_lr(self.kind, lr)
        if not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"{self.kind}: tau must be a finite number > 0, got {tau!r}")
        _check_decay(self.kind, "beta1", beta1)
        _check_decay(self.kind, "beta2", beta2)
        super().__init__(lr=lr)
        self.beta1 = beta1  # decay of the first moment
        self.beta2 = beta2  # decay of the second moment (unused by FedAdagrad)
        self.tau = tau  # adaptivity: added to sqrt(v); v starts at tau^2

    def _hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}

    def _initial(self, like: Tensor) -> tuple[Tensor, ...]:
        return torch.zeros_like(like), torch.full_like(like, self.tau**2)

    def _second_moment(self, v: Tensor, delta_squared: Tensor) -> Tensor:
        raise NotImplementedError

    def _step(self, gradient: Tensor, moments: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        delta = -gradient  # mean - global, as in the paper (and in the m of older checkpoints)
        m, v = moments
        m = self.beta1 * m + (1.0 - self.beta1) * delta
        v = self._second_moment(v, delta * delta)
        return self.lr * m / (v.sqrt() + self.tau), (m, v)


class FedAdam(_AdaptiveServerOptimizer):
    """Server Adam: v = beta2 * v + (1 - beta2) * D^2."""

    kind = "fedadam"

    def _second_moment(self, v: Tensor, delta_squared: Tensor) -> Tensor:
        return self.beta2 * v + (1.0 - self.beta2) * delta_squared


class FedYogi(_AdaptiveServerOptimizer):
    """Server Yogi: v = v - (1 - beta2) * D^2 * sign(v - D^2); v grows slower than Adam's."""

    kind = "fedyogi"

    def _second_moment(self, v: Tensor, delta_squared: Tensor) -> Tensor:
        return v - (1.0 - self.beta2) * delta_squared * torch.sign(v - delta_squared)


class FedAdagrad(_AdaptiveServerOptimizer):
    """Server Adagrad: v = v + D^2."""

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
    "fedmom": FedMom,
    "fednesterov": FedNesterov,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class AggregationSettings:
    """How the server merges the copies of a partition (from the ``[aggregation]`` table of a run)."""

    kind: str = "fedavg"  # a name in AGGREGATORS: fedavg, fedmom, fednesterov, fedadam, fedyogi, fedadagrad
    # Server learning rate; None: the rule's own default (fedavg 1.0, which is plain averaging;
    # fedmom and fednesterov 0.7; fedadam, fedyogi and fedadagrad 0.01).
    server_lr: float | None = None
    momentum: float = 0.9  # momentum (mu) of fedmom and fednesterov
    beta1: float = 0.9  # first-moment decay of fedadam, fedyogi and fedadagrad
    beta2: float = 0.99  # second-moment decay of fedadam and fedyogi
    tau: float = 1e-3  # adaptivity of fedadam, fedyogi, fedadagrad: larger is closer to plain averaging steps

    def __post_init__(self) -> None:
        if self.kind not in AGGREGATORS:
            raise ValueError(f"[aggregation] rule must be one of {', '.join(AGGREGATORS)}, got {self.kind!r}")

    def build(self) -> Aggregator:
        """A fresh aggregator with these settings (checks the numbers)."""
        return AGGREGATORS[self.kind].from_settings(self)
