"""An optimizer's per-parameter state as named tensors, so it can travel and be checkpointed.

``torch.optim.Optimizer.state_dict()`` keys its state by the position of each parameter in
the optimizer and is meant for ``torch.save``; neither survives a trip to another process
whose optimizer holds other parameters in another order, and nothing received from the
network may be unpickled. Here every tensor of a parameter's state (AdamW's ``step``,
``exp_avg`` and ``exp_avg_sq``, SGD's ``momentum_buffer``) gets a name built from the
parameter's whole-model name::

    optimizer/exp_avg/model.layers.3.mlp.up_proj.weight

so that the state of one partition can be written with safetensors next to its weights,
merged or handed to the next owner by the server, and loaded into whichever optimizer holds
that parameter there. Loading replaces the state of exactly the named parameters: a
pipeline that receives an owner's state continues the way a single process would (AdamW's
bias correction included, since ``step`` travels too).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

OPTIMIZER_PREFIX = "optimizer/"


def is_optimizer_name(name: str) -> bool:
    """Whether ``name`` names optimizer state (not a weight)."""
    return name.startswith(OPTIMIZER_PREFIX)


def split_optimizer_tensors(tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(weights, optimizer state)`` of a file holding both."""
    weights = {n: t for n, t in tensors.items() if not is_optimizer_name(n)}
    state = {n: t for n, t in tensors.items() if is_optimizer_name(n)}
    return weights, state


def optimizer_parameter_name(name: str) -> str:
    """The parameter an optimizer-state tensor belongs to (ValueError for a malformed name)."""
    _, parameter = _parse(name)
    return parameter


def optimizer_tensors(optimizer: torch.optim.Optimizer | None, named_parameters: Iterable[tuple[str, nn.Parameter]]) -> dict[str, Tensor]:
    """The state ``optimizer`` keeps for the named parameters (copies on the CPU).

    Parameters the optimizer does not hold, or holds no state for yet (no step taken), give
    no entries. A state entry that is not a tensor raises ValueError: it could not travel.
    """
    if optimizer is None:
        return {}
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    out: dict[str, Tensor] = {}
    for name, param in named_parameters:
        if id(param) not in held:
            continue
        for key, value in optimizer.state.get(param, {}).items():
            if not isinstance(value, Tensor):
                raise ValueError(f"{type(optimizer).__name__} keeps {key!r} of {name} as {type(value).__name__}, not a tensor")
            out[f"{OPTIMIZER_PREFIX}{key}/{name}"] = value.detach().to("cpu", copy=True).contiguous()
    return out


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer | None,
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    tensors: Mapping[str, Tensor],
) -> int:
    """Give each named parameter of ``optimizer`` the state in ``tensors``; return how many got one.

    A parameter with no entries in ``tensors`` gets an empty state (it had taken no step
    where the state comes from). Entries for a parameter that is not among
    ``named_parameters`` or not held by ``optimizer``, and entries whose shape fits neither
    the parameter nor a scalar, raise ValueError before anything changes.
    """
    by_parameter: dict[str, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        key, parameter = _parse(name)
        by_parameter.setdefault(parameter, {})[key] = value
    if optimizer is None:
        if by_parameter:
            raise ValueError(f"optimizer state arrived for {len(by_parameter)} parameter(s) here that train nothing")
        return 0
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    params = {name: p for name, p in named_parameters if id(p) in held}
    unknown = sorted(set(by_parameter) - set(params))
    if unknown:
        raise ValueError(f"optimizer state for {unknown[0]!r}, which this optimizer does not train ({len(unknown)} such)")
    for parameter, entries in by_parameter.items():
        shape = params[parameter].shape
        for key, value in entries.items():
            if value.dim() and value.shape != shape:
                raise ValueError(f"optimizer state {key!r} of {parameter} is {tuple(value.shape)}, the parameter {tuple(shape)}")
    for parameter, param in params.items():
        entries = by_parameter.get(parameter, {})
        optimizer.state[param] = {
            key: value.to(param.device, dtype=value.dtype if value.dim() == 0 else param.dtype, copy=True)
            for key, value in entries.items()
        }
        if not entries:
            optimizer.state.pop(param, None)
    return sum(1 for p in params if p in by_parameter)


def _parse(name: str) -> tuple[str, str]:
    if not is_optimizer_name(name):
        raise ValueError(f"{name!r} is not an optimizer-state name (they start with {OPTIMIZER_PREFIX!r})")
    key, sep, parameter = name[len(OPTIMIZER_PREFIX):].partition("/")
    if not sep or not key or not parameter:
        raise ValueError(f"optimizer-state name {name!r} is not '{OPTIMIZER_PREFIX}<entry>/<parameter>'")
    return key, parameter
