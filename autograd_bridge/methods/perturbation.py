"""Perturbations drawn from seeds, and the parameters they perturb: the numerics of forward gradients.

A perturbation ``v`` of a model's trainable tensors is identified by one integer seed. Each
tensor's part of ``v`` is drawn from N(0, 1) by its own ``torch.Generator``, seeded from the
pair (seed, whole-model tensor name) (:func:`tensor_seed`). So any holder of a tensor
derives the same part of ``v`` without the others: a stage host draws its own part, the
owner draws the parts of its stages, and the server (or anyone) rebuilds an update from
``(seed, coefficient)`` pairs, whichever way the model is split.

:class:`ParameterSpace` holds some trainable tensors (a stage's, or a whole model's) and does
everything forward gradients need of them: move them to ``base + scale * v`` and back exactly
(from a kept copy, never by subtracting, so nothing drifts), apply ``sum_k alpha_k v_k``,
and measure ``v`` against a direction (the sampler's cosine).

Applying ``(seed, alpha)`` pairs is done in one fixed order (per tensor: start from zeros,
add each ``alpha * v`` in the pairs' order, then add that sum to the tensor), so
:func:`rebuild_change` gives bit for bit the change a holder applied.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

#: seeds are drawn below this bound (they travel as int64)
SEED_BOUND = 2**63


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of tensor ``name``'s part of perturbation ``seed`` (a 63-bit hash of both)."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % SEED_BOUND


def perturbation(seed: int, name: str, shape: Sequence[int] | torch.Size) -> Tensor:
    """Tensor ``name``'s part of perturbation ``seed``: ``shape`` entries of N(0, 1), float32, on the CPU."""
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def summed_perturbations(
    pairs: Sequence[tuple[int, float]], name: str, shape: Sequence[int] | torch.Size
) -> Tensor:
    """``sum_k alpha_k v_k`` for tensor ``name`` (float32), added in the order of ``pairs``."""
    total = torch.zeros(tuple(shape), dtype=torch.float32)
    for seed, alpha in pairs:
        total.add_(perturbation(seed, name, shape), alpha=float(alpha))
    return total


def rebuild_change(
    steps: Sequence[Sequence[tuple[int, float]]], shapes: Mapping[str, Sequence[int]]
) -> dict[str, Tensor]:
    """The change ``steps`` of ``(seed, alpha)`` pairs made to tensors of ``shapes``: the sum of each step's sum."""
    change: dict[str, Tensor] = {}
    for name, shape in shapes.items():
        total = torch.zeros(tuple(shape), dtype=torch.float32)
        for pairs in steps:
            total.add_(summed_perturbations(pairs, name, shape))
        change[name] = total
    return change


def replay(start: Mapping[str, Tensor], steps: Sequence[Sequence[tuple[int, float]]]) -> dict[str, Tensor]:
    """The tensors a holder ended with, from those it ``start``\\ ed with and the steps it applied (bit for bit)."""
    out = {name: t.detach().clone() for name, t in start.items()}
    for pairs in steps:
        for name, t in out.items():
            t.add_(summed_perturbations(pairs, name, t.shape).to(t.dtype))
    return out


#: stage module -> every step of (seed, alpha) pairs applied to its tensors by a ParameterSpace,
#: in order: what its holder uploads instead of the tensors (see autograd_bridge.codecs.seeds)
_APPLIED: weakref.WeakKeyDictionary[nn.Module, list[list[tuple[int, float]]]] = weakref.WeakKeyDictionary()


def applied_steps(stage: nn.Module) -> list[list[tuple[int, float]]]:
    """Every step applied to ``stage`` along seeded directions so far (empty: none), oldest first."""
    return _APPLIED.get(stage, [])


class ParameterSpace:
    """Trainable tensors under whole-model names, perturbed and updated along seeded directions."""

    def __init__(self, named: Iterable[tuple[str, nn.Parameter]], stages: Sequence[nn.Module] = ()) -> None:
        self.stages = list(stages)  # whose applied steps are logged (applied_steps)
        self.params: dict[str, nn.Parameter] = {}
        for name, p in named:
            if p.requires_grad and name not in self.params:
                self.params[name] = p
        self._base: dict[str, Tensor] | None = None
        # The sampler's direction: the last change made from outside (a server's merge), see observe().
        self.direction: dict[str, Tensor] | None = None
        self._loaded: dict[str, Tensor] | None = None  # the values last loaded from outside
        self._after: dict[str, Tensor] | None = None  # the values right after this holder's last apply

    @classmethod
    def of_stages(cls, stages: Iterable[nn.Module]) -> ParameterSpace:
        """The trainable tensors of stage modules (``named_model_parameters``) or plain modules."""
        stages = list(stages)
        named: list[tuple[str, nn.Parameter]] = []
        for stage in stages:
            source = getattr(stage, "named_model_parameters", stage.named_parameters)
            named.extend(source())
        return cls(named, stages)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(p.shape) for name, p in self.params.items()}

    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def observe(self) -> None:
        """Before a step: when the tensors changed since this holder's last apply, they were loaded
        (the server's merged values); their change since the previous load is the previous global
        update, the :attr:`direction` the sampler aligns perturbations with."""
        if self._base is not None or (self._after is None and self._loaded is not None):
            return  # perturbed, or nothing applied since the last look: nothing to learn
        now = self.values()
        if self._loaded is None:
            self._loaded = now
        elif self._after is not None and any(not torch.equal(now[n], t) for n, t in self._after.items()):
            self.direction = {n: now[n].float() - self._loaded[n].float() for n in now}
            self._loaded = now
        self._after = None

    @torch.no_grad()
    def perturb(self, seed: int, scale: float) -> None:
        """Set every tensor to ``base + scale * v(seed)``, ``base`` being its value before the first perturb."""
        if self._base is None:
            self._base = {name: p.detach().clone() for name, p in self.params.items()}
        for name, p in self.params.items():
            v = perturbation(seed, name, p.shape).to(p.dtype)
            torch.add(self._base[name], v, alpha=scale, out=p.data)

    @torch.no_grad()
    def restore(self) -> None:
        """Copy every tensor back to its value before :meth:`perturb` (exactly), and drop the copy."""
        if self._base is None:
            return
        for name, p in self.params.items():
            p.data.copy_(self._base[name])
        self._base = None

    @torch.no_grad()
    def apply(self, pairs: Sequence[tuple[int, float]]) -> None:
        """Add ``sum_k alpha_k v_k`` to every tensor (the order :func:`replay` repeats)."""
        if self._base is not None:
            raise RuntimeError("apply() while perturbed: restore() first")
        for name, p in self.params.items():
            p.data.add_(summed_perturbations(pairs, name, p.shape).to(p.dtype))
        self._after = self.values()
        for stage in self.stages:
            _APPLIED.setdefault(stage, []).append(list(pairs))

    def sq_norm(self, pairs: Sequence[tuple[int, float]]) -> float:
        """``||sum_k alpha_k v_k||^2`` over these tensors."""
        return sum(float(summed_perturbations(pairs, name, p.shape).double().pow(2).sum())
                   for name, p in self.params.items())  # fmt: skip

    def alignment(self, seeds: Sequence[int]) -> list[tuple[float, float]] | None:
        """Per seed, ``(v . d, ||v||^2)`` over these tensors for the :attr:`direction` ``d`` (None: none known yet)."""
        direction = self.direction
        if direction is None:
            return None
        out: list[tuple[float, float]] = []
        for seed in seeds:
            dot = sq = 0.0
            for name, p in self.params.items():
                v = perturbation(seed, name, p.shape).double()
                sq += float(v.pow(2).sum())
                if name in direction:
                    dot += float((v * direction[name].double()).sum())
            out.append((dot, sq))
        return out

    def values(self) -> dict[str, Tensor]:
        """A copy of every tensor, by name."""
        return {name: p.detach().clone() for name, p in self.params.items()}
