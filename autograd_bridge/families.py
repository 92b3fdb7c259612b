"""The little help some model families need before they can be cut into stages.

Everything else in :mod:`autograd_bridge.partition` is found generically (the block list,
the embeddings, the head, the rotary module, what happens before the first block and
after the head). This module answers the three questions the model's structure alone
cannot answer:

* which children of the decoder stack run *after* the last block (the final norm, and
  OPT's ``project_out``), so the last stage can apply them;
* which attention mask each block gets (full, sliding window, chunked), and which
  constant inputs a family's blocks expect besides it;
* which families' blocks take an attention bias the stack builds (ALiBi: BLOOM, MPT,
  Falcon with ``alibi=True``), and the :mod:`autograd_bridge.alibi` class that builds
  it for a stage;
* which configurations are known not to work (router losses, bidirectional masks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn
from transformers import PretrainedConfig

from autograd_bridge.alibi import BloomAlibi, FalconAlibi, MptAlibi, StageBias

#: Names a decoder stack uses for its final norm, in the order we look for them.
FINAL_NORM_NAMES: tuple[str, ...] = (
    "norm",
    "ln_f",
    "final_layer_norm",
    "final_layernorm",
    "norm_f",
    "final_norm",
)

#: Families whose stack runs more than a norm after the last block, in call order.
#: A name listed here may be ``None`` on the module (OPT drops ``project_out`` when the
#: embedding width equals the hidden width, and the final norm with post-norm layers).
_POST_BLOCK_NAMES: dict[str, tuple[str, ...]] = {
    "opt": ("final_layer_norm", "project_out"),
}

#: Mask kinds named in ``config.layer_types``, and the ``transformers.masking_utils``
#: function that builds each.
MASK_FUNCTION_NAMES: dict[str, str] = {
    "full_attention": "create_causal_mask",
    "sliding_attention": "create_sliding_window_causal_mask",
    "chunked_attention": "create_chunked_causal_mask",
}

#: Constant block inputs some families' stacks pass (Falcon without ALiBi passes ``alibi=None``;
#: with it, the attention bias below replaces that).
_EXTRA_BLOCK_INPUTS: dict[str, dict[str, Any]] = {
    "falcon": {"alibi": None},
}

#: Families whose blocks take an attention bias their stack builds (ALiBi), and the
#: class that builds it for one stage's blocks.
_ATTENTION_BIASES: dict[str, Callable[[PretrainedConfig], StageBias | None]] = {
    "bloom": BloomAlibi,
    "mpt": MptAlibi,
    "falcon": lambda config: FalconAlibi(config) if getattr(config, "alibi", False) else None,
}


def post_block_module_names(model_type: str, stack: nn.Module) -> tuple[str, ...]:
    """Names of the children of ``stack`` that run after its last block, in order.

    Returns an empty tuple when no known final norm is present; the caller decides
    whether that is an error.
    """
    if model_type in _POST_BLOCK_NAMES:
        return _POST_BLOCK_NAMES[model_type]
    children = dict(stack.named_children())
    for name in FINAL_NORM_NAMES:
        if name in children:
            return (name,)
    return ()


def layer_attention_types(config: PretrainedConfig, num_layers: int) -> tuple[str, ...]:
    """The mask kind of every decoder block, as the family's own stack chooses it.

    Families with ``config.layer_types`` (Gemma 2/3, Qwen 2/3, SmolLM3, ...) name it per
    layer. Families without it but with ``config.sliding_window`` set (Mistral, Mixtral,
    Phi-3, Starcoder2, Qwen3-MoE) use a sliding window on every layer. Everything else is
    plain causal.
    """
    layer_types: Sequence[str] | None = getattr(config, "layer_types", None)
    if layer_types is not None:
        return tuple(layer_types[:num_layers])
    if getattr(config, "sliding_window", None) is not None:
        return ("sliding_attention",) * num_layers
    return ("full_attention",) * num_layers


def extra_block_inputs(config: PretrainedConfig) -> dict[str, Any]:
    """Keyword arguments every block of this family gets besides mask and positions."""
    return dict(_EXTRA_BLOCK_INPUTS.get(getattr(config, "model_type", ""), {}))


def attention_bias(config: PretrainedConfig) -> StageBias | None:
    """The builder of this family's per-stage attention bias (ALiBi), or ``None`` when it has none."""
    make = _ATTENTION_BIASES.get(getattr(config, "model_type", ""))
    return make(config) if make is not None else None


def unsupported_reason(config: PretrainedConfig) -> str | None:
    """Why this configuration cannot be split, or ``None`` when nothing known stops it."""
    if getattr(config, "output_router_logits", False):
        return (
            "output_router_logits=True adds a router loss computed from every block's outputs; "
            "set config.output_router_logits = False to train the stages without it"
        )
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention masks are not causal-LM masks"
    return None
