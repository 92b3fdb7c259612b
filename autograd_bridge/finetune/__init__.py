"""What a stage trains, what travels after a round, and how a run's result is kept: the Finetune seam.

A run names its fine-tuning mode once (``[finetune] mode``); the owners, the stage hosts
and the server each hold the one :class:`Finetune` object :func:`get_finetune` gives for that
name and never branch on the name again.

Members: ``full`` (every weight trains and travels) and ``lora`` (adapters are injected and
only they train and travel). A new member is a module in this package with a class that
satisfies :class:`Finetune`, plus one line in :data:`FINETUNES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from .full import FullFinetune
from .lora import LoraFinetune


@dataclass(frozen=True, slots=True, kw_only=True)
class FinetuneSettings:
    """How a mode sets stages up (each member reads what it needs)."""

    lora_r: int = 8  # adapter rank
    lora_alpha: int = 16  # adapter scale numerator (scale = alpha / r)
    lora_targets: tuple[str, ...] = ()  # module names to adapt; empty: the family's default
    seed: int = 0  # partition k's random initialisation starts from seed * 1000 + k on every copy


class Finetune(Protocol):
    """One fine-tuning mode."""

    name: str
    # Checkpoints are adapter folders over the base model (PEFT) rather than whole models.
    adapter: bool

    def check(self, settings: FinetuneSettings) -> None:
        """Raise ValueError for settings this mode cannot train with."""

    def prepare(self, stages: Mapping[int, Any], settings: FinetuneSettings) -> None:
        """Set up ``stages`` (partition index -> StageModule) before any optimizer sees them."""

    def trained_tensors(self, stage: Any) -> dict[str, Tensor]:
        """What travels for ``stage`` after a round, under whole-model names (detached, on the CPU)."""

    def load_tensors(self, stage: Any, tensors: Mapping[str, Tensor]) -> None:
        """Copy merged tensors into ``stage`` in place (optimizers keep their references)."""

    def travels(self, name: str) -> bool:
        """Whether a whole-model tensor name is one this mode trains (and so merges)."""

    def export_config(self, model_config: Any, settings: FinetuneSettings, base_model: str) -> Any | None:
        """The config of an adapter checkpoint (a PEFT config), or None when checkpoints are whole models."""


#: name -> the mode's class
FINETUNES: dict[str, type[Finetune]] = {
    "full": FullFinetune,
    "lora": LoraFinetune,
}


def get_finetune(name: str) -> Finetune:
    """The mode called ``name`` (ValueError naming the known ones)."""
    if name not in FINETUNES:
        raise ValueError(f"finetune mode must be one of {', '.join(sorted(FINETUNES))}, not {name!r}")
    return FINETUNES[name]()


__all__ = ["FINETUNES", "Finetune", "FinetuneSettings", "get_finetune"]
