"""What a stage trains, what travels after a round, and how a run's result is kept: the Finetune seam.

A run names its fine-tuning mode once (``[finetune] mode``); the owners, the stage hosts
and the server each hold the one :class:`Finetune` object :func:`get_finetune` gives for that
name and never branch on the name again.

Members: ``full`` (every weight trains and travels), ``lora`` (adapters are injected and
only they train and travel) and ``heads`` (SMHA: a share of every block's attention heads
trains; every tensor travels with the slices it trained named, see :mod:`.heads`). A new member is a module in this package with a class that
satisfies :class:`Finetune`, plus one line in :data:`FINETUNES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from proto.messages import TrainedSlices

from .full import FullFinetune
from .heads import HeadsFinetune
from .lora import LoraFinetune


@dataclass(frozen=True, slots=True, kw_only=True)
class FinetuneSettings:
    """How a mode sets stages up (each member reads what it needs)."""

    lora_r: int = 8  # adapter rank
    lora_alpha: int = 16  # adapter scale numerator (scale = alpha / r)
    lora_targets: tuple[str, ...] = ()  # module names to adapt; empty: the family's default
    seed: int = 0  # random initialisation (LoRA adapters: from the seed and each tensor's name, whatever the cut)
    head_fraction: float = 1.0  # heads: share of each block's attention heads trained per round, in (0, 1]
    head_choice: str = "random"  # heads: "random" (seeded per round) or "importance" (gradient magnitude so far)
    head_adapter: str = "full"  # heads: train the heads' weight slices ("full") or per-head LoRA on them ("lora")
    head_schedule: str = "fixed"  # heads: "fixed" ceil(f H) heads, or "redundancy": fewer as a block's heads grow alike
    head_key: str = ""  # heads: whose heads these are (the pipeline's owner): random draws differ per key


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

    def begin_round(self, stages: Mapping[int, Any], round: int) -> None:
        """The holder of ``stages`` trains round ``round`` next (1-based; ``prepare`` begins round 1)."""

    def trained_slices(self, stage: Any) -> dict[str, TrainedSlices]:
        """Which parts of the tensors ``trained_tensors`` gives were trained; a tensor not named trained whole."""

    def travels(self, name: str) -> bool:
        """Whether a whole-model tensor name is one this mode trains (and so merges)."""

    def export_config(self, model_config: Any, settings: FinetuneSettings, base_model: str) -> Any | None:
        """The config of an adapter checkpoint (a PEFT config), or None when checkpoints are whole models."""


#: name -> the mode's class
FINETUNES: dict[str, type[Finetune]] = {
    "full": FullFinetune,
    "lora": LoraFinetune,
    "heads": HeadsFinetune,
}


def get_finetune(name: str) -> Finetune:
    """The mode called ``name`` (ValueError naming the known ones)."""
    if name not in FINETUNES:
        raise ValueError(f"finetune mode must be one of {', '.join(sorted(FINETUNES))}, not {name!r}")
    return FINETUNES[name]()


__all__ = ["FINETUNES", "Finetune", "FinetuneSettings", "get_finetune"]
