"""LoRA fine-tuning: adapters are injected into each stage, and only they train and travel."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..lora import add_lora, is_adapter_name, load_lora_state, lora_state, lora_target_modules, seed_adapters


class LoraFinetune:
    """peft's LoRA layers on every decoder block; the rest of the model is frozen."""

    name = "lora"
    adapter = True

    def check(self, settings: Any) -> None:
        """The rank and scale must be positive."""
        if settings.lora_r < 1 or settings.lora_alpha < 1:
            raise ValueError(f"LoRA needs lora_r >= 1 and lora_alpha >= 1, got {settings.lora_r} and {settings.lora_alpha}")

    def prepare(self, stages: Mapping[int, Any], settings: Any) -> None:
        """Add adapters to every stage, drawn from the seed and each tensor's whole-model name.

        Every copy of a partition starts equal, and so does any other cut of the model (a round
        replayed on a new plan after a lost helper, the whole model of a reference run). A stage
        without decoder blocks (only the embeddings, say) has nothing LoRA adapts: it is frozen
        and trains nothing.
        """
        self.check(settings)
        for index in sorted(stages):
            spec = stages[index].spec
            if spec.layer_end <= spec.layer_start:
                stages[index].requires_grad_(False)
                continue
            with torch.random.fork_rng(devices=[]):  # peft's own draw must not move the caller's generator
                try:
                    add_lora(stages[index], r=settings.lora_r, alpha=settings.lora_alpha,
                             targets=list(settings.lora_targets) or None)  # fmt: skip
                except ValueError as exc:
                    raise ValueError(f"partition {index}: {exc}") from exc
            seed_adapters(stages[index], settings.seed)

    def trained_tensors(self, stage: Any) -> dict[str, Tensor]:
        """The adapters of the stage (none for a frozen stage without blocks)."""
        has_adapters = any(is_adapter_name(name) for name, _ in stage.named_parameters())
        return lora_state(stage) if has_adapters else {}

    def load_tensors(self, stage: Any, tensors: Mapping[str, Tensor]) -> None:
        """Copy the merged adapters into the stage."""
        if not tensors and not any(is_adapter_name(name) for name, _ in stage.named_parameters()):
            return  # a frozen stage without blocks: nothing trains, nothing to load
        try:
            load_lora_state(stage, tensors)
        except ValueError as exc:
            raise ValueError(f"partition {stage.spec.index}: {exc}") from exc

    def begin_round(self, stages: Mapping[int, Any], round: int) -> None:
        """Every round trains the same tensors."""

    def trained_slices(self, stage: Any) -> dict[str, Any]:
        """Every tensor that travels was trained whole."""
        return {}

    def travels(self, name: str) -> bool:
        """Only adapter tensors travel."""
        return is_adapter_name(name)

    def export_config(self, model_config: Any, settings: Any, base_model: str) -> Any:
        """The PEFT LoraConfig that ``PeftModel.from_pretrained`` needs to load the adapters over ``base_model``."""
        from peft import LoraConfig

        targets = list(settings.lora_targets) or lora_target_modules(model_config)
        return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, target_modules=targets,
                          base_model_name_or_path=base_model, task_type="CAUSAL_LM")  # fmt: skip
