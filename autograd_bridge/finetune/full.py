"""Full fine-tuning: every weight of a stage trains, and every weight travels."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..partition import copy_tensors


class FullFinetune:
    """Every parameter (and persistent buffer) of a stage trains and travels."""

    name = "full"
    adapter = False

    def check(self, settings: Any) -> None:
        """Full fine-tuning takes no settings of its own."""

    def prepare(self, stages: Mapping[int, Any], settings: Any) -> None:
        """Nothing to add: the stages train as they are built."""

    def trained_tensors(self, stage: Any) -> dict[str, Tensor]:
        """Every tensor of the stage under its whole-model name."""
        return {name: t.detach().cpu().contiguous() for name, t in stage.model_state().items()}

    def load_tensors(self, stage: Any, tensors: Mapping[str, Tensor]) -> None:
        """Copy every tensor of the stage from ``tensors`` (ValueError when one is missing or misshapen)."""
        copy_tensors(stage.model_state(), tensors, source=f"the merged weights of partition {stage.spec.index}")

    def begin_round(self, stages: Mapping[int, Any], round: int) -> None:
        """Every round trains the same tensors."""

    def trained_slices(self, stage: Any) -> dict[str, Any]:
        """Every tensor that travels was trained whole."""
        return {}

    def travels(self, name: str) -> bool:
        """Every tensor travels."""
        return True

    def export_config(self, model_config: Any, settings: Any, base_model: str) -> None:
        """A checkpoint is the whole model: no adapter config."""
        return None
