"""SMHA: every decoder block trains a fraction of its attention heads; the rest of the model is frozen.

Each round, every block of a stage trains ``ceil(head_fraction * H)`` of its H heads: their
slices of the query, key, value and output projections (:mod:`.head_layout` says where they
lie per family, and how grouped-query attention shares key/value heads). Which heads:

- ``random``: drawn from (run seed, round, the pipeline's owner, block), so the owner and every
  host of its pipeline draw the same heads for their own blocks without talking to each other;
- ``importance``: the heads whose slices gathered the largest gradient magnitude so far (summed
  over every step of every round on this holder; the first round, with nothing gathered, draws
  at random).

``adapter`` says how a head trains:

- ``full``: its slices of the weights themselves (and of the q/k/v biases). The projections
  compute their weight gradients for the chosen slices only (:class:`_SliceGradient`: with a
  quarter of the heads, a quarter of the attention's weight-gradient matmuls; ``importance``
  needs every slice's gradient and computes them all), gradient hooks zero whatever else
  arrives, and after every optimizer step the untrained slices are put back exactly as they
  were, so neither AdamW's weight decay nor its momentum from earlier rounds moves them by a
  single bit.
- ``lora``: per-head low-rank adapters (rank r, scale alpha / r) on the four projections,
  ``delta W`` of head slice j = ``B_j @ A_j``, with the base weights frozen; only the chosen
  heads' ``A_j``, ``B_j`` train. What travels is the merged weight ``W + delta W``; loading the
  merged weights resets the adapters (B = 0), so averaging stays exact.

What travels is the whole model's tensors (checkpoints are whole models), with
:meth:`HeadsFinetune.trained_slices` saying which head slices of each tensor this holder
trained (none for frozen tensors); the server averages each slice over the copies that trained
it and keeps the others (``server.training.aggregation``).

A holder moves to the next round's heads after it uploads a round (:meth:`begin_round`);
:meth:`prepare` draws round 1's.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers.pytorch_utils import Conv1D

from proto.messages import TrainedSlices

from ..partition import copy_tensors
from .head_layout import (
    BlockHeads,
    block_heads,
    head_redundancy,
    head_scores,
    random_heads,
    redundancy_fraction,
    top_heads,
)

__all__ = ["HEAD_ADAPTERS", "HEAD_CHOICES", "HEAD_SCHEDULES", "HeadLora", "HeadsFinetune"]

#: How heads are chosen each round.
HEAD_CHOICES: tuple[str, ...] = ("random", "importance")
#: How a chosen head trains: its weight slices, or per-head LoRA adapters on them.
HEAD_ADAPTERS: tuple[str, ...] = ("full", "lora")
#: How many heads a block trains: always ``ceil(f * H)``, or fewer as its heads grow redundant.
HEAD_SCHEDULES: tuple[str, ...] = ("fixed", "redundancy")

_ADAPTER = "head_lora"  # child name of the adapters on a projection module


class HeadLora(nn.Module):
    """Per-head LoRA on one projection: slice j of the weight moves by ``scale * B[j] @ A[j]``.

    ``axis="out"`` (queries, keys, values): the slices are groups of ``width`` output features,
    ``A`` is (blocks, r, in), ``B`` (blocks, width, r). ``axis="in"`` (the output projection):
    the slices are groups of input features, ``A`` is (blocks, r, width), ``B`` (blocks, out, r).
    """

    def __init__(self, *, axis: str, blocks: int, width: int, other: int, r: int, alpha: int) -> None:
        super().__init__()
        self.axis, self.blocks, self.width, self.scale = axis, blocks, width, alpha / r
        a_in = other if axis == "out" else width
        b_out = width if axis == "out" else other
        self.A = nn.Parameter(torch.zeros(blocks, r, a_in))
        self.B = nn.Parameter(torch.zeros(blocks, b_out, r))

    def reset(self, generator: torch.Generator) -> None:
        """A from ``generator`` (uniform, as nn.Linear's init), B = 0: the adapter adds nothing."""
        bound = 1.0 / math.sqrt(self.A.shape[-1])
        with torch.no_grad():
            self.A.copy_(torch.rand(self.A.shape, generator=generator) * 2 * bound - bound)
            self.B.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """What the adapters add to the projection's output for input ``x`` (..., in)."""
        if self.axis == "out":
            u = torch.einsum("...i,jri->...jr", x, self.A)  # (..., blocks, r)
            return (
                torch.einsum("...jr,jdr->...jd", u, self.B).flatten(-2) * self.scale
            )  # (..., blocks * width)
        xh = x.unflatten(-1, (self.blocks, self.width))  # (..., H, d)
        u = torch.einsum("...hd,hrd->...hr", xh, self.A)
        return torch.einsum("...hr,hor->...o", u, self.B) * self.scale  # (..., out)

    def weight_delta(self) -> Tensor:
        """The change of the projection's weight, as an nn.Linear holds it: (out, in)."""
        per_block = torch.einsum("jor,jri->joi", self.B, self.A) * self.scale
        if self.axis == "out":
            return per_block.flatten(0, 1)  # (blocks * width, in)
        return per_block.permute(1, 0, 2).flatten(1)  # (out, H * d)


@dataclass(slots=True, kw_only=True, weakref_slot=True)
class _Trainable:
    """One parameter of which only some slices train this round."""

    param: nn.Parameter
    dim: int  # the axis of its slices
    width: int  # elements per slice along ``dim``
    base: str  # the whole-model weight whose head slices these are (importance is gathered under it)
    mask: Tensor  # (slices,) bool: which slices train this round
    # Set with the mask: the trained and untrained element indices along ``dim``, the mask
    # shaped to broadcast against the parameter, and the values the untrained slices keep.
    trained: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    untrained: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    broadcast: Tensor = field(default_factory=lambda: torch.empty(0))
    anchor: Tensor = field(default_factory=lambda: torch.empty(0))

    def set_mask(self, mask: Tensor) -> None:
        """Train the slices ``mask`` (bool, one per slice) marks from now on; the others keep their values."""
        self.mask = mask
        elements = mask.repeat_interleave(self.width)
        self.trained = elements.nonzero().squeeze(1)
        self.untrained = (~elements).nonzero().squeeze(1)
        shape = [1] * self.param.dim()
        shape[self.dim] = -1
        self.broadcast = elements.view(shape)
        self.anchor_now()

    def anchor_now(self) -> None:
        """The untrained slices keep the values they have now."""
        self.anchor = self.param.detach().index_select(self.dim, self.untrained).clone()

    def restore(self) -> None:
        """Put the untrained slices back to their anchored values, exactly."""
        if self.untrained.numel():
            with torch.no_grad():
                self.param.index_copy_(self.dim, self.untrained, self.anchor)


class _SliceGradient(torch.autograd.Function):
    """Identity on a projection's output ``y``; backward adds the weight (and bias) gradient of the chosen slices only.

    The projection ran on detached weights, so autograd computes no weight gradient itself;
    this computes ``dW`` for the ``index`` rows (``rows=True``: output features, the query, key
    and value slices) or columns (input features, the output projection's slices) of a weight
    held as nn.Linear holds it (``conv=False``, (out, in)) or as Conv1D does (``conv=True``, (in, out)).
    """

    @staticmethod
    def forward(ctx: Any, y: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor, rows: bool,
                conv: bool) -> Tensor:  # fmt: skip
        ctx.save_for_backward(x, index)
        ctx.rows, ctx.conv, ctx.has_bias = rows, conv, bias is not None
        ctx.weight_shape = weight.shape
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, index = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        weight = grad.new_zeros(ctx.weight_shape)
        bias = None
        if ctx.rows:
            chosen = g.index_select(1, index)  # (N, k)
            part = chosen.T @ x2  # (k, in)
            weight.index_copy_(1, index, part.T) if ctx.conv else weight.index_copy_(0, index, part)
            if ctx.has_bias:
                bias = grad.new_zeros(ctx.weight_shape[1] if ctx.conv else ctx.weight_shape[0])
                bias.index_copy_(0, index, chosen.sum(0))
        else:
            part = g.T @ x2.index_select(1, index)  # (out, k)
            weight.index_copy_(0, index, part.T) if ctx.conv else weight.index_copy_(1, index, part)
        return grad, None, weight, bias, None, None, None


@dataclass(slots=True, kw_only=True)
class _SlicedProjection:
    """A projection whose forward runs on its detached weights and whose weight gradient covers the chosen slices."""

    module: nn.Module
    weight: _Trainable
    bias: _Trainable | None  # the q/k/v biases are heads' slices; the output projection's is not (frozen)
    rows: bool  # slices are output features (q, k, v) rather than input features (o)
    conv: bool  # GPT-2's Conv1D holds its weight (in, out)
    every_slice: bool  # importance: compute every slice's gradient (its magnitude ranks the heads)

    def forward(self, x: Tensor) -> Tensor:
        weight, bias_param = self.module.get_parameter("weight"), getattr(self.module, "bias", None)
        w = weight.detach()
        b = bias_param.detach() if bias_param is not None else None
        if self.conv:
            y = (
                (x @ w)
                if b is None
                else torch.addmm(b, x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[1])
            )
        else:
            y = F.linear(x, w, b)
        every = self.every_slice or not self.weight.untrained.numel()
        index = torch.arange(self.weight.param.shape[self.weight.dim]) if every else self.weight.trained
        bias = self.bias.param if self.bias is not None else None
        return _SliceGradient.apply(y, x.detach(), self.weight.param, bias, index, self.rows, self.conv)


# Every parameter some heads-mode stage in this process trains in slices; an optimizer step
# over any of them puts its untrained slices back (weight decay and momentum move them otherwise).
# Keyed by id(param) and holding the trainables weakly: they live as long as the run's
# HeadsFinetune, which keeps their parameters alive (so an id cannot be reused meanwhile).
_TRAINABLES: weakref.WeakValueDictionary[int, _Trainable] = weakref.WeakValueDictionary()
_HOOK: list[Any] = []


def _restore_after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            trainable = _TRAINABLES.get(id(param))
            if trainable is not None and trainable.param is param:
                trainable.restore()


def _install_step_hook() -> None:
    if not _HOOK:
        _HOOK.append(register_optimizer_step_post_hook(_restore_after_step))


@dataclass(slots=True, kw_only=True)
class _StageHeads:
    """What heads mode keeps for one stage."""

    blocks: list[BlockHeads]
    trainables: list[_Trainable]
    adapters: dict[str, HeadLora]  # base weight name -> its adapters (lora)
    sliced: dict[str, tuple[int, int]]  # travelling tensor name -> (dim, width) of its head slices
    chosen: dict[str, set[int]] = field(default_factory=dict)  # travelling tensor name -> slices trained now
    heads: dict[int, tuple[int, ...]] = field(default_factory=dict)  # block -> its query heads trained now


def _projection_modules(stage: nn.Module, blocks: list[BlockHeads]) -> dict[str, tuple[nn.Module, int, int]]:
    """Base weight name -> (its module, slice axis in Linear orientation (0 rows, 1 columns), width)."""
    out: dict[str, tuple[nn.Module, int, int]] = {}
    for block in blocks:
        for tensor in block.tensors:
            if not tensor.name.endswith(".weight"):
                continue
            module = stage.get_submodule(tensor.name.rsplit(".", 1)[0])
            # A Conv1D holds its weight transposed (in, out): its axis 1 is a Linear's axis 0.
            axis = 1 - tensor.dim if isinstance(module, Conv1D) else tensor.dim
            out[tensor.name] = (module, axis, tensor.width)
    return out


class HeadsFinetune:
    """Train a share of every block's attention heads (SMHA); checkpoints stay whole models."""

    name = "heads"
    adapter = False

    def __init__(self) -> None:
        self._settings: Any = None
        self._round = 0
        self._stages: dict[int, _StageHeads] = {}
        # Base weight name -> per-slice sum of gradient magnitudes over every step here (importance).
        self.magnitudes: dict[str, Tensor] = {}

    # -- settings --------------------------------------------------------------------------

    def check(self, settings: Any) -> None:
        """The fraction must be in (0, 1], the choice and adapter known, a LoRA rank and scale positive."""
        fraction = settings.head_fraction
        if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0.0 < fraction <= 1.0):
            raise ValueError(f"heads mode needs head_fraction in (0, 1], got {fraction!r}")
        if settings.head_choice not in HEAD_CHOICES:
            raise ValueError(
                f"head_choice must be one of {', '.join(HEAD_CHOICES)}, not {settings.head_choice!r}"
            )
        if settings.head_adapter not in HEAD_ADAPTERS:
            raise ValueError(
                f"the heads adapter must be one of {', '.join(HEAD_ADAPTERS)}, not {settings.head_adapter!r}"
            )
        if settings.head_schedule not in HEAD_SCHEDULES:
            raise ValueError(
                f"head_fraction_schedule must be one of {', '.join(HEAD_SCHEDULES)}, not {settings.head_schedule!r}"
            )
        if settings.head_adapter == "lora" and (settings.lora_r < 1 or settings.lora_alpha < 1):
            raise ValueError(
                f"per-head LoRA needs r >= 1 and alpha >= 1, got {settings.lora_r} and {settings.lora_alpha}"
            )

    # -- setting stages up -----------------------------------------------------------------

    def prepare(self, stages: Mapping[int, Any], settings: Any) -> None:
        """Freeze each stage but its attention heads' slices (or add per-head adapters), then draw round 1's heads."""
        self.check(settings)
        self._settings = settings
        _install_step_hook()
        for index in sorted(stages):
            stage = stages[index]
            try:
                blocks = block_heads(stage)
            except ValueError as exc:
                raise ValueError(f"partition {index}: {exc}") from exc
            stage.requires_grad_(False)
            if settings.head_adapter == "lora":
                self._stages[index] = self._add_adapters(stage, blocks, settings)
            else:
                self._stages[index] = self._slice_weights(stage, blocks)
        self._round = 0
        self.begin_round(stages, 1)

    def _slice_weights(self, stage: nn.Module, blocks: list[BlockHeads]) -> _StageHeads:
        params = dict(stage.named_parameters())
        sliced: dict[str, tuple[int, int]] = {}
        tracked: dict[str, _Trainable] = {}
        for block in blocks:
            for tensor in block.tensors:
                if tensor.name in sliced:
                    continue  # a fused q/k/v weight: one parameter, three runs of slices
                sliced[tensor.name] = (tensor.dim, tensor.width)
                param = params[tensor.name]
                slices = param.shape[tensor.dim] // tensor.width
                tracked[tensor.name] = self._track(param, tensor.dim, tensor.width, tensor.name, slices)
        for name, (module, axis, _) in _projection_modules(stage, blocks).items():
            projection = _SlicedProjection(
                module=module, weight=tracked[name], bias=tracked.get(name.removesuffix("weight") + "bias"),
                rows=axis == 0, conv=isinstance(module, Conv1D), every_slice=self._settings.head_choice == "importance",
            )  # fmt: skip
            module.forward = projection.forward  # type: ignore[method-assign]
        return _StageHeads(blocks=blocks, trainables=list(tracked.values()), adapters={}, sliced=sliced)

    def _add_adapters(self, stage: nn.Module, blocks: list[BlockHeads], settings: Any) -> _StageHeads:
        sliced: dict[str, tuple[int, int]] = {}
        adapters: dict[str, HeadLora] = {}
        trainables = []
        for name, (module, axis, width) in _projection_modules(stage, blocks).items():
            weight = module.get_parameter("weight")
            out_f, in_f = (weight.shape[1], weight.shape[0]) if isinstance(module, Conv1D) else weight.shape
            slices = (out_f if axis == 0 else in_f) // width
            lora = HeadLora(axis="out" if axis == 0 else "in", blocks=slices, width=width,
                            other=in_f if axis == 0 else out_f, r=settings.lora_r, alpha=settings.lora_alpha)  # fmt: skip
            lora.reset(self._generator(name))
            module.add_module(_ADAPTER, lora)
            module.register_forward_hook(_add_adapter_output)
            adapters[name] = lora
            sliced[name] = next((t.dim, t.width) for b in blocks for t in b.tensors if t.name == name)
            for param in (lora.A, lora.B):
                param.requires_grad_(True)
                trainables.append(self._track(param, 0, 1, name, slices))
        return _StageHeads(blocks=blocks, trainables=trainables, adapters=adapters, sliced=sliced)

    def _generator(self, name: str) -> torch.Generator:
        """The same adapter start for ``name`` on every copy (whatever the cut), from the run's seed."""
        digest = sum((i + 1) * ord(c) for i, c in enumerate(name)) % (1 << 31)
        return torch.Generator().manual_seed(self._settings.seed * 1_000_003 + digest)

    def _track(self, param: nn.Parameter, dim: int, width: int, base: str, slices: int) -> _Trainable:
        trainable = _Trainable(
            param=param, dim=dim, width=width, base=base, mask=torch.ones(slices, dtype=torch.bool)
        )
        param.requires_grad_(True)
        param.register_hook(self._grad_hook(trainable))
        _TRAINABLES[id(param)] = trainable
        return trainable

    def _grad_hook(self, trainable: _Trainable) -> Callable[[Tensor], Tensor]:
        def hook(grad: Tensor) -> Tensor:
            if self._settings.head_choice == "importance":
                per_slice = (
                    grad.detach().abs().movedim(trainable.dim, 0).reshape(trainable.mask.numel(), -1).sum(1)
                )
                total = self.magnitudes.get(trainable.base)
                if total is None:
                    total = self.magnitudes[trainable.base] = torch.zeros(
                        per_slice.numel(), dtype=torch.float64
                    )
                if (
                    total.numel() == per_slice.numel()
                ):  # a fused weight's adapters and the weight agree in slices
                    total += per_slice.to(torch.float64)
            if not trainable.untrained.numel():
                return grad
            return grad * trainable.broadcast.to(grad.dtype)

        return hook

    # -- rounds ----------------------------------------------------------------------------

    def begin_round(self, stages: Mapping[int, Any], round: int) -> None:
        """Choose the heads each block of ``stages`` trains in ``round`` (again for the same round: no change)."""
        if round == self._round or self._settings is None:
            return
        self._round = round
        s = self._settings
        for index, state in self._stages.items():
            chosen: dict[str, set[int]] = {}
            for block in state.blocks:
                where = {"seed": s.seed, "round": round, "key": s.head_key, "layer": block.layer}
                fraction = s.head_fraction
                if s.head_schedule == "redundancy":
                    output = stages[index].get_parameter(block.output)
                    fraction = redundancy_fraction(block.num_heads, fraction, head_redundancy(block, output))
                if s.head_choice == "importance" and self.magnitudes:
                    heads = top_heads(head_scores(block, self.magnitudes), fraction, **where)
                else:
                    heads = random_heads(block.num_heads, fraction, **where)
                state.heads[block.layer] = heads
                for name, slices in block.blocks(heads).items():
                    chosen.setdefault(name, set()).update(slices)
            if state.adapters:  # the adapters' slices are their weight's; the biases stay frozen
                chosen = {name: slices for name, slices in chosen.items() if name in state.adapters}
            state.chosen = chosen
            for trainable in state.trainables:
                mask = torch.zeros_like(trainable.mask)
                mask[sorted(chosen.get(trainable.base, ()))] = True
                trainable.set_mask(mask)

    def chosen_heads(self, index: int) -> dict[int, tuple[int, ...]]:
        """Block -> the query heads partition ``index`` trains this round (for reports and tests)."""
        return dict(self._stages[index].heads)

    # -- what travels ----------------------------------------------------------------------

    def trained_tensors(self, stage: Any) -> dict[str, Tensor]:
        """Every tensor of the stage (adapters merged into their weights), detached on the CPU."""
        state = self._stages.get(stage.spec.index)
        adapters = state.adapters if state is not None else {}
        out = {}
        for name, tensor in stage.model_state().items():
            if _ADAPTER in name:
                continue
            if name in adapters:
                delta = adapters[name].weight_delta().detach()
                module = stage.get_submodule(name.rsplit(".", 1)[0])
                tensor = tensor + (delta.T if isinstance(module, Conv1D) else delta)
            out[name] = tensor.detach().cpu().contiguous()
        return out

    def trained_slices(self, stage: Any) -> dict[str, TrainedSlices]:
        """Which head slices of each travelling tensor this stage trained this round (none for the rest)."""
        state = self._stages.get(stage.spec.index)
        out = {}
        for name in stage.model_state():
            if _ADAPTER in name:
                continue
            if state is not None and name in state.chosen:
                dim, width = state.sliced[name]
                out[name] = TrainedSlices(
                    tensor=name, dim=dim, width=width, blocks=tuple(sorted(state.chosen[name]))
                )
            else:
                out[name] = TrainedSlices(tensor=name, dim=0, width=1, blocks=())
        return out

    def load_tensors(self, stage: Any, tensors: Mapping[str, Tensor]) -> None:
        """Copy the merged tensors into the stage; adapters restart from zero over the merged weights."""
        own = {name: t for name, t in stage.model_state().items() if _ADAPTER not in name}
        copy_tensors(own, tensors, source=f"the merged weights of partition {stage.spec.index}")
        state = self._stages.get(stage.spec.index)
        if state is None:
            return
        for name, lora in state.adapters.items():
            lora.reset(self._generator(name))
        for trainable in state.trainables:
            trainable.anchor_now()

    def travels(self, name: str) -> bool:
        """Every tensor of the model travels (adapters only merged into their weights)."""
        return _ADAPTER not in name

    def export_config(self, model_config: Any, settings: Any, base_model: str) -> None:
        """A checkpoint is the whole model: no adapter config."""
        return None


def _add_adapter_output(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    lora = module.get_submodule(_ADAPTER)
    return output + lora(args[0])
