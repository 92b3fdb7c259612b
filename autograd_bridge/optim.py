"""One optimizer registry for the data owners' stages and the stage hosts.

Every stage of a run steps the same kind of optimizer, by name. Weight decay is 0 unless a
caller asks for it: torch's AdamW default (0.01) would make hosted stages train differently
from the whole model, and every such setting is explicit here.

Adding an optimizer is one line in :data:`OPTIMIZERS`; the learning-rate schedules every
stage follows (:func:`lr_at`) are the same kind of registry, :data:`SCHEDULES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

OptimizerFactory = Callable[[list[nn.Parameter], float, float], torch.optim.Optimizer]

#: name -> factory(params, lr, weight_decay)
OPTIMIZERS: dict[str, OptimizerFactory] = {
    "adamw": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, weight_decay=wd),
}


def check_optimizer_name(name: str) -> str:
    """``name`` when it is a known optimizer, else a ValueError listing the known ones."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be {' or '.join(repr(n) for n in sorted(OPTIMIZERS))}, not {name!r}")
    return name


def trainable_parameters(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """The parameters of ``modules`` that require grad, each once (a tied head is one tensor)."""
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    for module in modules:
        for param in module.parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


def build_optimizer(
    name: str, params: list[nn.Parameter], *, lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params`` (ValueError for an unknown name)."""
    return OPTIMIZERS[check_optimizer_name(name)](params, lr, weight_decay)


# ------------------------------------------------------------------------------ schedules


def _constant(progress: float) -> float:
    return 1.0


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


#: name -> the decay after warm-up, from 1 (progress 0) towards 0 (progress 1)
SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": _constant,
    "cosine": _cosine,
}


def check_schedule_name(name: str) -> str:
    """``name`` when it is a known learning-rate schedule, else a ValueError listing the known ones."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(sorted(SCHEDULES))}, not {name!r}")
    return name


def lr_at(schedule: str, step: int, *, lr: float, warmup_steps: int = 0, total_steps: int = 0, min_lr: float = 0.0) -> float:
    """The learning rate of optimizer step ``step`` (0-based, counted over the whole run).

    Linear warm-up from ``lr / warmup_steps`` to ``lr`` over the first ``warmup_steps`` steps,
    then ``min_lr + (lr - min_lr) * decay(progress)``, progress going from 0 after warm-up
    to 1 at ``total_steps`` (and staying there). A run passes the step index of its whole
    history, so a schedule continues across rounds rather than restarting in each.
    """
    decay = SCHEDULES[check_schedule_name(schedule)]
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return min_lr + (lr - min_lr) * decay(progress)
