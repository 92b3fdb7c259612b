"""The seams in autograd_bridge: finetune modes, update codecs, training methods, the optimizer registry."""

from __future__ import annotations

import pytest
import torch

from autograd_bridge.codecs import CODECS, get_codec
from autograd_bridge.finetune import FINETUNES, FinetuneSettings, get_finetune
from autograd_bridge.methods import METHODS, get_method
from autograd_bridge.optim import OPTIMIZERS, build_optimizer
from autograd_bridge.partition import even_stage_specs, split_model
from autograd_bridge.pipeline import Pipeline

from .bridge_helpers import memory_split
from .conftest import padded_batch

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize(
    ("get", "registry", "what"),
    [(get_finetune, FINETUNES, "finetune mode"), (get_codec, CODECS, "codec"), (get_method, METHODS, "training method")],
)
def test_unknown_members_are_named_with_the_known_ones(get, registry, what) -> None:
    """Asking a registry for a name it lacks is a ValueError that lists what it has."""
    with pytest.raises(ValueError, match=rf"{what} must be one of {', '.join(sorted(registry))}"):
        get("no-such-member")


def test_every_registered_member_answers_to_its_name() -> None:
    """Each registry's keys are the members' own names, so a run file's name finds the member."""
    for get, registry in ((get_finetune, FINETUNES), (get_codec, CODECS), (get_method, METHODS)):
        assert all(get(name).name == name for name in registry)


def test_the_optimizer_registry_builds_what_it_names() -> None:
    """adamw and sgd with no weight decay unless asked; unknown names are refused."""
    params = [torch.nn.Parameter(torch.ones(2))]
    assert set(OPTIMIZERS) == {"adamw", "sgd"}
    adamw = build_optimizer("adamw", params, lr=0.1)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.0
    assert isinstance(build_optimizer("sgd", params, lr=0.1, weight_decay=0.5), torch.optim.SGD)
    with pytest.raises(ValueError, match="'adamw' or 'sgd'"):
        build_optimizer("lion", params, lr=0.1)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_finetune_mode_moves_what_it_trains_from_one_copy_to_another(load_tiny, mode) -> None:
    """trained_tensors of a trained copy, through the dense codec, load into a fresh copy and make it equal."""
    finetune, codec = get_finetune(mode), get_codec("dense")
    settings = FinetuneSettings(lora_r=2, lora_alpha=4, seed=1)
    copies = [split_model(load_tiny("llama"), even_stage_specs(4, 2))[1] for _ in range(2)]
    for copy in copies:
        finetune.prepare({1: copy}, settings)
    with torch.no_grad():  # "train" the first copy: change everything it trains
        for _, p in copies[0].named_model_parameters():
            if p.requires_grad:
                p.add_(0.5)
    sent = finetune.trained_tensors(copies[0])
    assert sent and all(finetune.travels(name) for name in sent)
    data = codec.encode(sent)
    finetune.load_tensors(copies[1], codec.decode(data))
    assert all(torch.equal(t, finetune.trained_tensors(copies[1])[n]) for n, t in sent.items())
    frozen = [n for n, p in copies[1].named_model_parameters() if not p.requires_grad]
    assert (mode == "lora") == bool(frozen)  # LoRA freezes the base weights; full trains everything


def test_lora_adapters_start_equal_whatever_the_cut(load_tiny) -> None:
    """Drawn from the seed and each tensor's name: 3 stages, 2 stages and the whole model start equal.

    So a round replayed on a new plan with other cuts starts where the first try did; the
    seed and the name decide, and every adapter draws its own numbers.
    """
    finetune = get_finetune("lora")
    settings = FinetuneSettings(lora_r=2, lora_alpha=4, seed=7)
    adapters = []
    for stages in (4, 3, 2, 1):
        split = split_model(load_tiny("llama"), even_stage_specs(4, stages))
        finetune.prepare(dict(enumerate(split)), settings)
        adapters.append({n: t for stage in split for n, t in finetune.trained_tensors(stage).items()})
    names = sorted(adapters[0])
    assert len(names) == 16 and all(sorted(a) == names for a in adapters)  # 4 blocks x q, v x A, B
    for other in adapters[1:]:
        assert all(torch.equal(adapters[0][n], other[n]) for n in names)
    drawn = [adapters[0][n] for n in names if ".lora_A." in n]
    assert all(t.abs().sum() > 0 for t in drawn) and not torch.equal(drawn[0], drawn[1])
    assert all(not adapters[0][n].any() for n in names if ".lora_B." in n)
    reseeded = split_model(load_tiny("llama"), even_stage_specs(4, 1))
    finetune.prepare({0: reseeded[0]}, FinetuneSettings(lora_r=2, lora_alpha=4, seed=8))
    assert not torch.equal(finetune.trained_tensors(reseeded[0])[names[0]], adapters[0][names[0]])


def test_lora_refuses_a_zero_rank() -> None:
    """A rank below 1 is a clear error before any stage is touched."""
    with pytest.raises(ValueError, match="lora_r >= 1"):
        get_finetune("lora").check(FinetuneSettings(lora_r=0))


def test_full_load_refuses_a_missing_tensor(load_tiny) -> None:
    """A merged partition that lacks a tensor is refused by name."""
    stage = split_model(load_tiny("llama"), even_stage_specs(4, 2))[1]
    tensors = get_finetune("full").trained_tensors(stage)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    with pytest.raises(ValueError, match=dropped):
        get_finetune("full").load_tensors(stage, tensors)


def test_the_dense_codec_refuses_bytes_that_are_not_its_own() -> None:
    """Garbage is a ValueError, never an unpickling."""
    with pytest.raises(ValueError, match="not a dense"):
        get_codec("dense").decode(b"\x00\x01 not safetensors")


def test_backprop_is_the_pipeline_step_and_counts_bridge_bytes(load_tiny) -> None:
    """The backprop method's step gives the pipeline's loss and tokens; StageClients count frame bytes both ways."""
    model = load_tiny("llama")
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="right")
    split = memory_split(model, 3)
    try:
        pipeline = Pipeline(split.chain(), split.runtime)
        client = split.clients[1]
        before = (client.bytes_sent, client.bytes_received)
        outcome = get_method("backprop").step(pipeline, batch, None, lr=0.0)
        # Activations (B, T, C) go out and their gradient comes back: at least one fp32 tensor each way.
        hidden = batch.input_ids.numel() * model.config.hidden_size * 4
        assert client.bytes_sent - before[0] >= 2 * hidden and client.bytes_received - before[1] >= 2 * hidden
        pipeline.close()
    finally:
        split.close()
    other = memory_split(model, 3)
    try:
        reference = Pipeline(other.chain(), other.runtime)
        want = reference.train_step(batch.input_ids, batch.attention_mask, batch.labels)
        reference.close()
    finally:
        other.close()
    assert abs(outcome.loss - want.loss) < 1e-6 and outcome.tokens == want.tokens


@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_clipping_across_hosts_equals_clipping_the_whole_model(load_tiny, max_norm) -> None:
    """Joint clipping over local and hosted stages gives the weights of clip_grad_norm_ on the whole model (SGD)."""
    from autograd_bridge.host import HostSettings
    from autograd_bridge.partition import causal_lm_loss

    model = load_tiny("llama")
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="right")
    whole = type(model)(model.config)
    whole.load_state_dict(model.state_dict())
    split = memory_split(model, 3, host_settings=HostSettings(optimizer="sgd", lr=0.1))
    try:
        pipeline = Pipeline(split.chain(), split.runtime)
        local = [p for s in (split.stages[0], split.stages[2]) for p in s.parameters()]
        optimizer = build_optimizer("sgd", list({id(p): p for p in local}.values()), lr=0.1)
        outcome = get_method("backprop").step(pipeline, batch, optimizer, lr=0.1, clip_norm=max_norm)
        pipeline.close()
        got = {n: p.detach().clone() for s in split.stages for n, p in s.named_model_parameters()}
    finally:
        split.close()
    loss = causal_lm_loss(whole(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels)
    loss.backward()
    want_norm = float(torch.nn.utils.clip_grad_norm_(whole.parameters(), max_norm))
    torch.optim.SGD(whole.parameters(), lr=0.1).step()
    assert outcome.grad_norm is not None and abs(outcome.grad_norm - want_norm) < 1e-5 * max(1.0, want_norm)
    assert outcome.output_norm > 0
    for name, p in whole.named_parameters():
        assert torch.allclose(got[name], p.detach(), atol=1e-6, rtol=0), name


def test_learning_rate_schedules_continue_across_rounds() -> None:
    """Warm-up, then constant or cosine decay to the floor, by the step index of the whole run."""
    from autograd_bridge.optim import lr_at

    assert [lr_at("constant", s, lr=1.0, warmup_steps=4) for s in (0, 1, 3, 4, 100)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    cosine = [lr_at("cosine", s, lr=1.0, warmup_steps=2, total_steps=12, min_lr=0.1) for s in (0, 1, 2, 7, 12, 20)]
    # after warm-up: 0.1 + 0.9 * (1 + cos(pi * (s - 2) / 10)) / 2
    assert cosine == pytest.approx([0.5, 1.0, 1.0, 0.55, 0.1, 0.1])
    with pytest.raises(ValueError, match="schedule must be one of constant, cosine"):
        lr_at("linear", 0, lr=1.0)


@pytest.mark.parametrize("scale", ["2", "-0.5", "nan", "x"])
def test_a_host_refuses_a_gradient_scale_that_is_not_a_clip(load_tiny, scale) -> None:
    """grad_scale outside [0, 1] (or not a number) is a BAD_REQUEST, and the host keeps serving."""
    from autograd_bridge.errors import RemoteStageError
    from autograd_bridge.frames import MessageKind

    split = memory_split(load_tiny("llama"), 3)
    try:
        client = split.clients[1]
        with pytest.raises(RemoteStageError) as caught:
            split.runtime.run(client.request(MessageKind.OPTIMIZER_STEP, options={"grad_scale": scale}))
        assert caught.value.code == "BAD_REQUEST" and "grad_scale" in str(caught.value)
        assert split.runtime.run(client.grad_sq_norm(0)) == 0.0  # no gradients yet, and still answering
    finally:
        split.close()


def test_a_finetune_mode_says_how_its_checkpoints_are_exported(load_tiny) -> None:
    """full: whole models (no adapter config); lora: a PEFT LoraConfig over the base model with the run's settings."""
    config = load_tiny("llama").config
    settings = FinetuneSettings(lora_r=4, lora_alpha=8)
    assert get_finetune("full").export_config(config, settings, "base") is None
    lora = get_finetune("lora").export_config(config, settings, "base")
    assert (lora.r, lora.lora_alpha, lora.base_model_name_or_path) == (4, 8, "base")
    assert set(lora.target_modules) == {"q_proj", "v_proj"}
    chosen = get_finetune("lora").export_config(config, FinetuneSettings(lora_targets=("k_proj",)), "base")
    assert set(chosen.target_modules) == {"k_proj"}
