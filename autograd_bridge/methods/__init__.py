"""How a data owner trains one step over its pipeline: the TrainingMethod seam.

The owner's loop (``client.training``) hands each batch to the run's method and records
what it returns; it never asks which method it holds. A method also names the stage-host
message kinds it needs, so a host can refuse a pipeline whose method it cannot serve.

Members: ``backprop`` (forward, backward through every stage, every stage's optimizer
steps) and ``forward_gradient`` (FwdLLM: perturbed forwards only, every stage steps along
seeded directions; see :mod:`.forward_gradient`). A new member is a module here with a class
that satisfies :class:`TrainingMethod`, plus one line in :data:`METHODS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..frames import MessageKind
from .backprop import Backprop
from .forward_gradient import ForwardGradient, ForwardGradientSettings


@dataclass(frozen=True, slots=True, kw_only=True)
class StepOutcome:
    """What one optimizer step did."""

    loss: float  # mean token loss of the batch, before the update
    tokens: int  # target tokens the loss averaged over
    grad_norm: float | None = None  # the gradients' joint L2 norm before clipping (None: not clipped)
    output_norm: float = 0.0  # mean L2 norm of the logits per position


class TrainingMethod(Protocol):
    """One way to train a step."""

    name: str
    host_kinds: frozenset[MessageKind]  # what the stage hosts must serve for it

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> TrainingMethod:
        """The method with its settings read from ``options`` (network input: ValueError when bad)."""

    def step(
        self, pipeline: Any, batch: Any, optimizer: Any, *, lr: float | None, clip_norm: float | None = None
    ) -> StepOutcome:
        """Train one batch (``input_ids``, ``attention_mask``, ``labels``) and update every stage.

        ``lr`` is this step's learning rate (a schedule's value); ``clip_norm`` bounds the
        joint norm of every stage's update direction, where the method has one.
        """


#: name -> the method's class
METHODS: dict[str, type[TrainingMethod]] = {
    "backprop": Backprop,
    "forward_gradient": ForwardGradient,
}


def get_method(name: str, options: Mapping[str, str] | None = None) -> TrainingMethod:
    """The method called ``name`` set up with ``options`` (its settings as text, from the network;
    each method reads the ones it knows). ValueError naming the known methods, or a bad option."""
    if name not in METHODS:
        raise ValueError(f"training method must be one of {', '.join(sorted(METHODS))}, not {name!r}")
    return METHODS[name].from_options(options or {})


__all__ = ["METHODS", "ForwardGradientSettings", "StepOutcome", "TrainingMethod", "get_method"]
