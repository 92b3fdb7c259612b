"""Where each attention head of a decoder block lives in its weights, and which heads train in a round.

A head ``h`` of a block is a slice of four projections: rows ``h * d : (h + 1) * d`` of the
query, key and value weights (and biases), and the same columns of the output projection's
weight (``d`` the head width). A :class:`HeadTensor` names one such run of equal blocks along
one axis of one parameter, so every family is described by a handful of them per block:

    family        parameter                        axis   blocks
    llama-like    self_attn.q_proj.weight / bias   0      H query heads
                  self_attn.k_proj / v_proj        0      H_kv key/value heads (grouped-query attention)
                  self_attn.o_proj.weight          1      H
    gpt2          attn.c_attn.weight (Conv1D)      1      3H: queries, keys, values side by side
                  attn.c_attn.bias                 0      3H
                  attn.c_proj.weight (Conv1D)      0      H

"llama-like" is every block whose ``self_attn`` has ``q_proj``, ``k_proj``, ``v_proj`` and
``o_proj`` (or OPT's ``out_proj``) Linear layers: Llama and SmolLM2, Mistral, Qwen2/3,
Gemma, OPT, ... Other layouts (fused ``qkv_proj``, ``query_key_value``) are refused with
:class:`~autograd_bridge.errors.UnsupportedModelError`.

Grouped-query attention: query head ``h`` reads key/value head ``h // (H / H_kv)``, and a
key/value head trains when any query head of its group trains (the rule of
:meth:`HeadTensor.blocks`). The output projection's bias is not a head's slice and stays
frozen in heads mode.

Heads are drawn per block: ``ceil(fraction * H)`` of them (at least one), at random from
(seed, round, key, layer) with :func:`random_heads`, or the most important ones by
:func:`top_heads` (ties broken by the same random order). With the ``redundancy`` schedule the
count follows :func:`head_redundancy` instead: ``ceil(fraction * H_eff)`` with
``H_eff = H / (1 + (H - 1) R)`` the block's effective number of heads, R the mean absolute
cosine similarity between its heads' output-projection slices (R = 0: H distinct heads; R = 1:
one head H times over, so training one of them suffices).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..errors import UnsupportedModelError

__all__ = [
    "BlockHeads",
    "HeadTensor",
    "block_heads",
    "head_redundancy",
    "head_scores",
    "heads_to_train",
    "random_heads",
    "redundancy_fraction",
    "top_heads",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class HeadTensor:
    """A run of ``count`` equal head slices along axis ``dim`` of one parameter."""

    name: str  # the parameter's whole-model name
    dim: int  # the axis the heads' slices lie along
    width: int  # elements of one slice along ``dim`` (the head width)
    offset: int  # the first slice of this run along ``dim`` (a fused q/k/v weight has three runs)
    count: int  # slices in this run
    group: int  # query heads per slice: 1, or H / H_kv for the keys and values of grouped-query attention

    def blocks(self, heads: Iterable[int]) -> set[int]:
        """The slices (indices along ``dim`` in units of ``width``) that query heads ``heads`` train."""
        return {self.offset + h // self.group for h in heads}


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockHeads:
    """The attention heads of decoder block ``layer``."""

    layer: int
    num_heads: int  # query heads H
    tensors: tuple[HeadTensor, ...]
    output: str = (
        ""  # the output projection's weight: each head's slice of it is what the head adds to the block
    )

    def blocks(self, heads: Iterable[int]) -> dict[str, set[int]]:
        """Parameter name -> the slices ``heads`` train in it (every head tensor of the block appears)."""
        heads = list(heads)
        out: dict[str, set[int]] = {}
        for tensor in self.tensors:
            out.setdefault(tensor.name, set()).update(tensor.blocks(heads))
        return out


def _linear_out(module: Any) -> int | None:
    return module.out_features if isinstance(module, nn.Linear) else None


def _heads_of(config: Any) -> tuple[int, int]:
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    kv = int(getattr(config, "num_key_value_heads", 0) or 0) or heads
    if heads < 1 or heads % kv:
        raise UnsupportedModelError(
            f"heads mode needs num_attention_heads a multiple of num_key_value_heads, got {heads} and {kv}"
        )
    return heads, kv


def _llama_like(prefix: str, attn: nn.Module, layer: int, heads: int, kv: int) -> BlockHeads:
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    o = getattr(attn, "o_proj", None) or attn.out_proj
    q_out, k_out, v_out = _linear_out(q), _linear_out(k), _linear_out(v)
    if q_out is None or k_out is None or v_out is None or not isinstance(o, nn.Linear) or q_out % heads:
        raise UnsupportedModelError(
            f"block {layer}: the attention projections are not Linear layers of H heads"
        )
    width = q_out // heads
    if k_out != kv * width or v_out != kv * width or o.in_features != q_out:
        raise UnsupportedModelError(
            f"block {layer}: query/key/value widths {q_out}/{k_out}/{v_out} do not fit {heads} heads and {kv} "
            f"key/value heads of width {width}"
        )
    o_name = "o_proj" if getattr(attn, "o_proj", None) is not None else "out_proj"
    tensors: list[HeadTensor] = []
    for proj, count, group in (
        ("q_proj", heads, 1),
        ("k_proj", kv, heads // kv),
        ("v_proj", kv, heads // kv),
    ):
        names = ["weight"] + (["bias"] if getattr(attn, proj).bias is not None else [])
        tensors += [HeadTensor(name=f"{prefix}.{proj}.{n}", dim=0, width=width, offset=0, count=count, group=group)
                    for n in names]  # fmt: skip
    tensors.append(
        HeadTensor(name=f"{prefix}.{o_name}.weight", dim=1, width=width, offset=0, count=heads, group=1)
    )
    return BlockHeads(
        layer=layer, num_heads=heads, tensors=tuple(tensors), output=f"{prefix}.{o_name}.weight"
    )


def _gpt2(prefix: str, attn: nn.Module, layer: int, heads: int) -> BlockHeads:
    c_attn, c_proj = attn.c_attn, attn.c_proj
    if not isinstance(c_attn, Conv1D) or not isinstance(c_proj, Conv1D):
        raise UnsupportedModelError(f"block {layer}: c_attn and c_proj must be Conv1D layers")
    hidden = c_proj.weight.shape[0]  # Conv1D keeps its weight (in, out)
    if hidden % heads or c_attn.weight.shape[1] != 3 * hidden:
        raise UnsupportedModelError(f"block {layer}: c_attn is not a fused query/key/value of {heads} heads")
    width = hidden // heads
    tensors = [
        HeadTensor(
            name=f"{prefix}.c_attn.{n}", dim=dim, width=width, offset=part * heads, count=heads, group=1
        )
        for n, dim in (("weight", 1), ("bias", 0))
        for part in range(3)
    ]
    tensors.append(
        HeadTensor(name=f"{prefix}.c_proj.weight", dim=0, width=width, offset=0, count=heads, group=1)
    )
    return BlockHeads(layer=layer, num_heads=heads, tensors=tuple(tensors), output=f"{prefix}.c_proj.weight")


def block_heads(stage: Any) -> list[BlockHeads]:
    """The heads of every decoder block of ``stage`` (a StageModule; a whole model is a stage of one).

    UnsupportedModelError for attention layouts this mode does not know.
    """
    layout, spec = stage.layout, stage.spec
    heads, kv = _heads_of(stage.config)
    out = []
    for layer in range(spec.layer_start, spec.layer_end):
        path = layout.block_path(layer)
        block = stage.get_submodule(path)
        attn = getattr(block, "self_attn", None)
        if (
            attn is not None
            and all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj"))
            and (hasattr(attn, "o_proj") or hasattr(attn, "out_proj"))
        ):
            out.append(_llama_like(f"{path}.self_attn", attn, layer, heads, kv))
            continue
        attn = getattr(block, "attn", None)
        if attn is not None and hasattr(attn, "c_attn") and hasattr(attn, "c_proj"):
            out.append(_gpt2(f"{path}.attn", attn, layer, heads))
            continue
        raise UnsupportedModelError(
            f"heads mode knows separate q/k/v/o projections (Llama-like) and GPT-2's fused c_attn; block {layer} of "
            f'this {stage.config.model_type} model has neither: use [finetune] mode = "full" or "lora"'
        )
    return out


def head_redundancy(block: BlockHeads, output_weight: Tensor) -> float:
    """Mean absolute cosine similarity between the heads' slices of the output projection, in [0, 1]."""
    if block.num_heads < 2:
        return 0.0
    tensor = next(t for t in block.tensors if t.name == block.output)
    per_head = (
        output_weight.detach().double().movedim(tensor.dim, 0).reshape(block.num_heads, -1)
    )  # (H, d * out)
    unit = per_head / per_head.norm(dim=1, keepdim=True).clamp_min(1e-30)
    similarity = (unit @ unit.T).abs()
    off_diagonal = similarity.sum() - similarity.diagonal().sum()
    return float(off_diagonal / (block.num_heads * (block.num_heads - 1)))


def redundancy_fraction(num_heads: int, fraction: float, redundancy: float) -> float:
    """The share of the heads to train: ``ceil(fraction * H_eff) / H``, H_eff = H / (1 + (H - 1) R); 1 stays 1."""
    if fraction >= 1.0:
        return 1.0  # an owner that trains every head keeps doing so (SMHA converges only with one)
    effective = num_heads / (1.0 + (num_heads - 1) * min(max(redundancy, 0.0), 1.0))
    return heads_to_train(num_heads, fraction * effective / num_heads) / num_heads


def heads_to_train(num_heads: int, fraction: float) -> int:
    """How many heads a block trains at ``fraction``: ceil(fraction * H), at least 1."""
    return max(1, min(num_heads, math.ceil(fraction * num_heads - 1e-9)))


def _order(num_heads: int, *, seed: int, round: int, key: str, layer: int) -> list[int]:
    """A random order of the heads, the same wherever (seed, round, key, layer) are the same."""
    rng = random.Random(f"titanic-heads:{seed}:{round}:{key}:{layer}")  # str seeds hash with sha512: stable
    order = list(range(num_heads))
    rng.shuffle(order)
    return order


def random_heads(
    num_heads: int, fraction: float, *, seed: int, round: int, key: str, layer: int
) -> tuple[int, ...]:
    """The heads block ``layer`` trains in ``round``, drawn from (seed, round, key, layer), sorted."""
    order = _order(num_heads, seed=seed, round=round, key=key, layer=layer)
    return tuple(sorted(order[: heads_to_train(num_heads, fraction)]))


def top_heads(
    scores: Sequence[float], fraction: float, *, seed: int, round: int, key: str, layer: int
) -> tuple[int, ...]:
    """The ``ceil(fraction * H)`` heads with the highest ``scores``; equal scores in a seeded random order."""
    order = _order(len(scores), seed=seed, round=round, key=key, layer=layer)
    rank = {h: i for i, h in enumerate(order)}
    ranked = sorted(range(len(scores)), key=lambda h: (-scores[h], rank[h]))
    return tuple(sorted(ranked[: heads_to_train(len(scores), fraction)]))


def head_scores(block: BlockHeads, magnitudes: Mapping[str, Any]) -> list[float]:
    """Per query head, the gradient magnitude of its slices (per-slice sequences by name; a shared key/value slice counts 1/group)."""
    scores = [0.0] * block.num_heads
    for tensor in block.tensors:
        slices = magnitudes.get(tensor.name)
        if slices is None:
            continue
        for h in range(block.num_heads):
            scores[h] += float(slices[tensor.offset + h // tensor.group]) / tensor.group
    return scores
