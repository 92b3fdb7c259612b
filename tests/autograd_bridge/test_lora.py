"""LoRA on stages: split plus adapters trains exactly as the whole model plus the same adapters."""

from __future__ import annotations

import pytest
import torch

from autograd_bridge.lora import add_lora, is_adapter_name, load_lora_state, lora_state, lora_target_modules
from autograd_bridge.models import tiny_config
from autograd_bridge.partition import causal_lm_loss, even_stage_specs, split_model
from autograd_bridge.pipeline import Pipeline

from .bridge_helpers import memory_split
from .conftest import padded_batch

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize(("family", "attn"), [("llama", "sdpa"), ("gpt2", "sdpa"), ("bloom", "eager")])
def test_split_lora_matches_whole_lora_through_hosts(load_tiny, family, attn):
    """Loss and every adapter gradient of a 3-stage split with LoRA equal the whole model's (fp32)."""
    model = load_tiny(family, attn)
    split = memory_split(model, 3)  # copies the model before LoRA touches it
    try:
        torch.manual_seed(0)
        add_lora(model, r=4, alpha=8)
        start = lora_state(model)
        # lora_B starts at zero, which would hide a wrong lora_A: start both from noise.
        start = {name: torch.randn_like(value) * 0.1 for name, value in start.items()}
        load_lora_state(model, start)
        for stage in split.stages:
            add_lora(stage, r=4, alpha=8)
            load_lora_state(stage, start)
        batch = padded_batch(vocab_size=model.config.vocab_size, padding="right")

        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        want_loss = causal_lm_loss(logits, batch.labels)
        want_loss.backward()
        want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

        pipeline = Pipeline(split.chain(), split.runtime)
        result = pipeline.train_step(batch.input_ids, batch.attention_mask, batch.labels)
        got = {n: p.grad for s in split.stages for n, p in s.named_model_parameters() if p.grad is not None}
        pipeline.close()

        assert abs(result.loss - float(want_loss.detach())) < 1e-5
        assert set(got) == set(want) and all(is_adapter_name(n) for n in got)
        for name, grad in want.items():
            assert torch.allclose(got[name], grad, atol=1e-5, rtol=0), name
    finally:
        split.close()


def test_only_adapter_parameters_require_grad(load_tiny):
    """After add_lora, a stage's trainable parameters are exactly its adapters."""
    model = load_tiny("llama")
    stage = split_model(model, even_stage_specs(4, 2))[1]
    add_lora(stage, r=2, alpha=4)
    trainable = [n for n, p in stage.named_model_parameters() if p.requires_grad]
    assert trainable and all(is_adapter_name(n) for n in trainable)
    frozen = [n for n, p in stage.named_model_parameters() if not p.requires_grad]
    assert frozen and not any(is_adapter_name(n) for n in frozen)


def test_lora_state_round_trip(load_tiny):
    """Adapters read from one stage and loaded into a fresh copy of it come back equal."""
    specs = even_stage_specs(4, 2)
    source = split_model(load_tiny("llama"), specs)[0]
    target = split_model(load_tiny("llama"), specs)[0]
    add_lora(source, r=2, alpha=4)
    add_lora(target, r=2, alpha=4)
    state = {name: torch.randn_like(value) for name, value in lora_state(source).items()}
    load_lora_state(target, state)
    back = lora_state(target)
    assert set(back) == set(state)
    assert all(torch.equal(back[name], state[name]) for name in state)
    assert all(name.startswith("model.layers.") for name in state)


def test_loading_an_incomplete_state_is_refused(load_tiny):
    """A LoRA state missing one of the stage's adapters raises a ValueError naming it."""
    stage = split_model(load_tiny("llama"), even_stage_specs(4, 2))[1]
    add_lora(stage, r=2, alpha=4)
    state = lora_state(stage)
    missing = sorted(state)[0]
    del state[missing]
    with pytest.raises(ValueError, match="lacks"):
        load_lora_state(stage, state)


@pytest.mark.parametrize(
    ("family", "expected"),
    [("gpt2", ["c_attn"]), ("gpt_neox", ["query_key_value"]), ("llama", ["q_proj", "v_proj"]),
     ("phi3", ["qkv_proj"])],
)
def test_target_modules_per_family(family, expected):
    """The table names each family's attention projections."""
    assert lora_target_modules(tiny_config(family)) == expected


def test_target_fallback_finds_projections_in_the_modules(load_tiny):
    """An unlisted family gets the attention projections its modules actually hold."""
    model = load_tiny("opt")
    assert lora_target_modules(model.config, model) == ["q_proj", "v_proj"]
