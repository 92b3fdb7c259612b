"""One optimizer registry for the data owners' stages and the stage hosts.

Every stage of a run steps the same kind of optimizer, by name. Weight decay is 0 unless a
caller asks for it: torch's AdamW default (0.01) would make hosted stages train differently
from the whole model, and every such setting is explicit here.

Adding an optimizer is one line in :data:`OPTIMIZERS`.
"""

from __future__ import annotations

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
