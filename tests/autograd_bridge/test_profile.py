"""Piece and partition profiles against the real models they describe."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from autograd_bridge.models import tiny_config
from autograd_bridge.partition import even_stage_specs, stage_specs_from_counts
from autograd_bridge.profile import ModelProfile, profile_model, profile_partitions

SEQ_LEN = 32

pytestmark = pytest.mark.usefixtures("single_thread")


def all_pieces(profile: ModelProfile) -> list:
    return [profile.embedding, *profile.blocks, profile.head]


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt", "gemma3", "bloom", "mpt"])
def test_param_counts_add_up_to_the_model(family: str) -> None:
    """Pieces' parameters add up to the model's, a tied head weight counted once."""
    config = tiny_config(family)
    model = AutoModelForCausalLM.from_config(config)
    profile = profile_model(config, seq_len=SEQ_LEN)
    assert sum(piece.num_params for piece in all_pieces(profile)) == sum(p.numel() for p in model.parameters())
    assert profile.tied_embeddings == config.tie_word_embeddings


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt", "bloom", "mpt"])
def test_flops_match_flop_counter_on_the_whole_model(family: str) -> None:
    """Pieces' forward FLOPs add up to what FlopCounterMode counts on the real whole model."""
    config = tiny_config(family)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(3, 256, (1, SEQ_LEN)))
    profile = profile_model(config, seq_len=SEQ_LEN)
    total = sum(piece.flops_per_token for piece in all_pieces(profile)) * SEQ_LEN
    assert total == counter.get_total_flops()


def test_block_flops_match_the_analytic_count() -> None:
    """A Llama block costs 2 FLOPs per weight of its linears plus 4*T*C for attention, per token."""
    config = tiny_config("llama")
    model = AutoModelForCausalLM.from_config(config)
    block = model.model.layers[0]
    linear_weights = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    heads_width = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    expected = 2 * linear_weights + 4 * SEQ_LEN * heads_width
    assert profile_model(config, seq_len=SEQ_LEN).blocks[0].flops_per_token == expected


def test_bytes_follow_dtype_bytes() -> None:
    """Weight and activation bytes scale with dtype_bytes; a block outputs hidden*dtype_bytes per token."""
    config = tiny_config("llama")
    full = profile_model(config, seq_len=SEQ_LEN, dtype_bytes=4)
    half = profile_model(config, seq_len=SEQ_LEN, dtype_bytes=2)
    for a, b in zip(all_pieces(full), all_pieces(half), strict=True):
        assert a.weight_bytes == a.num_params * 4 and b.weight_bytes == b.num_params * 2
    assert full.blocks[0].activation_bytes_per_token == config.hidden_size * 4
    assert half.blocks[0].activation_bytes_per_token == config.hidden_size * 2
    assert full.head.activation_bytes_per_token == config.vocab_size * 4
    assert half.blocks[0].saved_bytes_per_token * 2 == full.blocks[0].saved_bytes_per_token


def test_hidden_size_is_the_width_crossing_stages() -> None:
    """OPT's narrower embeddings (project_in) do not change the width of what crosses a boundary."""
    profile = profile_model(tiny_config("opt"), seq_len=SEQ_LEN)
    assert profile.hidden_size == 64
    assert profile.embedding.activation_bytes_per_token == 64 * 4


def test_saved_activations_grow_with_sequence_length() -> None:
    """Eager attention keeps T*T probabilities, so a block's saved bytes per token grow with T."""
    config = tiny_config("llama")
    short = profile_model(config, seq_len=16).blocks[0]
    long = profile_model(config, seq_len=64).blocks[0]
    assert long.saved_bytes_per_token > short.saved_bytes_per_token > config.hidden_size * 4


def test_profile_of_a_model_equals_profile_of_its_config() -> None:
    """Profiling a model instance profiles its config."""
    config = tiny_config("gpt2")
    model = AutoModelForCausalLM.from_config(config)
    assert profile_model(model, seq_len=SEQ_LEN, name="x") == profile_model(config, seq_len=SEQ_LEN, name="x")


def test_partitions_add_up_their_pieces() -> None:
    """A partition sums its blocks, plus the embedding on the first and the head on the last."""
    model = profile_model(tiny_config("llama", num_hidden_layers=6), seq_len=SEQ_LEN)
    parts = profile_partitions(model, stage_specs_from_counts([1, 3, 2]))
    assert [p.num_params for p in parts] == [
        model.embedding.num_params + model.blocks[0].num_params,
        sum(b.num_params for b in model.blocks[1:4]),
        sum(b.num_params for b in model.blocks[4:6]) + model.head.num_params,
    ]
    assert sum(p.flops_per_token for p in parts) == pytest.approx(sum(x.flops_per_token for x in all_pieces(model)))
    assert all(p.train_flops_per_token == pytest.approx(3 * p.flops_per_token) for p in parts)
    assert [p.activation_bytes_per_token for p in parts] == [model.hidden_size * 4, model.hidden_size * 4, 0]


def test_train_memory_counts_states_and_activations() -> None:
    """Training memory is weights, grads and two Adam moments, plus saved activations per token."""
    model = profile_model(tiny_config("llama"), seq_len=SEQ_LEN)
    part = profile_partitions(model, even_stage_specs(4, 2))[0]
    assert part.train_memory_bytes(0) == 4 * part.weight_bytes
    assert part.train_memory_bytes(100) - part.train_memory_bytes(0) == 100 * part.saved_bytes_per_token


def test_partitions_must_cover_the_model() -> None:
    """Specs missing blocks are refused."""
    model = profile_model(tiny_config("llama"), seq_len=SEQ_LEN)
    with pytest.raises(ValueError, match="cover"):
        profile_partitions(model, stage_specs_from_counts([1, 2]))


def test_bad_profile_arguments_are_value_errors() -> None:
    """A non-positive sequence length or dtype size is a ValueError."""
    with pytest.raises(ValueError, match="seq_len"):
        profile_model(tiny_config("llama"), seq_len=0)
    with pytest.raises(ValueError, match="dtype_bytes"):
        profile_model(tiny_config("llama"), dtype_bytes=0)
