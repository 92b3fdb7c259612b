"""Heads mode (SMHA): which heads train, that nothing else moves, and that a split trains as the whole model."""

from __future__ import annotations

import pytest
import torch

from autograd_bridge.errors import UnsupportedModelError
from autograd_bridge.finetune import FinetuneSettings, get_finetune
from autograd_bridge.finetune.head_layout import (
    block_heads,
    head_redundancy,
    head_scores,
    random_heads,
    redundancy_fraction,
    top_heads,
)
from autograd_bridge.host import HostSettings
from autograd_bridge.partition import causal_lm_loss, even_stage_specs, split_model
from autograd_bridge.pipeline import Pipeline

from .bridge_helpers import memory_split
from .conftest import padded_batch

pytestmark = pytest.mark.usefixtures("single_thread")


def whole_stage(model):
    """The whole model as one stage (first and last), on its own copy of the weights."""
    copy = type(model)(model.config)
    copy.load_state_dict(model.state_dict())
    return split_model(copy, even_stage_specs(int(model.config.num_hidden_layers), 1))[0]


def settings(**kw) -> FinetuneSettings:
    return FinetuneSettings(
        **{"head_fraction": 0.25, "lora_r": 2, "lora_alpha": 4, "seed": 3, "head_key": "o1", **kw}
    )


def test_random_heads_are_seeded_and_sized():
    """The draw depends only on (seed, round, key, layer), takes ceil(fraction * H) heads, and varies with each."""
    draw = dict(seed=1, round=2, key="owner-a", layer=3)
    assert random_heads(12, 0.25, **draw) == random_heads(12, 0.25, **draw)
    assert len(random_heads(12, 0.25, **draw)) == 3
    assert len(random_heads(9, 0.25, **draw)) == 3  # ceil(2.25)
    assert len(random_heads(4, 0.01, **draw)) == 1  # at least one
    assert random_heads(6, 1.0, **draw) == tuple(range(6))
    others = [dict(draw, seed=2), dict(draw, round=3), dict(draw, key="owner-b"), dict(draw, layer=4)]
    assert all(random_heads(64, 0.25, **o) != random_heads(64, 0.25, **draw) for o in others)


def test_grouped_query_attention_trains_a_key_value_head_when_any_of_its_queries_does(load_tiny):
    """Llama with 4 query and 2 key/value heads: query heads 0, 1 read kv head 0, heads 2, 3 kv head 1."""
    stage = whole_stage(load_tiny("llama"))
    block = block_heads(stage)[0]
    prefix = "model.layers.0.self_attn"
    assert block.blocks([1]) == {
        f"{prefix}.q_proj.weight": {1}, f"{prefix}.k_proj.weight": {0},
        f"{prefix}.v_proj.weight": {0}, f"{prefix}.o_proj.weight": {1},
    }  # fmt: skip
    assert block.blocks([1, 2])[f"{prefix}.k_proj.weight"] == {0, 1}
    assert block.blocks([0, 1])[f"{prefix}.v_proj.weight"] == {0}


def test_gpt2_fused_attention_slices(load_tiny):
    """GPT-2's c_attn holds queries, keys and values side by side: head h is slices h, H + h and 2H + h."""
    block = block_heads(whole_stage(load_tiny("gpt2")))[1]
    got = block.blocks([2])
    assert got["transformer.h.1.attn.c_attn.weight"] == {2, 6, 10}
    assert got["transformer.h.1.attn.c_attn.bias"] == {2, 6, 10}
    assert got["transformer.h.1.attn.c_proj.weight"] == {2}


def test_other_attention_layouts_are_refused(load_tiny):
    """A fused qkv_proj (Phi-3) is refused with a clear error rather than trained wrongly."""
    with pytest.raises(UnsupportedModelError, match="heads mode knows"):
        block_heads(whole_stage(load_tiny("phi3")))


def test_importance_ranks_heads_by_their_slices_gradient_magnitude():
    """top_heads takes the largest scores; head_scores adds a head's slices, a shared kv slice divided by its group."""
    assert top_heads([0.1, 5.0, 0.3, 4.0], 0.5, seed=0, round=1, key="", layer=0) == (1, 3)
    from autograd_bridge.finetune.head_layout import BlockHeads, HeadTensor

    block = BlockHeads(
        layer=0,
        num_heads=4,
        tensors=(
            HeadTensor(name="q", dim=0, width=2, offset=0, count=4, group=1),
            HeadTensor(name="k", dim=0, width=2, offset=0, count=2, group=2),
        ),
    )
    scores = head_scores(block, {"q": [1.0, 2.0, 3.0, 4.0], "k": [10.0, 0.0]})
    assert scores == [6.0, 7.0, 3.0, 4.0]


def test_importance_choice_follows_the_gradients(load_tiny):
    """After a round, the heads chosen by importance are those with the largest accumulated gradient magnitude."""
    stage = whole_stage(load_tiny("llama"))
    finetune = get_finetune("heads")
    finetune.prepare({0: stage}, settings(head_choice="importance", head_fraction=0.5))
    batch = padded_batch(vocab_size=stage.config.vocab_size, padding="right")
    causal_lm_loss(stage(batch.input_ids, batch.attention_mask), batch.labels).backward()
    finetune.begin_round({0: stage}, 2)
    for block in block_heads(stage):
        scores = head_scores(block, finetune.magnitudes)
        want = tuple(sorted(sorted(range(4), key=lambda h: -scores[h])[:2]))
        assert finetune.chosen_heads(0)[block.layer] == want


@pytest.mark.parametrize(
    ("family", "adapter"), [("llama", "full"), ("gpt2", "full"), ("llama", "lora"), ("gpt2", "lora")]
)
def test_untrained_slices_do_not_move_under_adamw(load_tiny, family, adapter):
    """Across two rounds of AdamW with weight decay (and momentum from round 1), only the chosen slices change."""
    stage = whole_stage(load_tiny(family))
    finetune = get_finetune("heads")
    finetune.prepare({0: stage}, settings(head_adapter=adapter))
    optimizer = torch.optim.AdamW(
        [p for p in stage.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    batch = padded_batch(vocab_size=stage.config.vocab_size, padding="right")

    for round in (1, 2):
        finetune.begin_round({0: stage}, round)
        before = {name: t.clone() for name, t in finetune.trained_tensors(stage).items()}
        for _ in range(2):
            causal_lm_loss(stage(batch.input_ids, batch.attention_mask), batch.labels).backward()
            optimizer.step()
            optimizer.zero_grad()
        after = finetune.trained_tensors(stage)
        slices = finetune.trained_slices(stage)
        assert set(after) == set(slices) == set(before)
        moved = 0
        for name, part in slices.items():
            if not part.blocks:
                assert torch.equal(after[name], before[name]), name
                continue
            keep = torch.ones(after[name].shape[part.dim] // part.width, dtype=torch.bool)
            keep[list(part.blocks)] = False
            index = keep.repeat_interleave(part.width).nonzero().squeeze(1)
            assert torch.equal(
                after[name].index_select(part.dim, index), before[name].index_select(part.dim, index)
            )
            trained = (~keep).repeat_interleave(part.width).nonzero().squeeze(1)
            moved += int(
                not torch.equal(
                    after[name].index_select(part.dim, trained), before[name].index_select(part.dim, trained)
                )
            )
        assert moved > 0


@pytest.mark.parametrize(("family", "adapter"), [("llama", "full"), ("gpt2", "full"), ("llama", "lora")])
def test_split_heads_training_equals_whole(load_tiny, family, adapter):
    """Three stages (the middle one on a stage host with its own heads-mode holder) train exactly as the whole model."""
    model = load_tiny(family)
    whole = whole_stage(model)
    host_settings = HostSettings(optimizer="adamw", lr=1e-2, weight_decay=0.1)
    split = memory_split(model, 3, host_settings=host_settings)
    try:
        chosen = settings(head_adapter=adapter, head_fraction=0.5)
        whole_ft, owner_ft, host_ft = get_finetune("heads"), get_finetune("heads"), get_finetune("heads")
        whole_ft.prepare({0: whole}, chosen)
        owner_ft.prepare({0: split.stages[0], 2: split.stages[2]}, chosen)
        host_ft.prepare({1: split.stages[1]}, chosen)
        split.hosts[1].reset_optimizer("adamw")
        whole_opt = torch.optim.AdamW(
            [p for p in whole.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
        )
        owner_params = [
            p for s in (split.stages[0], split.stages[2]) for p in s.parameters() if p.requires_grad
        ]
        owner_opt = torch.optim.AdamW(owner_params, lr=1e-2, weight_decay=0.1)
        pipeline = Pipeline(split.chain(), split.runtime)
        batch = padded_batch(vocab_size=model.config.vocab_size, padding="right")
        for round in (1, 2):
            for ft, stages in ((whole_ft, {0: whole}), (owner_ft, {0: split.stages[0], 2: split.stages[2]}),
                               (host_ft, {1: split.stages[1]})):  # fmt: skip
                ft.begin_round(stages, round)
            for _ in range(2):
                want = causal_lm_loss(whole(batch.input_ids, batch.attention_mask), batch.labels)
                want.backward()
                whole_opt.step()
                whole_opt.zero_grad()
                got = pipeline.train_step(batch.input_ids, batch.attention_mask, batch.labels)
                pipeline.optimizer_step(owner_opt, lr=1e-2)
                assert abs(got.loss - float(want.detach())) < 1e-5
        pipeline.close()
        heads = {**owner_ft.chosen_heads(0), **host_ft.chosen_heads(1), **owner_ft.chosen_heads(2)}
        assert heads == whole_ft.chosen_heads(0)
        want_state = whole_ft.trained_tensors(whole)
        got_state = {}
        for ft, stage in (
            (owner_ft, split.stages[0]),
            (host_ft, split.stages[1]),
            (owner_ft, split.stages[2]),
        ):
            got_state.update(ft.trained_tensors(stage))
        assert set(got_state) == set(want_state)
        for name, tensor in want_state.items():
            assert torch.allclose(got_state[name], tensor, atol=1e-5, rtol=0), name
    finally:
        split.close()


def test_loading_merged_weights_resets_the_adapters(load_tiny):
    """Per-head LoRA: after a load the stage holds exactly the merged weights, adapters adding nothing."""
    stage = whole_stage(load_tiny("llama"))
    finetune = get_finetune("heads")
    finetune.prepare({0: stage}, settings(head_adapter="lora", head_fraction=1.0))
    optimizer = torch.optim.AdamW([p for p in stage.parameters() if p.requires_grad], lr=1e-2)
    batch = padded_batch(vocab_size=stage.config.vocab_size, padding="right")
    causal_lm_loss(stage(batch.input_ids, batch.attention_mask), batch.labels).backward()
    optimizer.step()
    merged = {name: t.clone() for name, t in finetune.trained_tensors(stage).items()}
    with torch.no_grad():
        logits = stage(batch.input_ids, batch.attention_mask)
    finetune.load_tensors(stage, merged)
    assert all(torch.equal(t, merged[n]) for n, t in finetune.trained_tensors(stage).items())
    with torch.no_grad():
        assert torch.allclose(stage(batch.input_ids, batch.attention_mask), logits, atol=1e-5)


def test_bad_settings_are_refused():
    """A fraction outside (0, 1], an unknown choice or adapter is a ValueError naming the setting."""
    finetune = get_finetune("heads")
    for bad, match in ((dict(head_fraction=0.0), "head_fraction"), (dict(head_fraction=1.5), "head_fraction"),
                       (dict(head_choice="best"), "head_choice"), (dict(head_adapter="dora"), "adapter")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            finetune.check(settings(**bad))


@pytest.mark.parametrize(
    ("family", "choice"), [("llama", "random"), ("gpt2", "random"), ("llama", "importance")]
)
def test_chosen_slices_get_the_whole_models_gradient_and_the_rest_none(load_tiny, family, choice):
    """The sliced weight gradients equal plain autograd's on the chosen heads' slices and are zero elsewhere."""
    model = load_tiny(family)
    plain, stage = whole_stage(model), whole_stage(model)
    finetune = get_finetune("heads")
    finetune.prepare({0: stage}, settings(head_fraction=0.5, head_choice=choice))
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="left")
    causal_lm_loss(plain(batch.input_ids, batch.attention_mask), batch.labels).backward()
    causal_lm_loss(stage(batch.input_ids, batch.attention_mask), batch.labels).backward()
    want = dict(plain.named_parameters())
    checked = partial = 0
    for name, param in stage.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name
            continue
        part = finetune.trained_slices(stage)[name]
        chosen = torch.zeros(param.shape[part.dim] // part.width, dtype=torch.bool)
        chosen[list(part.blocks)] = True
        shape = [1] * param.dim()
        shape[part.dim] = -1
        mask = chosen.repeat_interleave(part.width).view(shape)
        assert torch.allclose(param.grad, want[name].grad * mask, atol=1e-6, rtol=1e-5), name
        assert int(mask.sum()) > 0
        partial += int(mask.sum()) < param.shape[part.dim]  # a key/value head may train whole under GQA
        checked += 1
    assert checked == (
        16 if family == "llama" else 12
    )  # 4 blocks x (q, k, v, o) or (c_attn w, c_attn b, c_proj)
    assert partial >= 8


def test_a_finished_run_leaves_no_trainables_behind(load_tiny):
    """The optimizer hook's registry holds the trainables weakly: dropping the mode and its stage frees them."""
    import gc

    from autograd_bridge.finetune import heads

    stage = whole_stage(load_tiny("llama"))
    finetune = get_finetune("heads")
    finetune.prepare({0: stage}, settings())
    ours = {id(p) for p in stage.parameters() if p.requires_grad}
    assert ours and ours <= set(heads._TRAINABLES)
    del finetune, stage
    gc.collect()
    assert not ours & set(heads._TRAINABLES)


def test_head_redundancy_and_the_share_it_gives(load_tiny):
    """Identical output slices are fully redundant (one head trains), orthogonal ones not at all (ceil(f H))."""
    stage = whole_stage(load_tiny("llama"))
    block = block_heads(stage)[0]
    o = torch.zeros(64, 64)  # (out, H * d): 4 heads of width 16
    for h in range(4):
        o[h, h * 16] = 1.0  # each head writes its own output feature: orthogonal
    assert head_redundancy(block, o) == 0.0
    same = torch.randn(64, 16).repeat(1, 4)  # every head's slice the same
    assert head_redundancy(block, same) == pytest.approx(1.0)
    assert redundancy_fraction(8, 0.5, 0.0) == 0.5  # H_eff = 8: 4 heads
    assert redundancy_fraction(8, 0.5, 1.0) == 1 / 8  # H_eff = 1: one head
    assert redundancy_fraction(8, 0.5, 1 / 7) == 0.25  # H_eff = 4: 2 heads
    assert redundancy_fraction(8, 1.0, 1.0) == 1.0  # an owner on every head stays on every head


def test_the_redundancy_schedule_trains_fewer_heads_of_a_redundant_block(load_tiny):
    """With head_schedule = "redundancy", a block whose heads write the same output trains one head."""
    stage = whole_stage(load_tiny("llama"))
    with torch.no_grad():
        stage.get_parameter("model.layers.1.self_attn.o_proj.weight").copy_(torch.randn(64, 16).repeat(1, 4))
    finetune = get_finetune("heads")
    finetune.prepare({0: stage}, settings(head_fraction=0.75, head_schedule="redundancy"))
    counts = {layer: len(heads) for layer, heads in finetune.chosen_heads(0).items()}
    assert counts[1] == 1
    assert all(1 < counts[layer] <= 3 for layer in (0, 2, 3))  # random weights: little redundancy
