"""Backpropagation through the pipeline: today's training step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..frames import MessageKind


class Backprop:
    """Forward and backward through every stage, then every stage's optimizer steps."""

    name = "backprop"
    host_kinds = frozenset(
        {MessageKind.FORWARD, MessageKind.BACKWARD, MessageKind.OPTIMIZER_STEP, MessageKind.RELEASE}
    )

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Backprop:
        """Backprop has no settings of its own: ``options`` (another method's) are ignored."""
        return cls()

    def step(self, pipeline: Any, batch: Any, optimizer: Any, *, lr: float | None, clip_norm: float | None = None) -> Any:
        """One forward/backward of ``batch`` through ``pipeline``, then the optimizers' step (clipped jointly)."""
        from . import StepOutcome

        result = pipeline.train_step(batch.input_ids, batch.attention_mask, batch.labels)
        norm = pipeline.optimizer_step(optimizer, lr, clip_norm)
        return StepOutcome(loss=result.loss, tokens=result.tokens, grad_norm=norm, output_norm=result.output_norm)
