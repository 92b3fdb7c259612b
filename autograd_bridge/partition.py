"""Find the pieces of any Hugging Face decoder-only causal LM and cut it into stages.

A causal LM is, for our purposes, a *stack* (``model.model``, ``model.transformer``,
``model.model.decoder``, ...) holding a ``ModuleList`` of ``num_hidden_layers`` decoder
blocks, plus an output head on the root. Stage ``k`` of ``K`` owns blocks
``[layer_start, layer_end)``; the first stage also owns everything the stack runs before
block 0 (token embeddings, GPT-2's position embeddings and dropout, Gemma's embedding
scaling, OPT's ``project_in``, ...), the last stage everything after the last block (the
final norm, the head and any logit processing such as Gemma 2's soft-capping).

How the pieces are reproduced exactly, without family-specific code:

* **Before block 0.** The first stage runs the stack's *own* forward with its block list
  replaced by a stub that raises as soon as it is called, carrying the hidden states it
  was given: whatever the family does between token ids and the first block happens,
  and nothing after it.
* **Blocks.** Every stage builds the block inputs itself from ``attention_mask`` and
  ``position_ids``: the mask with ``transformers.masking_utils`` (full, sliding or
  chunked per layer, see :mod:`autograd_bridge.families`), the rotary ``(cos, sin)``
  with the stack's rotary module, and for ALiBi families (BLOOM, MPT, Falcon with
  ``alibi=True``) the attention bias with :mod:`autograd_bridge.alibi`. Keyword
  arguments are filtered to what each block's ``forward`` accepts.
* **After the last block.** The final norm (named in ``families``) is applied, then the
  root model's *own* forward runs with its stack replaced by a pass-through, so the head
  and any logit processing the family does are applied as in the whole model.

Every stage is the same :class:`StageModule` class, holding its pieces under their
whole-model names (``model.layers.3.mlp.up_proj.weight``), so state dicts and checkpoints
line up without renaming.

Exactness: a split model reproduces the whole model's logits, loss and gradients to
float rounding when dropout is inactive (probabilities 0, as in ``models.tiny_config``,
or modules in ``eval()`` mode). With active dropout both are correct but draw different
random masks, so they cannot be compared number for number.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, masking_utils
from transformers.utils import ModelOutput

from autograd_bridge import families
from autograd_bridge.errors import UnsupportedModelError

__all__ = [
    "ModelLayout",
    "StageModule",
    "StageSpec",
    "causal_lm_loss",
    "even_stage_specs",
    "find_layout",
    "load_stage",
    "save_stage_weights",
    "split_model",
    "stage_specs_from_counts",
    "tie_stage_weights",
]

WeightFiles = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


# --------------------------------------------------------------------------- stage specs


@dataclass(frozen=True, slots=True, kw_only=True)
class StageSpec:
    """Which decoder blocks one pipeline stage holds."""

    index: int
    """0-based stage number."""
    num_stages: int
    """How many stages the model is cut into."""
    layer_start: int
    """First decoder block, inclusive."""
    layer_end: int
    """Last decoder block, exclusive (``layer_start == layer_end`` holds no block)."""

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.num_stages:
            raise ValueError(f"stage index {self.index} is outside 0..{self.num_stages - 1}")
        if not 0 <= self.layer_start <= self.layer_end:
            raise ValueError(
                f"stage {self.index}: need 0 <= layer_start <= layer_end, "
                f"got {self.layer_start}..{self.layer_end}"
            )

    @property
    def is_first(self) -> bool:
        """True for the stage holding the input embeddings."""
        return self.index == 0

    @property
    def is_last(self) -> bool:
        """True for the stage holding the final norm and the LM head."""
        return self.index == self.num_stages - 1

    @property
    def num_blocks(self) -> int:
        """How many decoder blocks this stage holds."""
        return self.layer_end - self.layer_start


def stage_specs_from_counts(block_counts: Sequence[int]) -> list[StageSpec]:
    """Consecutive stages holding ``block_counts[k]`` blocks each (zero is allowed)."""
    if not block_counts:
        raise ValueError("block_counts is empty: give one block count per stage")
    if any(count < 0 for count in block_counts):
        raise ValueError(f"block counts must be >= 0, got {list(block_counts)}")
    specs: list[StageSpec] = []
    start = 0
    for index, count in enumerate(block_counts):
        specs.append(
            StageSpec(
                index=index,
                num_stages=len(block_counts),
                layer_start=start,
                layer_end=start + count,
            )
        )
        start += count
    return specs


def even_stage_specs(num_layers: int, num_stages: int) -> list[StageSpec]:
    """Cut ``num_layers`` blocks into ``num_stages`` stages as evenly as possible.

    When the blocks do not divide evenly, the extra blocks go to the middle stages first:
    the first and last stages already carry the embeddings and the head.
    """
    if not 1 <= num_stages <= num_layers:
        raise ValueError(
            f"cannot cut {num_layers} blocks into {num_stages} stages: use 1..{num_layers} stages"
        )
    counts = [num_layers // num_stages] * num_stages
    extra = num_layers % num_stages
    middle_first = [*range(1, num_stages - 1), num_stages - 1, 0]
    for index in middle_first[:extra]:
        counts[index] += 1
    return stage_specs_from_counts(counts)


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelLayout:
    """Where the pieces of a causal LM live, as dotted paths from the root model."""

    model_type: str
    """``config.model_type`` of the model."""
    stack_path: str
    """The decoder stack holding the blocks (``"model"``, ``"transformer"``, ``"model.decoder"``)."""
    blocks_name: str
    """Attribute of the stack holding the ``ModuleList`` of blocks (``"layers"``, ``"h"``)."""
    num_layers: int
    """Number of decoder blocks."""
    pre_block_names: tuple[str, ...]
    """Children of the stack that run before block 0 (embeddings, position embeddings, dropout)."""
    rotary_name: str | None
    """Child of the stack computing rotary ``(cos, sin)``, or ``None``."""
    post_block_names: tuple[str, ...]
    """Children of the stack that run after the last block, in call order (final norm, ...)."""
    embedding_path: str
    """The input embedding module (``get_input_embeddings()``)."""
    head_path: str
    """The output head module (``get_output_embeddings()``), a child of the root."""
    tied_embeddings: bool
    """True when the head's weight is the input embedding's weight."""
    layer_types: tuple[str, ...]
    """Mask kind of each block (``"full_attention"``, ``"sliding_attention"``, ...)."""

    def block_path(self, layer: int) -> str:
        """Dotted path of decoder block ``layer``."""
        return f"{self.stack_path}.{self.blocks_name}.{layer}"

    def stack_child(self, name: str) -> str:
        """Dotted path of a child of the decoder stack."""
        return f"{self.stack_path}.{name}"


def _module_path(root: nn.Module, target: nn.Module) -> str | None:
    for name, module in root.named_modules():
        if module is target:
            return name
    return None


def find_layout(model: PreTrainedModel) -> ModelLayout:
    """Locate blocks, embeddings, head, final norm and rotary module of ``model``.

    Raises :class:`UnsupportedModelError` naming the piece that could not be found.
    """
    if not isinstance(model, PreTrainedModel):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a transformers model; load it with AutoModelForCausalLM"
        )
    config = model.config
    reason = families.unsupported_reason(config)
    if reason is not None:
        raise UnsupportedModelError(f"{type(model).__name__} cannot be split: {reason}")
    num_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(num_layers, int) or num_layers < 1:
        raise UnsupportedModelError(
            f"{type(model).__name__}: config has no num_hidden_layers; only decoder-only causal LMs are supported"
        )
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if not isinstance(embedding, nn.Module) or not isinstance(head, nn.Module):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no input embeddings or no output head "
            "(get_input_embeddings / get_output_embeddings); load it with AutoModelForCausalLM"
        )
    stack_path, blocks_name = _find_blocks(model, embedding, num_layers)
    stack = model.get_submodule(stack_path)
    embedding_path = _module_path(model, embedding)
    head_path = _module_path(model, head)
    if embedding_path is None or head_path is None or "." in head_path:
        raise UnsupportedModelError(
            f"{type(model).__name__}: the output head must be a direct child of the model, found {head_path!r}"
        )
    model_type = str(getattr(config, "model_type", ""))
    post = families.post_block_module_names(model_type, stack)
    if not post:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no final norm among {families.FINAL_NORM_NAMES} in "
            f"{stack_path!r}; add the family's post-block modules to autograd_bridge/families.py"
        )
    rotary_name = _find_rotary(stack)
    pre = tuple(
        name
        for name, _child in stack.named_children()
        if name not in {blocks_name, rotary_name, *post}
    )
    _check_root_children(model, stack_path, head_path)
    _check_no_direct_tensors(stack, stack_path)
    head_weight = getattr(head, "weight", None)
    embedding_weight = getattr(embedding, "weight", None)
    return ModelLayout(
        model_type=model_type,
        stack_path=stack_path,
        blocks_name=blocks_name,
        num_layers=num_layers,
        pre_block_names=pre,
        rotary_name=rotary_name,
        post_block_names=post,
        embedding_path=embedding_path,
        head_path=head_path,
        tied_embeddings=head_weight is not None and head_weight is embedding_weight,
        layer_types=families.layer_attention_types(config, num_layers),
    )


def _find_blocks(model: nn.Module, embedding: nn.Module, num_layers: int) -> tuple[str, str]:
    """The ``ModuleList`` of ``num_layers`` blocks that sits next to the input embeddings."""
    found: list[tuple[str, str]] = []
    for path, module in model.named_modules():
        children = dict(module.named_children())
        if not any(child is embedding for child in children.values()):
            continue
        for name, child in children.items():
            if isinstance(child, nn.ModuleList) and len(child) == num_layers:
                found.append((path, name))
    if len(found) != 1:
        raise UnsupportedModelError(
            f"{type(model).__name__}: expected one ModuleList of {num_layers} decoder blocks next to the "
            f"input embeddings, found {len(found)}"
        )
    return found[0]


def _find_rotary(stack: nn.Module) -> str | None:
    for name, child in stack.named_children():
        if type(child).__name__.endswith("RotaryEmbedding"):
            return name
    return None


def _check_root_children(model: nn.Module, stack_path: str, head_path: str) -> None:
    """Refuse models holding weights outside the stack and the head: no stage would own them."""
    parts = stack_path.split(".")
    for depth in range(len(parts)):
        holder_path = ".".join(parts[:depth])
        holder = model.get_submodule(holder_path) if holder_path else model
        if holder._parameters:
            raise UnsupportedModelError(
                f"{type(model).__name__}: {holder_path or 'the root model'!r} holds parameters of its own "
                f"({sorted(holder._parameters)}); no stage would own them"
            )
        for name, child in holder.named_children():
            on_path = name == parts[depth] or (depth == 0 and name == head_path)
            if not on_path and any(True for _ in child.parameters()):
                where = f"{holder_path}.{name}" if holder_path else name
                raise UnsupportedModelError(
                    f"{type(model).__name__}: {where!r} holds weights outside the decoder stack and the head"
                )


def _check_no_direct_tensors(stack: nn.Module, stack_path: str) -> None:
    if stack._parameters or any(
        name not in stack._non_persistent_buffers_set for name in stack._buffers
    ):
        raise UnsupportedModelError(
            f"the decoder stack {stack_path!r} holds tensors directly; no stage would own them"
        )


# --------------------------------------------------------------------------- stand-ins


class _FirstBlockReached(Exception):
    """Raised by the stand-in for block 0; carries the hidden states the stack gave it."""

    def __init__(self, hidden_states: Tensor) -> None:
        super().__init__("first decoder block reached")
        self.hidden_states = hidden_states


class _StopAtFirstBlock(nn.Module):
    """Stands in for the block list while the first stage runs the stack's own forward."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        raise _FirstBlockReached(hidden_states)


@dataclass
class _StackOutput(ModelOutput):
    """What the pass-through stack returns: the hidden states, and None for anything else
    a family's forward reads from its stack's output (cache, attentions, cross-attentions)."""

    last_hidden_state: Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return None


class _PassHiddenStates(nn.Module):
    """Stands in for the decoder stack while the last stage runs the root's own forward."""

    def forward(self, *args: Any, inputs_embeds: Tensor | None = None, **kwargs: Any) -> _StackOutput:
        if inputs_embeds is None:
            raise UnsupportedModelError(
                "the model's forward did not hand inputs_embeds to its decoder stack; "
                "its head cannot be run on its own"
            )
        return _StackOutput(last_hidden_state=inputs_embeds)


def _hollow(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` (same class, config and flags) without children."""
    clone = object.__new__(type(module))
    clone.__dict__.update(module.__dict__)
    clone.__dict__["_modules"] = {}
    clone.__dict__["_parameters"] = dict(module._parameters)
    clone.__dict__["_buffers"] = dict(module._buffers)
    return clone


def _with_children(template: nn.Module, children: Mapping[str, nn.Module], *, training: bool) -> nn.Module:
    """A copy of the hollow ``template`` holding ``children``; shares every tensor."""
    clone = _hollow(template)
    clone._modules.update(children)
    clone.training = training
    return clone


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` under the dotted ``path``, creating plain holder modules on the way."""
    *holders, leaf = path.split(".")
    holder = root
    for part in holders:
        child = holder._modules.get(part)
        if child is None:
            if hasattr(holder, part):
                raise UnsupportedModelError(f"model piece {path!r} clashes with StageModule.{part}")
            child = nn.Module()
            holder.add_module(part, child)
        holder = child
    if holder is root and hasattr(root, leaf):
        raise UnsupportedModelError(f"model piece {path!r} clashes with StageModule.{leaf}")
    holder.add_module(leaf, module)


_SUPPLIED_BLOCK_ARGS = frozenset({"attention_mask", "position_ids", "position_embeddings", "use_cache"})


def _block_argument_names(block: nn.Module, layer: int, extra: frozenset[str]) -> frozenset[str]:
    """Which of the generic block inputs (and the family's ``extra`` ones) ``block.forward`` takes."""
    parameters = list(inspect.signature(block.forward).parameters.values())[1:]
    named = {
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    required = {
        p.name
        for p in parameters
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    supplied = _SUPPLIED_BLOCK_ARGS | extra
    if required - supplied:
        raise UnsupportedModelError(
            f"decoder block {layer} ({type(block).__name__}) requires {sorted(required - supplied)}, "
            "which only the whole model's stack can build"
        )
    accepted = named & supplied
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        # Every Hugging Face stack passes position_ids, if only through **kwargs.
        accepted |= {"position_ids"}
    return frozenset(accepted)


# --------------------------------------------------------------------------- the stage


class StageModule(nn.Module):
    """One pipeline stage: a run of decoder blocks, plus embeddings (first) or head (last).

    Submodules are registered under their whole-model paths, so ``state_dict()`` keys and
    ``named_parameters()`` names are the whole model's. Build one with :func:`split_model`
    (sharing the model's parameters) or :func:`load_stage` (reading only its own tensors).
    """

    spec: StageSpec
    layout: ModelLayout
    config: PretrainedConfig
    tied_embeddings: bool
    _templates: list[nn.Module]

    def __init__(self, model: PreTrainedModel, spec: StageSpec, layout: ModelLayout | None = None) -> None:
        super().__init__()
        layout = layout if layout is not None else find_layout(model)
        if spec.layer_end > layout.num_layers:
            raise ValueError(
                f"stage {spec.index} asks for blocks up to {spec.layer_end}, the model has {layout.num_layers}"
            )
        self.spec = spec
        self.layout = layout
        self.config = model.config
        self.tied_embeddings = layout.tied_embeddings
        stack = model.get_submodule(layout.stack_path)
        # The post-block modules this model really has (OPT may lack either of its two).
        self._post_block_paths = [
            layout.stack_child(name) for name in layout.post_block_names if getattr(stack, name, None) is not None
        ] if spec.is_last else []
        for path, module in self._owned_pieces(model):
            _attach(self, path, module)
        stack_parts = layout.stack_path.split(".")
        # Hollow copies of the root and of every module down to the stack: their classes'
        # forward methods are reused with our pieces swapped in. Kept out of _modules so
        # they add no parameters and are not walked by .to() or state_dict().
        holders = [model] + [model.get_submodule(".".join(stack_parts[: i + 1])) for i in range(len(stack_parts))]
        object.__setattr__(self, "_templates", [_hollow(holder) for holder in holders])
        self._extra_block_inputs = families.extra_block_inputs(model.config)
        # ALiBi families: the stage builds the bias its blocks take (autograd_bridge.alibi).
        self._attention_bias = families.attention_bias(model.config)
        extra = frozenset(self._extra_block_inputs)
        if self._attention_bias is not None:
            extra |= self._attention_bias.argument_names
        self._block_args = {
            layer: _block_argument_names(self._block(layer), layer, extra)
            for layer in range(spec.layer_start, spec.layer_end)
        }
        needs_rotary = any("position_embeddings" in names for names in self._block_args.values())
        if needs_rotary and layout.rotary_name is None:
            raise UnsupportedModelError(
                f"{type(model).__name__}: blocks take position_embeddings but the stack has no rotary module"
            )
        self._rotary_per_type = False
        if needs_rotary and layout.rotary_name is not None:
            rotary = self.get_submodule(layout.stack_child(layout.rotary_name))
            self._rotary_per_type = "layer_type" in inspect.signature(rotary.forward).parameters
        self._needs_rotary = needs_rotary
        # Whole-model names that alias another parameter (a tied head), mapped to the name
        # the whole model's named_parameters() reports.
        first_name: dict[int, str] = {}
        self._canonical_names: dict[str, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) in first_name:
                self._canonical_names[name] = first_name[id(param)]
            else:
                first_name[id(param)] = name

    def _owned_pieces(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        layout, spec = self.layout, self.spec
        stack = model.get_submodule(layout.stack_path)
        names: list[str] = []
        if spec.is_first:
            names += list(layout.pre_block_names)
        if layout.rotary_name is not None and spec.num_blocks:
            names.append(layout.rotary_name)
        names += [f"{layout.blocks_name}.{i}" for i in range(spec.layer_start, spec.layer_end)]
        pieces = [(layout.stack_child(name), stack.get_submodule(name)) for name in names]
        pieces += [(path, model.get_submodule(path)) for path in self._post_block_paths]
        if spec.is_last:
            pieces.append((layout.head_path, model.get_submodule(layout.head_path)))
        return pieces

    def _block(self, layer: int) -> nn.Module:
        return self.get_submodule(self.layout.block_path(layer))

    def forward(
        self, x: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Tensor:
        """Run this stage.

        ``x`` is input ids (B, T) int64 on the first stage and hidden states (B, T, C)
        elsewhere; ``attention_mask`` (B, T) holds 1 for tokens and 0 for padding and is the
        same tensor on every stage; ``position_ids`` (B, T) or (1, T) defaults to 0..T-1.
        Returns hidden states (B, T, C), or logits (B, T, V) on the last stage.
        """
        hidden = self._embed(x, attention_mask, position_ids) if self.spec.is_first else x
        if self.spec.num_blocks:
            hidden = self._run_blocks(hidden, attention_mask, position_ids)
        if self.spec.is_last:
            return self._head(hidden)
        return hidden

    def _embed(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None) -> Tensor:
        """The first block's input, computed by the stack's own forward (stopped at block 0)."""
        layout = self.layout
        children: dict[str, nn.Module] = {
            name: self.get_submodule(layout.stack_child(name)) for name in layout.pre_block_names
        }
        children[layout.blocks_name] = nn.ModuleList([_StopAtFirstBlock()])
        if layout.rotary_name is not None:
            children[layout.rotary_name] = self._rotary_or_placeholder()
        for name in layout.post_block_names:
            children[name] = nn.Identity()
        stack = _with_children(self._templates[-1], children, training=self.training)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        try:
            stack(**kwargs)
        except _FirstBlockReached as reached:
            return reached.hidden_states  # (B, T, C)
        raise UnsupportedModelError(f"the forward of {layout.stack_path!r} never called its first decoder block")

    def _rotary_or_placeholder(self) -> nn.Module:
        assert self.layout.rotary_name is not None
        path = self.layout.stack_child(self.layout.rotary_name)
        try:
            return self.get_submodule(path)
        except AttributeError:
            # A first stage without blocks does not own the rotary module; the stack's
            # forward still computes (cos, sin) before reaching the blocks, for nothing.
            return _RotaryPlaceholder()

    def _run_blocks(self, hidden: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None) -> Tensor:
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # (1, T)
        layer_types = self.layout.layer_types
        kinds = {layer_types[layer] for layer in self._block_args}
        masks = {kind: self._mask(kind, hidden, attention_mask, position_ids) for kind in kinds}
        rotary: dict[str, Any] = {}
        if self._needs_rotary:
            rotary = self._position_embeddings(kinds, hidden, position_ids)
        biased: dict[str, dict[str, Any]] = {}
        if self._attention_bias is not None:
            biased = {kind: self._attention_bias.block_inputs(hidden, attention_mask, masks[kind]) for kind in kinds}
        for layer, accepted in self._block_args.items():
            kind = layer_types[layer]
            offered: dict[str, Any] = {
                **self._extra_block_inputs,
                "attention_mask": masks[kind],
                "position_ids": position_ids,
                "position_embeddings": rotary.get(kind),
                "use_cache": False,
                **biased.get(kind, {}),
            }
            out = self._block(layer)(hidden, **{name: offered[name] for name in accepted})
            hidden = out[0] if isinstance(out, tuple) else out  # (B, T, C)
        return hidden

    def _mask(self, kind: str, hidden: Tensor, attention_mask: Tensor | None, position_ids: Tensor) -> Any:
        function_name = families.MASK_FUNCTION_NAMES.get(kind)
        if function_name is None:
            raise UnsupportedModelError(f"no mask builder for layer type {kind!r}; add it to families.py")
        build = getattr(masking_utils, function_name)
        options: dict[str, Any] = {}
        if self._attention_bias is not None and self._attention_bias.needs_full_mask:
            options["allow_is_causal_skip"] = False  # the bias is added onto the mask
        return build(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=None,
            position_ids=position_ids,
            **options,
        )

    def _position_embeddings(self, kinds: set[str], hidden: Tensor, position_ids: Tensor) -> dict[str, Any]:
        assert self.layout.rotary_name is not None
        rotary = self.get_submodule(self.layout.stack_child(self.layout.rotary_name))
        if self._rotary_per_type:
            return {kind: rotary(hidden, position_ids, layer_type=kind) for kind in kinds}
        shared = rotary(hidden, position_ids)  # (cos, sin), each (B, T, head_dim)
        return dict.fromkeys(kinds, shared)

    def _head(self, hidden: Tensor) -> Tensor:
        """Final norm, then the root's own forward with its stack replaced by a pass-through."""
        layout = self.layout
        for path in self._post_block_paths:
            hidden = self.get_submodule(path)(hidden)
        parts = layout.stack_path.split(".")
        node: nn.Module = _PassHiddenStates()
        for depth in range(len(parts) - 1, 0, -1):
            node = _with_children(self._templates[depth], {parts[depth]: node}, training=self.training)
        root = _with_children(
            self._templates[0],
            {parts[0]: node, layout.head_path: self.get_submodule(layout.head_path)},
            training=self.training,
        )
        out = root(inputs_embeds=hidden, use_cache=False)
        return out.logits  # (B, T, V)

    def named_model_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This stage's trainable tensors, named exactly as in the whole model.

        A weight tied to another (the head tied to the input embeddings) is reported once,
        under the name the whole model's ``named_parameters()`` uses, by the stage owning
        that name: the first stage. Build optimizers from this, not from ``parameters()``.
        """
        own = {name for name, _ in self.named_parameters(remove_duplicate=False)}
        for name, param in self.named_parameters():
            canonical = self._canonical_names.get(name, name)
            if canonical != name and canonical not in own:
                continue
            yield canonical, param

    def model_state(self) -> dict[str, Tensor]:
        """Every tensor this stage needs, under whole-model names, tied ones once."""
        state: dict[str, Tensor] = {}
        for name, tensor in self.state_dict().items():
            state.setdefault(self._canonical_names.get(name, name), tensor)
        return state


class _RotaryPlaceholder(nn.Module):
    """Answers the stack's rotary call in a first stage that holds no blocks."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> None:
        return None


# --------------------------------------------------------------------------- building stages


def _check_specs(specs: Sequence[StageSpec], num_layers: int) -> None:
    if not specs:
        raise ValueError("no stage specs given: use even_stage_specs(num_layers, num_stages)")
    expected_start = 0
    for position, spec in enumerate(specs):
        if spec.index != position or spec.num_stages != len(specs) or spec.layer_start != expected_start:
            raise ValueError(
                f"stage specs must be consecutive and cover every block; spec {position} is {spec}; "
                "build them with even_stage_specs or stage_specs_from_counts"
            )
        expected_start = spec.layer_end
    if expected_start != num_layers:
        raise ValueError(f"the stage specs cover {expected_start} blocks, the model has {num_layers}")


def split_model(model: PreTrainedModel, specs: Sequence[StageSpec]) -> list[StageModule]:
    """Cut ``model`` into one :class:`StageModule` per spec, sharing its parameters.

    A tied head weight is one ``Parameter`` shared by the first and the last stage, so
    when both live with the data owner the gradient of both uses accumulates in it.
    """
    layout = find_layout(model)
    _check_specs(specs, layout.num_layers)
    return [StageModule(model, spec, layout) for spec in specs]


def tie_stage_weights(first: StageModule, last: StageModule) -> None:
    """Make a separately loaded last stage use the first stage's embedding as its head weight.

    Needed once after :func:`load_stage` for models with tied embeddings (GPT-2, SmolLM2,
    Gemma): until then the last stage holds a copy that no optimizer updates.
    """
    if not (first.spec.is_first and last.spec.is_last):
        raise ValueError(f"tie the first stage to the last, got stages {first.spec.index} and {last.spec.index}")
    if not (first.tied_embeddings and last.tied_embeddings):
        raise ValueError("this model does not tie its head to its input embeddings; nothing to tie")
    embedding_weight = first.get_submodule(first.layout.embedding_path).get_parameter("weight")
    head = last.get_submodule(last.layout.head_path)
    if head.get_parameter("weight").shape != embedding_weight.shape:
        raise ValueError(
            f"head weight {tuple(head.get_parameter('weight').shape)} and embedding "
            f"{tuple(embedding_weight.shape)} differ; are the stages from the same model?"
        )
    head.weight = embedding_weight


def load_stage(
    config: PretrainedConfig,
    spec: StageSpec,
    weight_files: WeightFiles,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str | None = None,
) -> StageModule:
    """Build one stage from ``config`` and read only its own tensors from safetensors files.

    ``weight_files`` is a ``.safetensors`` file, a list of them, or a directory holding
    them: the whole model's ``model.safetensors`` (or its shards) or the file
    :func:`save_stage_weights` wrote for this stage. The rest of the model is never
    allocated (it is built on the meta device). Returned in ``eval()`` mode, like
    ``from_pretrained``. ``attn_implementation`` defaults to the one ``config`` carries.
    """
    if attn_implementation is None:
        # Keep the attention the whole model was loaded with (sdpa and eager differ in rounding).
        attn_implementation = getattr(config, "_attn_implementation", None)
    config = _copy_config(config)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    layout = find_layout(skeleton)
    if spec.layer_end > layout.num_layers:
        raise ValueError(f"stage {spec.index} asks for blocks up to {spec.layer_end}, the model has {layout.num_layers}")
    stage = StageModule(skeleton, spec, layout)
    _materialize(stage, skeleton, _TensorIndex(_weight_paths(weight_files), skeleton), dtype, torch.device(device))
    return stage.eval()


def copy_tensors(own: Mapping[str, Tensor], values: Mapping[str, Tensor], *, source: str) -> None:
    """Copy ``values`` into the tensors ``own`` by name, in place.

    ValueError, before any copy, when ``values`` lacks one of them; and when a shape differs.
    ``source`` names ``values`` in the errors ("the LoRA state", "the merged weights of ...").
    """
    missing = sorted(set(own) - set(values))
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} tensor(s) of this stage, e.g. {missing[0]!r}")
    with torch.no_grad():
        for name, tensor in own.items():
            value = values[name]
            if value.shape != tensor.shape:
                raise ValueError(f"{name!r} is {tuple(value.shape)} in {source}, {tuple(tensor.shape)} here")
            tensor.copy_(value)


def save_stage_weights(stage: StageModule, path: str | os.PathLike[str]) -> None:
    """Write every tensor ``stage`` needs to one safetensors file, under whole-model names.

    A last stage with a tied head stores that weight under the embedding's name, so its
    file is enough to :func:`load_stage` it alone.
    """
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in stage.model_state().items()}
    spec = stage.spec
    metadata = {
        "format": "pt",
        "titanic_stage": json.dumps(
            {"index": spec.index, "num_stages": spec.num_stages, "layer_start": spec.layer_start,
             "layer_end": spec.layer_end}
        ),
        "model_type": stage.layout.model_type,
    }
    save_file(tensors, os.fspath(path), metadata=metadata)


def _copy_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy without a quantization config: gguf-loaded configs carry one we never use."""
    copied = config.__class__.from_dict(config.to_dict())
    if hasattr(copied, "quantization_config"):
        del copied.quantization_config
    return copied


def _weight_paths(weight_files: WeightFiles) -> list[Path]:
    if isinstance(weight_files, (str, os.PathLike)):
        given = [Path(weight_files)]
    else:
        given = [Path(item) for item in weight_files]
    paths: list[Path] = []
    for item in given:
        if item.is_dir():
            paths += sorted(item.glob("*.safetensors"))
        elif item.is_file():
            paths.append(item)
        else:
            raise ValueError(f"weight file {item} does not exist; pass .safetensors files or a model directory")
    if not paths:
        raise ValueError(f"no .safetensors files in {[str(p) for p in given]}; save the model with save_pretrained")
    return paths


class _TensorIndex:
    """Which file holds which tensor, under the model's own names; reads only what is asked.

    Whole-model checkpoints are mapped to model names the way ``from_pretrained`` maps
    them: the family's checkpoint renamings (``embed_out`` -> ``lm_head`` for GPT-NeoX, ...)
    and a missing or extra ``base_model_prefix``. Files written by
    :func:`save_stage_weights` already use model names.
    """

    def __init__(self, paths: Sequence[Path], skeleton: PreTrainedModel) -> None:
        self._paths = list(paths)
        self._rename = _checkpoint_key_renamer(skeleton)
        self._where: dict[str, tuple[Path, str]] = {}  # model name -> (file, name in the file)
        self._converted: set[str] = set()  # model names a checkpoint stores in another layout
        for path in self._paths:
            with safe_open(os.fspath(path), framework="pt") as handle:
                ours = "titanic_stage" in (handle.metadata() or {})
                for stored in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    name, converted = (stored, False) if ours else self._rename(stored)
                    if converted:
                        self._converted.add(name)
                    else:
                        self._where.setdefault(name, (path, stored))

    def read(self, wanted: Mapping[str, Sequence[str]]) -> dict[str, Tensor]:
        """Read ``{key: model names to try}``, opening each file once."""
        plan: dict[Path, list[tuple[str, str]]] = {}
        for key, names in wanted.items():
            name = next((n for n in names if n in self._where), None)
            if name is None:
                if any(n in self._converted for n in names):
                    raise UnsupportedModelError(
                        f"the checkpoint stores {key!r} in a layout transformers converts while loading "
                        "(fused or split tensors); load the whole model and use split_model instead"
                    )
                raise ValueError(
                    f"tensor {key!r} is in none of {[str(p) for p in self._paths]}; pass the whole model's "
                    "safetensors files or the file save_stage_weights wrote for this stage"
                )
            path, stored = self._where[name]
            plan.setdefault(path, []).append((key, stored))
        tensors: dict[str, Tensor] = {}
        for path, items in plan.items():
            with safe_open(os.fspath(path), framework="pt", device="cpu") as handle:
                for key, stored in items:
                    tensors[key] = handle.get_tensor(stored)
        return tensors


def _checkpoint_key_renamer(skeleton: PreTrainedModel) -> Any:
    """``stored name -> (model name, needs a tensor conversion)``, as ``from_pretrained`` renames."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(skeleton)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = skeleton.base_model_prefix
    model_names = dict.fromkeys(skeleton.state_dict(), True)

    def rename(stored: str) -> tuple[str, bool]:
        name, pattern = rename_source_key(stored, renamings, converters, prefix, model_names)
        if name not in model_names and stored in model_names:
            name, pattern = rename_source_key(stored, [], [], prefix, model_names)
        return name, pattern is not None

    return rename


def _materialize(
    stage: StageModule, skeleton: PreTrainedModel, index: _TensorIndex, dtype: torch.dtype, device: torch.device
) -> None:
    """Replace the stage's meta tensors with real ones read from ``index``.

    Non-persistent buffers (rotary ``inv_freq``, ...) are not in checkpoints: they are
    recomputed by the model's own ``_init_weights``, as ``from_pretrained`` does.
    """
    wanted: dict[str, list[str]] = {}
    slots: list[tuple[nn.Module, str, str, bool]] = []  # (module, attribute, key, is_parameter)
    recompute: list[tuple[nn.Module, str, str]] = []
    for module_name, module in stage.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, param in module._parameters.items():
            if param is not None:
                full = prefix + name
                key = stage._canonical_names.get(full, full)
                wanted[key] = [key, full]
                slots.append((module, name, key, True))
        for name, buffer in module._buffers.items():
            if buffer is None:
                continue
            full = prefix + name
            if name in module._non_persistent_buffers_set:
                recompute.append((module, name, full))
            else:
                wanted[full] = [full]
                slots.append((module, name, full, False))
    loaded = index.read(wanted)
    made: dict[str, Tensor] = {}
    for module, name, key, is_parameter in slots:
        current = module._parameters[name] if is_parameter else module._buffers[name]
        assert current is not None
        if key not in made:
            tensor = loaded[key]
            if tuple(tensor.shape) != tuple(current.shape):
                raise ValueError(
                    f"tensor {key!r} has shape {tuple(tensor.shape)} in the file, the config expects "
                    f"{tuple(current.shape)}; the weights belong to another config"
                )
            target_dtype = dtype if tensor.is_floating_point() else tensor.dtype
            tensor = tensor.to(device=device, dtype=target_dtype)
            made[key] = nn.Parameter(tensor, requires_grad=current.requires_grad) if is_parameter else tensor
            # Tells the model's _init_weights (run below for buffers) to leave it alone.
            setattr(made[key], "_is_hf_initialized", True)  # noqa: B010
        if is_parameter:
            module._parameters[name] = made[key]  # type: ignore[assignment]
        else:
            module._buffers[name] = made[key]
    _recompute_buffers(skeleton, recompute, device)


def _recompute_buffers(
    skeleton: PreTrainedModel, buffers: Sequence[tuple[nn.Module, str, str]], device: torch.device
) -> None:
    for module, name, _full in buffers:
        meta = module._buffers[name]
        assert meta is not None
        module._buffers[name] = _sentinel(meta, device)
    for module in {id(m): m for m, _, _ in buffers}.values():
        skeleton._init_weights(module)
    for module, name, full in buffers:
        value = module._buffers[name]
        assert value is not None
        if _still_sentinel(value):
            raise UnsupportedModelError(
                f"cannot recompute the non-persistent buffer {full!r}: the model's _init_weights does not set it"
            )


def _sentinel(like: Tensor, device: torch.device) -> Tensor:
    """A tensor shaped like ``like`` that ``_init_weights`` must overwrite (NaN, or the lowest int)."""
    if like.is_floating_point():
        return torch.full(like.shape, float("nan"), dtype=like.dtype, device=device)
    if like.dtype == torch.bool:
        return torch.zeros(like.shape, dtype=torch.bool, device=device)
    return torch.full(like.shape, torch.iinfo(like.dtype).min, dtype=like.dtype, device=device)


def _still_sentinel(value: Tensor) -> bool:
    if value.numel() == 0:
        return False
    if value.is_floating_point():
        return bool(torch.isnan(value).any())
    if value.dtype == torch.bool:
        return False
    return bool((value == torch.iinfo(value.dtype).min).all())


# --------------------------------------------------------------------------- loss


def causal_lm_loss(logits: Tensor, labels: Tensor, num_items: int | Tensor | None = None) -> Tensor:
    """Next-token cross-entropy with the Hugging Face causal-LM semantics.

    ``logits`` (B, T, V) predict ``labels`` (B, T) shifted by one; labels of -100 are
    ignored. Without ``num_items`` the loss is the mean over valid tokens; with it, the
    sum divided by ``num_items``, so the losses of micro-batches given the whole batch's
    valid-token count add up to the whole batch's loss.
    """
    vocab = logits.shape[-1]
    # Shift by padding the labels: position t predicts labels[t + 1], the last predicts nothing.
    targets = F.pad(labels, (0, 1), value=-100)[..., 1:].to(logits.device)  # (B, T)
    reduction = "mean" if num_items is None else "sum"
    loss = F.cross_entropy(
        logits.float().reshape(-1, vocab), targets.reshape(-1), ignore_index=-100, reduction=reduction
    )
    if num_items is not None:
        if isinstance(num_items, Tensor):
            num_items = num_items.to(loss.device)
        loss = loss / num_items
    return loss
