"""ALiBi slopes and biases against the ones transformers' BLOOM and MPT stacks build."""

from __future__ import annotations

import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.falcon.modeling_falcon import build_alibi_tensor as build_falcon_alibi_tensor
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from autograd_bridge.alibi import FalconAlibi, MptAlibi, bloom_alibi, bloom_slopes, mpt_alibi, mpt_slopes
from autograd_bridge.frames import Frame, MessageKind
from autograd_bridge.host import StageHost
from autograd_bridge.models import tiny_config
from autograd_bridge.partition import even_stage_specs, split_model
from tests.autograd_bridge.conftest import TinyLoader

pytestmark = pytest.mark.usefixtures("single_thread")

HEAD_COUNTS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 32, 48, 71, 112)


def _left_and_right_padded_mask() -> torch.Tensor:
    return torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])  # (B=3, T=6)


@pytest.mark.parametrize("num_heads", HEAD_COUNTS)
def test_bloom_bias_equals_the_stacks(num_heads: int) -> None:
    """BLOOM's bias from a left- and right-padded mask is the stack's, number for number."""
    mask = _left_and_right_padded_mask()
    ours = bloom_alibi(
        mask, num_heads, batch_size=3, seq_len=6, dtype=torch.float32, device=torch.device("cpu")
    )
    assert torch.equal(ours, build_alibi_tensor(mask, num_heads, torch.float32))


def test_bloom_bias_without_a_mask_numbers_keys_from_zero() -> None:
    """Without a mask every row gets the bias of an all-ones mask, in the hidden states' dtype."""
    ours = bloom_alibi(None, 6, batch_size=2, seq_len=5, dtype=torch.bfloat16, device=torch.device("cpu"))
    expected = build_alibi_tensor(torch.ones(2, 5, dtype=torch.long), 6, torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("num_heads", HEAD_COUNTS)
def test_mpt_bias_equals_the_last_columns_of_the_stacks(num_heads: int) -> None:
    """MPT's bias for T keys is the last T columns of the stack's max_seq_len bias."""
    whole = build_mpt_alibi_tensor(num_heads, 64, alibi_bias_max=8)  # (H, 1, 64)
    ours = mpt_alibi(num_heads, 10, bias_max=8, max_seq_len=64, device=torch.device("cpu"))
    assert ours.dtype == torch.float32
    assert torch.equal(ours, whole[:, :, -10:])


@pytest.mark.parametrize("num_heads", (4, 6, 71))
def test_falcon_bias_equals_the_stacks(num_heads: int) -> None:
    """Falcon's bias (bfloat16 slopes) is the stack's, and the mask becomes bias / sqrt(head_dim)."""
    config = tiny_config("falcon", alibi=True, hidden_size=8 * num_heads, num_attention_heads=num_heads)
    mask = _left_and_right_padded_mask()
    causal = torch.zeros(3, 1, 6, 6)
    causal[..., 0, 1:] = torch.finfo(torch.float32).min  # the first query sees only the first key
    inputs = FalconAlibi(config).block_inputs(torch.zeros(3, 6, 8 * num_heads), mask, causal)
    expected = build_falcon_alibi_tensor(mask, num_heads, torch.float32).reshape(3, num_heads, 1, 6)
    assert torch.equal(inputs["alibi"], expected)
    biased = inputs["attention_mask"]  # (B, H, T, T)
    assert biased.shape == (3, num_heads, 6, 6)
    assert torch.equal(biased[:, :, 1:], (expected / 8**0.5).expand(3, num_heads, 5, 6))
    assert bool((biased[:, :, 0, 1:] == torch.finfo(torch.float32).min).all())


def test_slopes_follow_the_alibi_paper() -> None:
    """Eight heads: BLOOM's slopes are 1/2, 1/4, ..., 1/256; MPT's with bias_max 8 are the same."""
    expected = torch.tensor([2.0**-i for i in range(1, 9)])
    assert torch.equal(bloom_slopes(8), expected)
    assert torch.equal(mpt_slopes(8, 8), expected)


def test_mpt_refuses_sequences_longer_than_max_seq_len() -> None:
    """A stage asked for more keys than MPT's max_seq_len says so instead of failing on shapes."""
    bias = MptAlibi(tiny_config("mpt", max_seq_len=8))
    hidden = torch.zeros(1, 9, 64)
    with pytest.raises(ValueError, match="max_seq_len"):
        bias.block_inputs(hidden, None, torch.zeros(1, 1, 9, 9))


@pytest.mark.parametrize("bad", [0, -3])
def test_slopes_need_a_head(bad: int) -> None:
    """A head count below one is a ValueError."""
    with pytest.raises(ValueError, match="num_heads"):
        bloom_slopes(bad)
    with pytest.raises(ValueError, match="num_heads"):
        mpt_slopes(bad, 8)


async def test_a_host_answers_an_overlong_mpt_sequence_with_an_error_and_keeps_serving(
    load_tiny: TinyLoader,
) -> None:
    """A peer's sequence longer than max_seq_len gets an error frame naming it; the next request works."""
    model = load_tiny("mpt", "eager", max_seq_len=8)
    host = StageHost({1: split_model(model, even_stage_specs(4, 3))[1]}, run_id="r")
    try:
        refused = await host.handle(
            Frame(kind=MessageKind.FORWARD, run_id="r", stage=1, tensors={"x": torch.randn(1, 9, 64)})
        )
        assert refused.kind == MessageKind.ERROR and "max_seq_len" in refused.error_message
        served = await host.handle(
            Frame(kind=MessageKind.FORWARD, run_id="r", stage=1, tensors={"x": torch.randn(1, 8, 64)})
        )
        assert served.kind == MessageKind.FORWARD_RESULT and served.tensors["y"].shape == (1, 8, 64)
    finally:
        host.close()
