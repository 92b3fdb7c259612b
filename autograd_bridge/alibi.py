"""ALiBi attention biases, built by each stage for its own blocks (BLOOM, MPT, Falcon).

ALiBi (Press et al., 2022, "Train Short, Test Long") adds no position embedding; each
attention head ``h`` adds ``slope_h * (key position)`` to its scores instead. Since a
softmax row is unchanged by a constant, a bias linear in the *key* position is the same
as the paper's ``-slope_h * (query - key)`` distance on every unmasked entry. The decoder
stacks of these families build that bias once and hand it to every block; a stage holding
only some of the blocks builds it itself here, from the same inputs the stack uses:

* **BLOOM** numbers the keys from the attention mask: the ``i``-th real token of a row has
  position ``i - 1`` and padding has position 0, so a left-padded row gets the same bias
  as the unpadded one. Without a mask the positions are ``0..T-1``. The bias has the
  hidden states' dtype and shape ``(B * H, 1, T)``.
* **MPT** ignores the mask: the bias is ``slope_h * (k - (T - 1))`` for key ``k``, i.e. the
  last ``T`` columns of a bias built for ``config.max_seq_len`` keys, with slopes spread
  over ``attn_config.alibi_bias_max``. It stays float32, shape ``(H, 1, T)``; the blocks
  take the causal mask as booleans (True where masked).
* **Falcon** with ``alibi=True`` numbers keys like BLOOM but rounds the slopes to bfloat16,
  hands the blocks the bias as ``(B, H, 1, T)``, and replaces the causal mask by the bias
  over ``sqrt(head_dim)`` with hidden keys at the dtype's lowest value (so eager blocks
  add the bias twice, once scaled, exactly as the whole model does). The mask must be
  materialized even where sdpa could skip it (:attr:`StageBias.needs_full_mask`).

Each family is one :class:`StageBias` subclass; :mod:`autograd_bridge.families` names
which family uses which, and :class:`~autograd_bridge.partition.StageModule` asks it for
the extra block inputs once per forward.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor
from transformers import PretrainedConfig

__all__ = [
    "BloomAlibi",
    "FalconAlibi",
    "MptAlibi",
    "StageBias",
    "bloom_alibi",
    "bloom_slopes",
    "mpt_alibi",
    "mpt_slopes",
]


# --------------------------------------------------------------------------- slopes


def _powers(ratio: float, first: int, last: int, step: int = 1) -> Tensor:
    """``ratio**first, ratio**(first + step), ...`` up to ``ratio**last``, float32."""
    exponents = torch.arange(first, last + 1, step, dtype=torch.int32)
    return torch.pow(torch.tensor(ratio, dtype=torch.float32), exponents)


def bloom_slopes(num_heads: int) -> Tensor:
    """The ALiBi slope of each of ``num_heads`` heads as BLOOM (and the paper) choose them, (H,).

    For a power of two ``n`` the slopes are the geometric sequence starting at and
    multiplied by ``2**(-8/n)``. Otherwise the ``m`` slopes of the largest power of two
    ``m < n`` are followed by every other slope of ``2m`` heads (the ones not already
    among the first ``m``), as many as are missing.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    base_heads = 2 ** math.floor(math.log2(num_heads))
    slopes = _powers(2.0 ** (-8.0 / base_heads), 1, base_heads)
    if base_heads == num_heads:
        return slopes
    # The odd powers of 2m heads' ratio: the slopes of 2m heads that m heads lack.
    missing = num_heads - base_heads
    between = _powers(2.0 ** (-8.0 / (2 * base_heads)), 1, 2 * missing - 1, step=2)
    return torch.cat([slopes, between])


def mpt_slopes(num_heads: int, bias_max: float) -> Tensor:
    """The ALiBi slope of each of ``num_heads`` heads as MPT chooses them, float32 (H,).

    For the power of two ``n >= num_heads`` the slopes are ``2**(-j * bias_max / n)``,
    ``j = 1..n``; with fewer heads, the even ``j`` come first, then the odd ones, cut to
    ``num_heads``.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    padded_heads = 2 ** math.ceil(math.log2(num_heads))
    exponents = torch.arange(1, padded_heads + 1, dtype=torch.float32) * (bias_max / padded_heads)
    slopes = 1.0 / torch.pow(2.0, exponents)
    if padded_heads != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[0::2]])[:num_heads]
    return slopes


# --------------------------------------------------------------------------- biases


def bloom_alibi(
    attention_mask: Tensor | None,
    num_heads: int,
    *,
    batch_size: int,
    seq_len: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """BLOOM's bias, ``(B * H, 1, T)`` in ``dtype``: slope times key position from the mask.

    ``attention_mask`` (B, T) holds 1 for tokens and 0 for padding; ``None`` means no padding.
    """
    slopes = bloom_slopes(num_heads).to(device)  # (H,)
    if attention_mask is None:
        positions = torch.arange(seq_len, device=device).expand(batch_size, seq_len)  # (B, T)
    else:
        mask = attention_mask.to(device)
        positions = (mask.cumsum(dim=-1) - 1) * mask  # (B, T): 0, 1, 2... over real tokens, 0 on padding
    bias = slopes[None, :, None] * positions[:, None, :]  # (B, H, T), float32
    return bias.reshape(-1, 1, positions.shape[-1]).to(dtype)


def mpt_alibi(
    num_heads: int, seq_len: int, *, bias_max: float, max_seq_len: int, device: torch.device
) -> Tensor:
    """MPT's bias for ``seq_len`` keys, ``(H, 1, T)`` float32: slope times ``k - (T - 1)``.

    Raises ``ValueError`` for sequences longer than ``max_seq_len``: the whole model
    cannot run them either.
    """
    if seq_len > max_seq_len:
        raise ValueError(
            f"a sequence of {seq_len} tokens is longer than this MPT model's max_seq_len ({max_seq_len}); "
            "cut the batch to at most max_seq_len tokens"
        )
    slopes = mpt_slopes(num_heads, bias_max).to(device)  # (H,)
    offsets = torch.arange(1 - seq_len, 1, dtype=torch.int32, device=device)  # (T,): -(T-1)..0
    return slopes[:, None, None] * offsets[None, None, :]


# --------------------------------------------------------------------------- per family


class StageBias:
    """Builds the attention inputs a family's blocks take besides the stage's causal mask.

    Subclasses name the block arguments they supply in :attr:`argument_names` and return
    them, plus the ``attention_mask`` in the form the family's blocks expect, from
    :meth:`block_inputs`.
    """

    argument_names: ClassVar[frozenset[str]] = frozenset()
    needs_full_mask: ClassVar[bool] = False
    """True when the causal mask must be built as a tensor even where attention could skip it."""

    def block_inputs(self, hidden: Tensor, attention_mask: Tensor | None, causal_mask: Any) -> dict[str, Any]:
        """Inputs for every block of the stage.

        ``hidden`` (B, T, C) is the stage's input (for shape, dtype and device),
        ``attention_mask`` (B, T) the 2D padding mask (or ``None``), ``causal_mask`` what
        ``transformers.masking_utils`` built from it for the stage's blocks.
        """
        raise NotImplementedError


class BloomAlibi(StageBias):
    """BLOOM: ``alibi`` from the padding mask; the additive causal mask unchanged."""

    argument_names = frozenset({"alibi"})

    def __init__(self, config: PretrainedConfig) -> None:
        self.num_heads = int(config.n_head)

    def block_inputs(self, hidden: Tensor, attention_mask: Tensor | None, causal_mask: Any) -> dict[str, Any]:
        batch_size, seq_len = hidden.shape[:2]
        alibi = bloom_alibi(
            attention_mask,
            self.num_heads,
            batch_size=batch_size,
            seq_len=seq_len,
            dtype=hidden.dtype,
            device=hidden.device,
        )
        return {"alibi": alibi, "attention_mask": causal_mask}


class MptAlibi(StageBias):
    """MPT: ``position_bias`` from the sequence length; the causal mask as booleans."""

    argument_names = frozenset({"position_bias"})

    def __init__(self, config: PretrainedConfig) -> None:
        self.num_heads = int(config.n_heads)
        self.max_seq_len = int(config.max_seq_len)
        self.bias_max = float(config.attn_config.alibi_bias_max)

    def block_inputs(self, hidden: Tensor, attention_mask: Tensor | None, causal_mask: Any) -> dict[str, Any]:
        if not isinstance(causal_mask, Tensor):
            raise ValueError(
                "MPT blocks need the causal mask as a tensor; load the model with attn_implementation='eager'"
            )
        bias = mpt_alibi(
            self.num_heads,
            hidden.shape[1],
            bias_max=self.bias_max,
            max_seq_len=self.max_seq_len,
            device=hidden.device,
        )
        # True where a key is hidden from a query: MPT's blocks masked_fill there.
        return {"position_bias": bias, "attention_mask": causal_mask.to(torch.bool)}


class FalconAlibi(StageBias):
    """Falcon with ``alibi=True``: ``alibi`` (B, H, 1, T) from the mask with bfloat16 slopes,
    and the attention mask replaced by that bias over ``sqrt(head_dim)``, masked where the
    causal mask hides a key. The causal mask must be materialized (4D) even without padding.
    """

    argument_names = frozenset({"alibi"})
    needs_full_mask = True

    def __init__(self, config: PretrainedConfig) -> None:
        self.num_heads = int(config.num_attention_heads)
        self.head_dim = int(config.hidden_size) // self.num_heads

    def block_inputs(self, hidden: Tensor, attention_mask: Tensor | None, causal_mask: Any) -> dict[str, Any]:
        batch_size, seq_len = hidden.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long, device=hidden.device)
        mask = attention_mask.to(hidden.device)
        positions = ((mask.cumsum(dim=-1) - 1) * mask)[:, None, :]  # (B, 1, T)
        # Falcon rounds its slopes to bfloat16 before scaling them, whatever the model's dtype.
        slopes = bloom_slopes(self.num_heads).to(device=hidden.device, dtype=torch.bfloat16)
        alibi = (slopes[:, None] * positions).to(hidden.dtype)[:, :, None, :]  # (B, H, 1, T)
        if not isinstance(causal_mask, Tensor) or causal_mask.dim() != 4:
            raise ValueError(
                "Falcon's ALiBi needs a 4D causal mask; load the model with eager or sdpa attention"
            )
        lowest = torch.finfo(hidden.dtype).min
        if causal_mask.dtype == torch.bool:  # sdpa's mask: True where a key is visible
            causal_mask = torch.where(
                causal_mask, torch.zeros((), dtype=hidden.dtype, device=hidden.device), lowest
            )
        biased_mask = torch.masked_fill(
            alibi / math.sqrt(self.head_dim), causal_mask < -1, lowest
        )  # (B, H, T, T)
        return {"alibi": alibi, "attention_mask": biased_mask}
