"""Forward gradients (FwdLLM): train from perturbed forward passes only, no backward anywhere.

For a perturbation ``v ~ N(0, I)`` of the trainable tensors, ``(grad L . v) v`` is an unbiased
estimate of the gradient. The directional derivative comes from two inferences, by central
differences::

    d = (L(p + h v) - L(p - h v)) / 2h

and a step averages K of them: ``g = (1/K) sum_k d_k v_k``, then ``p -= lr * g`` (scaled down
so that ``||g||`` is at most ``clip_norm`` when set). No activation is kept for a backward
pass: every forward runs as evaluation (``torch.no_grad`` locally, ``train=False`` on hosts).

* **Seeds.** Each ``v_k`` is drawn from a seed (:mod:`.perturbation`), so a step is the list of
  pairs ``(seed_k, alpha_k = -lr * scale * d_k / K)``: every holder of a tensor applies its own
  part, and the server rebuilds the update from the pairs (:attr:`ForwardGradient.applied`).
* **Adaptive K** (the variance rule): after ``perturbations`` directions, while the estimated
  per-coordinate variance of ``g`` is above ``var_threshold`` and K is below
  ``max_perturbations``, ``perturbations`` more are drawn for the same batch. For ``v ~ N(0, I)``
  each coordinate of ``d v`` has variance ``||grad||^2 + grad_i^2``, about ``E[d^2]`` since
  ``E[d^2] = ||grad||^2``; the variance of the mean of K is that over K. So the rule is
  ``mean_k(d_k^2) / K > var_threshold``, computed from the scalars alone (no host need send
  more than its loss).
* **The discriminative sampler**: ``candidates`` times as many seeds are drawn, and the K whose
  ``v`` is best aligned (largest ``|cos(v, u)|``; ``v`` and ``-v`` give the same estimate) with
  the previous global update ``u`` are used. ``u`` is what the server's last merge changed
  (see :meth:`~.perturbation.ParameterSpace.observe`); before the first merge seeds are used
  as drawn.

The step is plain SGD on the estimate: the owner's optimizer is not used (an Adam state would
have to be replayed wherever the update is rebuilt). Remote stages are perturbed and updated
by their hosts (:mod:`.remote_space`: PERTURB, APPLY_DIRECTIONAL, ALIGNMENT frames); only
evaluation forwards and scalars cross the bridge. The whole batch is evaluated at once (the
pipeline's micro-batching is not used), and the pipeline's stage timings are not recorded.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..frames import MessageKind
from .perturbation import ParameterSpace

#: one step's update: (seed, coefficient) pairs
Pairs = list[tuple[int, float]]


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardGradientSettings:
    """How forward gradients are estimated (run file ``[forward_gradient]``)."""

    h: float = 0.01  # central-difference step: the perturbation is h * v
    perturbations: int = 4  # directions per step to start with (and added per round of the variance rule)
    max_perturbations: int = 16  # the variance rule stops adding directions here
    var_threshold: float = 0.0  # add directions while mean(d^2) / K exceeds this (0: K stays fixed)
    sampler: bool = (
        False  # keep the best aligned of `candidates` x K drawn seeds with the previous global update
    )
    candidates: int = 10  # how many seeds the sampler draws per direction it keeps
    seed: int | None = None  # seeds the seed stream (None: drawn from the OS, so owners differ)

    def to_options(self) -> dict[str, str]:
        """These settings as text (PrepareRun ``method_options``); :meth:`from_options` reads them back."""
        out = {f: repr(getattr(self, f)) for f in _NUMBERS}
        out["sampler"] = "true" if self.sampler else "false"
        if self.seed is not None:
            out["seed"] = str(self.seed)
        return out

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> ForwardGradientSettings:
        """Settings from text options (network input); keys not given keep their defaults."""
        values: dict[str, Any] = {}
        for key, kind in _NUMBERS.items():
            if key in options:
                try:
                    values[key] = kind(options[key])
                except ValueError as exc:
                    raise ValueError(
                        f"forward_gradient {key} must be a {kind.__name__}, got {options[key]!r}"
                    ) from exc
        if "sampler" in options:
            if options["sampler"] not in ("true", "false"):
                raise ValueError(
                    f"forward_gradient sampler must be true or false, got {options['sampler']!r}"
                )
            values["sampler"] = options["sampler"] == "true"
        if "seed" in options:
            if not options["seed"].isdigit():
                raise ValueError(f"forward_gradient seed must be an integer >= 0, got {options['seed']!r}")
            values["seed"] = int(options["seed"])
        return cls(**values)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.h) and self.h > 0):
            raise ValueError(f"forward_gradient h must be a positive number (e.g. 0.01), got {self.h!r}")
        if not 1 <= self.perturbations <= self.max_perturbations:
            raise ValueError(
                f"forward_gradient needs 1 <= perturbations <= max_perturbations, got "
                f"{self.perturbations} and {self.max_perturbations}"
            )
        if not (math.isfinite(self.var_threshold) and self.var_threshold >= 0):
            raise ValueError(
                f"forward_gradient var_threshold must be >= 0 (0: off), got {self.var_threshold!r}"
            )
        if self.candidates < 1:
            raise ValueError(f"forward_gradient candidates must be at least 1, got {self.candidates}")


#: the numeric settings and their types, as options carry them
_NUMBERS: dict[str, type] = {
    "h": float, "perturbations": int, "max_perturbations": int, "var_threshold": float, "candidates": int,
}  # fmt: skip


class Space(Protocol):
    """Trainable tensors somewhere (the owner's stages, or a host's) that follow seeded directions."""

    def observe(self) -> None: ...
    def perturb(self, seed: int, scale: float) -> None: ...
    def restore(self) -> None: ...
    def apply(self, pairs: Pairs) -> None: ...
    def sq_norm(self, pairs: Pairs) -> float: ...
    def alignment(self, seeds: list[int]) -> list[tuple[float, float]] | None: ...


@dataclass(slots=True)
class Estimate:
    """The directional derivatives of one step."""

    seeds: list[int] = field(default_factory=list)
    slopes: list[float] = field(default_factory=list)  # d_k
    losses: list[float] = field(default_factory=list)  # (L+ + L-) / 2 per direction

    @property
    def variance(self) -> float:
        """The per-coordinate variance of the averaged estimate: mean(d^2) / K."""
        k = len(self.slopes)
        return sum(d * d for d in self.slopes) / k / k


class ForwardGradient:
    """Perturbed inferences through every stage; each stage steps along seeded directions."""

    name = "forward_gradient"
    host_kinds = frozenset(
        {MessageKind.EVAL_FORWARD, MessageKind.PERTURB, MessageKind.APPLY_DIRECTIONAL, MessageKind.ALIGNMENT}
    )

    def __init__(self, settings: ForwardGradientSettings | None = None) -> None:
        self.settings = settings or ForwardGradientSettings()
        seed = self.settings.seed
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") % (2**62)
        self._seeds = torch.Generator().manual_seed(seed)
        # Every step applied so far, in order: what a holder uploads instead of its tensors.
        self.applied: list[Pairs] = []
        self._spaces: weakref.WeakKeyDictionary[Any, list[Space]] = weakref.WeakKeyDictionary()

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> ForwardGradient:
        """The method with :meth:`ForwardGradientSettings.from_options` settings."""
        return cls(ForwardGradientSettings.from_options(options))

    # -- the step -----------------------------------------------------------------------------

    def step(
        self, pipeline: Any, batch: Any, optimizer: Any, *, lr: float | None, clip_norm: float | None = None
    ) -> Any:
        """Estimate the gradient of ``batch``'s loss from perturbed forwards, then step every stage along it."""
        from . import StepOutcome

        if lr is None:
            raise ValueError("forward_gradient steps need a learning rate (the run's lr)")
        spaces = self.spaces(pipeline)
        for space in spaces:
            space.observe()
        estimate = self.estimate(
            spaces, lambda: pipeline.eval_loss(batch.input_ids, batch.attention_mask, batch.labels).loss
        )
        k = len(estimate.seeds)
        coefficients = [(seed, d / k) for seed, d in zip(estimate.seeds, estimate.slopes, strict=True)]
        norm = scale = None
        if clip_norm is not None:
            norm = math.sqrt(sum(space.sq_norm(coefficients) for space in spaces))
            scale = min(1.0, clip_norm / (norm + 1e-6))
        pairs = [(seed, -lr * (scale if scale is not None else 1.0) * c) for seed, c in coefficients]
        for space in spaces:
            space.apply(pairs)
        self.applied.append(pairs)
        pipeline.step += 1
        tokens = int((batch.labels[:, 1:] != -100).sum())
        return StepOutcome(loss=sum(estimate.losses) / k, tokens=tokens, grad_norm=norm)

    def estimate(self, spaces: list[Space], loss: Any) -> Estimate:
        """The directional derivatives of ``loss()`` along as many directions as the settings ask."""
        s = self.settings
        out = Estimate()
        want = s.perturbations
        while True:
            for seed in self.choose(spaces, want - len(out.seeds)):
                plus = self._perturbed(spaces, seed, s.h, loss)
                minus = self._perturbed(spaces, seed, -s.h, loss)
                out.seeds.append(seed)
                out.slopes.append((plus - minus) / (2 * s.h))
                out.losses.append((plus + minus) / 2)
            if (
                s.var_threshold <= 0
                or len(out.seeds) >= s.max_perturbations
                or out.variance <= s.var_threshold
            ):
                return out
            want = min(s.max_perturbations, len(out.seeds) + s.perturbations)

    def choose(self, spaces: list[Space], n: int) -> list[int]:
        """``n`` seeds: as drawn, or with the sampler the best aligned of ``candidates * n`` drawn."""
        if not self.settings.sampler or self.settings.candidates == 1:
            return self._draw(n)
        drawn = self._draw(n * self.settings.candidates)
        dots = [0.0] * len(drawn)
        sqs = [0.0] * len(drawn)
        for space in spaces:
            aligned = space.alignment(drawn)
            if aligned is None:  # no global update known yet: no preference
                return drawn[:n]
            for i, (dot, sq) in enumerate(aligned):
                dots[i] += dot
                sqs[i] += sq
        # |cos(v, u)| up to the common factor 1/||u||; ties keep the order drawn.
        order = sorted(
            range(len(drawn)), key=lambda i: -abs(dots[i]) / math.sqrt(sqs[i]) if sqs[i] > 0 else 0.0
        )
        return [drawn[i] for i in order[:n]]

    def _draw(self, n: int) -> list[int]:
        return [int(x) for x in torch.randint(0, 2**62, (n,), generator=self._seeds)]

    @staticmethod
    def _perturbed(spaces: list[Space], seed: int, scale: float, loss: Any) -> float:
        try:
            for space in spaces:
                space.perturb(seed, scale)
            return float(loss())
        finally:
            for space in spaces:
                space.restore()

    # -- where the tensors are ----------------------------------------------------------------

    def spaces(self, pipeline: Any) -> list[Space]:
        """The owner's stages as one space, plus one per remote stage (kept across steps)."""
        known = self._spaces.get(pipeline)
        if known is None:
            from ..remote import StageClient
            from .remote_space import RemoteSpace

            local = [s for s in pipeline.stages if not isinstance(s, StageClient)]
            known = [ParameterSpace.of_stages(local)]
            known += [RemoteSpace(s, pipeline.runtime) for s in pipeline.stages if isinstance(s, StageClient)]
            self._spaces[pipeline] = known
        return known
