"""LoRA adapters on pipeline stages: only the adapters train, travel and get merged.

A stage (or a whole model, which is a stage of one) gets peft's LoRA layers injected in
place, and every other parameter is frozen. Adapter tensors keep the names the whole
model would give them after the same injection (``model.layers.3.self_attn.q_proj.
lora_A.default.weight``), so copies of a partition held by different owners, and the
whole model, can be compared and averaged name by name.

The random part of LoRA's initialisation (``lora_A``) depends on the order modules are
injected in, so a split model and a whole one do not start equal by seeding the global
generator: :func:`seed_adapters` draws each ``lora_A`` from its own generator, seeded by the
run's seed and the tensor's whole-model name, so every cut of the model (and the whole model)
starts from the same adapters. Or build the starting adapters once and hand them to every copy
with :func:`load_lora_state`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from .partition import copy_tensors

#: model_type -> the attention projections LoRA adapts (the peft defaults, roughly).
_FAMILY_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn",),
    "gpt_neox": ("query_key_value",),
    "falcon": ("query_key_value",),
    "bloom": ("query_key_value",),
    "phi3": ("qkv_proj",),
    "mpt": ("Wqkv",),
}

#: Leaf module names that are attention projections in some family (the fallback's guess).
_ATTENTION_PROJECTIONS: tuple[str, ...] = (
    "q_proj", "v_proj", "query_key_value", "c_attn", "qkv_proj", "Wqkv", "query", "value",
)

#: The default for families not in the table whose blocks have q_proj and v_proj.
_LLAMA_LIKE: tuple[str, ...] = ("q_proj", "v_proj")

def seed_adapters(stage: nn.Module, seed: int) -> None:
    """Initialise the LoRA adapters of ``stage`` from ``seed`` and their whole-model names alone.

    Each ``lora_A`` is drawn as peft draws it (Kaiming-uniform, a = sqrt(5): uniform in
    +-1/sqrt(fan_in)) but from a generator seeded by ``seed`` and the tensor's name; each
    ``lora_B`` is zero. So the adapters do not depend on where the model was cut, on the order
    modules were injected in, or on the global random state.
    """
    model_names = getattr(stage, "named_model_parameters", None)
    named = model_names() if callable(model_names) else stage.named_parameters()
    with torch.no_grad():
        for name, param in named:
            if ".lora_A." in name:
                digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
                generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
                drawn = torch.empty(param.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(drawn, a=math.sqrt(5), generator=generator)
                param.copy_(drawn)
            elif ".lora_B." in name:
                param.zero_()


_ADAPTER_MARKERS = ("lora_A.", "lora_B.", "lora_embedding_A.", "lora_embedding_B.", "lora_magnitude_vector")


def _projection_names(module: nn.Module) -> list[str]:
    """Leaf names of Linear/Conv1D modules that look like attention projections."""
    found: list[str] = []
    for path, child in module.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if isinstance(child, (nn.Linear, Conv1D)) and leaf in _ATTENTION_PROJECTIONS and leaf not in found:
            found.append(leaf)
    return found


def lora_target_modules(config: PretrainedConfig, module: nn.Module | None = None) -> list[str]:
    """The module names LoRA adapts for ``config``'s family.

    Families in the table get their fused or separate attention projections; others get
    ``q_proj``/``v_proj`` when ``module`` (a stage or the model) has them, else whatever
    attention projections ``module`` holds.
    """
    model_type = str(getattr(config, "model_type", ""))
    if model_type in _FAMILY_TARGETS:
        return list(_FAMILY_TARGETS[model_type])
    if module is None:
        return list(_LLAMA_LIKE)
    found = _projection_names(module)
    if all(name in found for name in _LLAMA_LIKE):
        return list(_LLAMA_LIKE)
    if not found:
        raise ValueError(
            f"found no attention projection to adapt in this {model_type or 'unknown'} model; "
            "pass targets=[...] with the names of its attention Linear modules"
        )
    return found


def is_adapter_name(name: str) -> bool:
    """Whether a parameter name belongs to a LoRA adapter."""
    return any(marker in name for marker in _ADAPTER_MARKERS)


def add_lora(
    stage: nn.Module,
    *,
    r: int,
    alpha: int,
    dropout: float = 0.0,
    targets: Sequence[str] | None = None,
) -> nn.Module:
    """Inject LoRA layers into ``stage`` in place and freeze everything but the adapters.

    ``stage`` is a :class:`~autograd_bridge.partition.StageModule` (or a whole model).
    Build a :class:`~autograd_bridge.host.StageHost` or an optimizer only afterwards: both
    take the parameters that require grad when they are made. Returns ``stage``.
    """
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    config = getattr(stage, "config", None)
    if targets is None:
        if config is None:
            raise ValueError("this module has no .config; pass targets=[...] to add_lora")
        targets = lora_target_modules(config, stage)
    present = {path.rsplit(".", 1)[-1] for path, _ in stage.named_modules()}
    if not present.intersection(targets):
        # A first stage holding only the embeddings, for instance: nothing of it to adapt.
        raise ValueError(
            f"this stage has none of the LoRA targets {list(targets)}; give every stage at least "
            "one decoder block, or pass other targets"
        )
    # GPT-2's Conv1D stores its weight transposed; peft must be told (it warns and guesses otherwise).
    conv1d = any(
        isinstance(module, Conv1D) and path.rsplit(".", 1)[-1] in targets for path, module in stage.named_modules()
    )
    lora_config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), fan_in_fan_out=conv1d
    )
    inject_adapter_in_model(lora_config, stage)
    for name, param in stage.named_parameters():
        param.requires_grad_(is_adapter_name(name))
    return stage


def _named(stage: nn.Module) -> list[tuple[str, nn.Parameter]]:
    named = getattr(stage, "named_model_parameters", None)
    return list(named() if callable(named) else stage.named_parameters())


def lora_state(stage: nn.Module) -> dict[str, Tensor]:
    """The adapter weights of ``stage`` (detached copies), under whole-model names."""
    state = {name: param.detach().clone() for name, param in _named(stage) if is_adapter_name(name)}
    if not state:
        raise ValueError("this stage has no LoRA adapters; call add_lora first")
    return state


def load_lora_state(stage: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy ``state`` (as :func:`lora_state` returns) into ``stage``'s adapters, in place.

    ``state`` may hold other stages' adapters too (the whole model's); this stage takes
    its own and every one of them must be there.
    """
    own = {name: param for name, param in _named(stage) if is_adapter_name(name)}
    if not own:
        raise ValueError("this stage has no LoRA adapters; call add_lora first")
    copy_tensors(own, state, source="the LoRA state")
