"""What each piece and each partition of a causal LM costs: parameters, bytes, FLOPs, memory.

Numbers are measured, not guessed: every piece (the embedding, each decoder block, the
head) is built as a :class:`~autograd_bridge.partition.StageModule` on the meta device
(no memory, no arithmetic) and run once on a ``(1, seq_len)`` batch under
``torch.utils.flop_counter.FlopCounterMode`` (forward FLOPs) and
``torch.autograd.graph.saved_tensors_hooks`` (the activations autograd keeps for the
backward pass). Attention is profiled in its eager form, whose matmuls the counter sees.

Runs are in float32; byte counts of floating tensors are scaled to ``dtype_bytes``.
The head's numbers include the loss (its log-softmax is kept for backward). A tied head
weight is counted once, in the embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from autograd_bridge.partition import (
    ModelLayout,
    StageModule,
    StageSpec,
    causal_lm_loss,
    find_layout,
)

__all__ = ["ModelProfile", "PartitionProfile", "PieceProfile", "profile_model", "profile_partitions"]

#: Bytes of weights, gradients and the two Adam moments, per byte of weights.
_TRAIN_STATE_FACTOR = 4
#: Forward + backward FLOPs per forward FLOP (backward computes two matmuls per forward one).
_TRAIN_FLOPS_FACTOR = 3.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PieceProfile:
    """The cost of one piece of the model."""

    name: str
    """``"embedding"``, ``"block.3"`` or ``"head"`` (the head includes the final norm)."""
    num_params: int
    """Trainable parameters (a tied head weight is counted in the embedding only)."""
    weight_bytes: int
    """``num_params * dtype_bytes``."""
    flops_per_token: float
    """Forward FLOPs per token at the profiled sequence length."""
    activation_bytes_per_token: int
    """Bytes per token of the tensor this piece outputs (hidden states, or logits for the head)."""
    saved_bytes_per_token: int
    """Activation memory autograd keeps for the backward pass, per token."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelProfile:
    """Per-piece costs of a whole model at one sequence length and precision."""

    model_name: str
    """A label: the name given, else ``config.name_or_path``, else ``config.model_type``."""
    num_layers: int
    """Number of decoder blocks."""
    hidden_size: int
    """Width of the hidden states crossing stage boundaries."""
    vocab_size: int
    """Size of the vocabulary (width of the logits)."""
    seq_len: int
    """Sequence length the FLOPs and activation sizes were measured at."""
    dtype_bytes: int
    """Bytes per parameter and per activation element (4 for float32, 2 for bfloat16)."""
    tied_embeddings: bool
    """True when the head reuses the input embedding weight."""
    embedding: PieceProfile
    """Everything before the first block."""
    blocks: tuple[PieceProfile, ...]
    """One entry per decoder block, in order."""
    head: PieceProfile
    """Final norm, output head, logit processing and loss."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionProfile:
    """The cost of one pipeline stage: its blocks plus the embedding (first) or head (last)."""

    stage: int
    """0-based stage number."""
    layer_start: int
    """First decoder block, inclusive."""
    layer_end: int
    """Last decoder block, exclusive."""
    num_params: int
    """Trainable parameters held by the stage."""
    weight_bytes: int
    """Bytes of those parameters."""
    flops_per_token: float
    """Forward FLOPs per token."""
    train_flops_per_token: float
    """Forward plus backward FLOPs per token (3x forward)."""
    activation_bytes_per_token: int
    """Bytes per token sent to the next stage (and of the gradient coming back); 0 for the
    last stage, whose logits stay with the data owner."""
    saved_bytes_per_token: int
    """Activation memory kept for the backward pass, per token."""

    def train_memory_bytes(self, tokens: int) -> int:
        """Memory to train this stage on ``tokens`` tokens at once (one micro-batch).

        Weights, gradients and two Adam moments (each ``weight_bytes``), plus the saved
        activations of ``tokens`` tokens.
        """
        return _TRAIN_STATE_FACTOR * self.weight_bytes + self.saved_bytes_per_token * tokens


# --------------------------------------------------------------------------- measuring


def profile_model(
    config_or_model: PretrainedConfig | PreTrainedModel,
    *,
    seq_len: int = 512,
    dtype_bytes: int = 4,
    name: str = "",
) -> ModelProfile:
    """Measure every piece of the model described by ``config_or_model``.

    Nothing is allocated: a model given here only contributes its config.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if dtype_bytes < 1:
        raise ValueError(f"dtype_bytes must be >= 1 (4 for float32, 2 for bfloat16), got {dtype_bytes}")
    config = config_or_model.config if isinstance(config_or_model, PreTrainedModel) else config_or_model
    config = config.__class__.from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    layout = find_layout(skeleton)
    n = layout.num_layers
    vocab_size = int(skeleton.get_output_embeddings().weight.shape[0])
    measure = _PieceMeter(skeleton, layout, seq_len=seq_len, dtype_bytes=dtype_bytes)
    embedding = measure("embedding", StageSpec(index=0, num_stages=2, layer_start=0, layer_end=0))
    hidden_size = measure.width
    blocks = tuple(
        measure(f"block.{i}", StageSpec(index=1, num_stages=3, layer_start=i, layer_end=i + 1)) for i in range(n)
    )
    head = measure("head", StageSpec(index=1, num_stages=2, layer_start=n, layer_end=n))
    label = name or str(getattr(config, "name_or_path", "") or "") or layout.model_type
    return ModelProfile(
        model_name=label,
        num_layers=n,
        hidden_size=hidden_size,
        vocab_size=vocab_size,
        seq_len=seq_len,
        dtype_bytes=dtype_bytes,
        tied_embeddings=layout.tied_embeddings,
        embedding=embedding,
        blocks=blocks,
        head=head,
    )


class _PieceMeter:
    """Runs one piece on meta tensors and records its parameters, FLOPs and saved tensors."""

    def __init__(self, skeleton: PreTrainedModel, layout: ModelLayout, *, seq_len: int, dtype_bytes: int) -> None:
        self._skeleton = skeleton
        self._layout = layout
        self._seq_len = seq_len
        self._dtype_bytes = dtype_bytes
        self.width = 0
        """Width of the hidden states, known once the embedding piece ran."""

    def __call__(self, name: str, spec: StageSpec) -> PieceProfile:
        stage = StageModule(self._skeleton, spec, self._layout).train()
        params = [p for _, p in stage.named_model_parameters()]
        num_params = sum(p.numel() for p in params)
        # Tensors sharing storage with any parameter of the stage (a tied head included)
        # are weights, not activations.
        weight_storages = {p.untyped_storage()._cdata for p in stage.parameters()}
        saved: dict[int, int] = {}

        def pack(tensor: Tensor) -> Tensor:
            storage = tensor.untyped_storage()
            if storage._cdata not in weight_storages:
                saved[storage._cdata] = self._scaled_bytes(storage.nbytes(), tensor)
            return tensor

        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
            FlopCounterMode(display=False) as counter,
        ):
            inputs = self._inputs(spec)
            # An explicit all-ones mask: without one the mask builders inspect position ids
            # for packed sequences, which needs real values.
            mask = torch.ones((1, self._seq_len), dtype=torch.long, device="meta")
            out = stage(inputs, attention_mask=mask)
            if spec.is_last:
                causal_lm_loss(out, torch.zeros(out.shape[:2], dtype=torch.long, device="meta"))
        if spec.is_first:
            self.width = int(out.shape[-1])
        tokens = self._seq_len
        return PieceProfile(
            name=name,
            num_params=num_params,
            weight_bytes=num_params * self._dtype_bytes,
            flops_per_token=counter.get_total_flops() / tokens,
            activation_bytes_per_token=round(self._scaled_bytes(out.numel() * out.element_size(), out) / tokens),
            saved_bytes_per_token=round(sum(saved.values()) / tokens),
        )

    def _inputs(self, spec: StageSpec) -> Tensor:
        shape = (1, self._seq_len)
        if spec.is_first:
            return torch.zeros(shape, dtype=torch.long, device="meta")  # (1, T) token ids
        # (1, T, C) hidden states; requires_grad so the piece saves what backward needs.
        return torch.zeros((*shape, self.width), dtype=torch.float32, device="meta", requires_grad=True)

    def _scaled_bytes(self, nbytes: int, like: Any) -> int:
        """Bytes at ``dtype_bytes`` per element for floating tensors, as measured otherwise."""
        if like.is_floating_point():
            return nbytes // like.element_size() * self._dtype_bytes
        return nbytes


# --------------------------------------------------------------------------- partitions


def profile_partitions(model: ModelProfile, specs: Sequence[StageSpec]) -> list[PartitionProfile]:
    """Add up the pieces of each stage in ``specs`` (which must cover every block once)."""
    expected = 0
    for position, spec in enumerate(specs):
        if spec.index != position or spec.num_stages != len(specs) or spec.layer_start != expected:
            raise ValueError(
                f"stage specs must be consecutive and cover every block; spec {position} is {spec}"
            )
        expected = spec.layer_end
    if not specs or expected != model.num_layers:
        raise ValueError(f"the stage specs cover {expected} blocks, the model has {model.num_layers}")
    profiles: list[PartitionProfile] = []
    for spec in specs:
        pieces = list(model.blocks[spec.layer_start : spec.layer_end])
        if spec.is_first:
            pieces.insert(0, model.embedding)
        if spec.is_last:
            pieces.append(model.head)
        flops = sum(piece.flops_per_token for piece in pieces)
        boundary = 0 if spec.is_last else pieces[-1].activation_bytes_per_token
        profiles.append(
            PartitionProfile(
                stage=spec.index,
                layer_start=spec.layer_start,
                layer_end=spec.layer_end,
                num_params=sum(piece.num_params for piece in pieces),
                weight_bytes=sum(piece.weight_bytes for piece in pieces),
                flops_per_token=flops,
                train_flops_per_token=_TRAIN_FLOPS_FACTOR * flops,
                activation_bytes_per_token=boundary,
                saved_bytes_per_token=sum(piece.saved_bytes_per_token for piece in pieces),
            )
        )
    return profiles
