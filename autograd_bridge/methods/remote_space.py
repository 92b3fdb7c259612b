"""Forward gradients across the bridge: the owner's proxy for a host's tensors, and the host's handlers.

The owner drives a step (:mod:`.forward_gradient`); a host's tensors follow through four
message kinds, so only forward activations (EVAL_FORWARD, nothing kept) and a few scalars
cross the bridge, and no BACKWARD frame is ever sent:

* ``PERTURB`` (options ``seed``, ``scale``; or ``restore``): the host sets its trainable tensors
  to ``base + scale * v(seed)``, or back to ``base`` exactly.
* ``APPLY_DIRECTIONAL`` (tensors ``seeds`` int64 and ``alphas`` float64): the host adds
  ``sum_k alpha_k v(seed_k)``; with option ``mode = "norm"`` it only answers that sum's
  squared norm (for clipping).
* ``ALIGNMENT`` (tensor ``seeds``): per seed, ``(v . u, |v|^2)`` with the host's previous global
  update ``u``, for the discriminative sampler.
* ``DIRECTIONAL_RESULT``: the answer of the last two (tensor ``values``, float64; absent when
  the host knows no global update yet).

Every request is network input: counts, dtypes and finiteness are checked, and a bad frame is
refused (BAD_REQUEST) without touching the tensors.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import torch
from torch import nn

from ..errors import BadRequestError, FrameError
from ..frames import Frame, MessageKind
from .perturbation import SEED_BOUND, ParameterSpace

#: the most directions one APPLY_DIRECTIONAL or ALIGNMENT frame may name
MAX_DIRECTIONS = 65536


class RemoteSpace:
    """A host's tensors of one stage, as the owner's forward-gradient step sees them."""

    def __init__(self, client: Any, runtime: Any) -> None:
        self.client = client  # a StageClient
        self.runtime = runtime

    def _request(self, kind: MessageKind, **kwargs: Any) -> Frame:
        frame: Frame = self.runtime.run(self.client.request(kind, **kwargs))
        return frame

    def observe(self) -> None:
        """The host notices loads itself (on its next ALIGNMENT or PERTURB)."""

    def perturb(self, seed: int, scale: float) -> None:
        self._request(MessageKind.PERTURB, options={"seed": str(seed), "scale": repr(float(scale))})

    def restore(self) -> None:
        self._request(MessageKind.PERTURB, options={"restore": "1"})

    @staticmethod
    def _pairs(pairs: list[tuple[int, float]]) -> dict[str, torch.Tensor]:
        return {"seeds": torch.tensor([s for s, _ in pairs], dtype=torch.int64),
                "alphas": torch.tensor([a for _, a in pairs], dtype=torch.float64)}  # fmt: skip

    def apply(self, pairs: list[tuple[int, float]]) -> None:
        self._request(MessageKind.APPLY_DIRECTIONAL, tensors=self._pairs(pairs))

    def sq_norm(self, pairs: list[tuple[int, float]]) -> float:
        frame = self._request(
            MessageKind.APPLY_DIRECTIONAL, tensors=self._pairs(pairs), options={"mode": "norm"}
        )
        values = self._values(frame, (1,))
        if values is None:
            raise FrameError(f"stage {self.client.stage} host sent no norm for APPLY_DIRECTIONAL mode=norm")
        return float(values[0])

    def alignment(self, seeds: list[int]) -> list[tuple[float, float]] | None:
        frame = self._request(
            MessageKind.ALIGNMENT, tensors={"seeds": torch.tensor(seeds, dtype=torch.int64)}
        )
        values = self._values(frame, (len(seeds), 2))
        return None if values is None else [(float(d), float(s)) for d, s in values.tolist()]

    def _values(self, frame: Frame, shape: tuple[int, ...]) -> torch.Tensor | None:
        values = frame.tensors.get("values")
        if values is None:
            return None
        if tuple(values.shape) != shape or values.dtype != torch.float64 or not torch.isfinite(values).all():
            raise FrameError(
                f"stage {self.client.stage} host sent values of shape {tuple(values.shape)}, wanted {shape}"
            )
        return values


def _seeds(frame: Frame) -> list[int]:
    seeds = frame.tensors.get("seeds")
    if (
        seeds is None
        or seeds.dtype != torch.int64
        or seeds.dim() != 1
        or not 0 < seeds.numel() <= MAX_DIRECTIONS
    ):
        raise BadRequestError(
            f"{frame.kind.name} needs tensor 'seeds': int64, shape (n,), 0 < n <= {MAX_DIRECTIONS}"
        )
    if bool((seeds < 0).any()):
        raise BadRequestError(f"{frame.kind.name} seeds must be >= 0")
    return [int(s) for s in seeds.tolist()]


def _number(frame: Frame, key: str) -> float:
    text = frame.options.get(key)
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise BadRequestError(f"{frame.kind.name} needs option {key!r}, a finite number; got {text!r}")
    return value


class DirectionalHandlers:
    """A stage host's answers to the forward-gradient kinds: one :class:`ParameterSpace` per hosted stage."""

    def __init__(
        self, stage_of: Callable[[Frame], nn.Module], compute: Callable[[Callable[[], Any]], Awaitable[Any]]
    ) -> None:
        self._stage_of = stage_of
        self._compute = compute
        self._spaces: dict[int, ParameterSpace] = {}

    def handlers(self) -> dict[MessageKind, Callable[[Frame, int], Awaitable[Frame]]]:
        return {MessageKind.PERTURB: self.perturb, MessageKind.APPLY_DIRECTIONAL: self.apply,
                MessageKind.ALIGNMENT: self.alignment}  # fmt: skip

    def _space(self, frame: Frame) -> ParameterSpace:
        module = self._stage_of(frame)
        space = self._spaces.get(frame.stage)
        if space is None:  # made at first use: after LoRA adapters were added
            space = self._spaces[frame.stage] = ParameterSpace.of_stages([module])
        return space

    @staticmethod
    def _reply(frame: Frame, kind: MessageKind, values: torch.Tensor | None = None) -> Frame:
        return Frame(kind=kind, request_id=frame.request_id, run_id=frame.run_id, step=frame.step, stage=frame.stage,
                     tensors={} if values is None else {"values": values})  # fmt: skip

    async def perturb(self, frame: Frame, conn_id: int) -> Frame:
        space = self._space(frame)
        if frame.options.get("restore") == "1":
            await self._compute(space.restore)
            return self._reply(frame, MessageKind.ACK)
        text = frame.options.get("seed", "")
        if not text.isdigit() or int(text) >= SEED_BOUND:
            raise BadRequestError(
                f"PERTURB needs option 'seed', an integer in [0, 2**63), or 'restore'; got {text!r}"
            )
        seed, scale = int(text), _number(frame, "scale")

        def run() -> None:
            space.observe()
            space.perturb(seed, scale)

        await self._compute(run)
        return self._reply(frame, MessageKind.ACK)

    async def apply(self, frame: Frame, conn_id: int) -> Frame:
        space = self._space(frame)
        seeds = _seeds(frame)
        alphas = frame.tensors.get("alphas")
        if alphas is None or alphas.dtype != torch.float64 or tuple(alphas.shape) != (len(seeds),):
            raise BadRequestError("APPLY_DIRECTIONAL needs tensor 'alphas': float64, one per seed")
        if not bool(torch.isfinite(alphas).all()):
            raise BadRequestError("APPLY_DIRECTIONAL alphas must be finite")
        pairs = list(zip(seeds, alphas.tolist(), strict=True))
        mode = frame.options.get("mode", "apply")
        if mode == "norm":
            sq = await self._compute(lambda: space.sq_norm(pairs))
            return self._reply(frame, MessageKind.DIRECTIONAL_RESULT, torch.tensor([sq], dtype=torch.float64))
        if mode != "apply":
            raise BadRequestError(f"APPLY_DIRECTIONAL option mode must be 'apply' or 'norm', got {mode!r}")
        await self._compute(lambda: space.apply(pairs))
        return self._reply(frame, MessageKind.ACK)

    async def alignment(self, frame: Frame, conn_id: int) -> Frame:
        space = self._space(frame)
        seeds = _seeds(frame)

        def run() -> list[tuple[float, float]] | None:
            space.observe()
            return space.alignment(seeds)

        aligned = await self._compute(run)
        values = None if aligned is None else torch.tensor(aligned, dtype=torch.float64)
        return self._reply(frame, MessageKind.DIRECTIONAL_RESULT, values)
