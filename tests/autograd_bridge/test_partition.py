"""Split models against whole ones: logits, loss and every gradient, by whole-model name.

Exactness needs inactive dropout: the tiny configs set every dropout probability to 0;
``test_eval_mode_split_matches_whole_with_dropout_configured`` covers models that keep it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaPreTrainedModel, PreTrainedModel

from autograd_bridge import partition
from autograd_bridge.errors import UnsupportedModelError
from autograd_bridge.models import tiny_config
from autograd_bridge.partition import (
    StageModule,
    StageSpec,
    causal_lm_loss,
    even_stage_specs,
    find_layout,
    load_stage,
    save_stage_weights,
    split_model,
    stage_specs_from_counts,
    tie_stage_weights,
)
from tests.autograd_bridge.conftest import Batch, TinyDir, TinyLoader, padded_batch

TOLERANCE = 1e-5

#: Families run over the whole grid (K, attention, padding); each takes a different path:
#: learned positions and Conv1D (gpt2), rotary (llama), sliding layers from layer_types
#: (qwen2), softcapped logits + embedding scaling + eager-only (gemma2), per-layer-type
#: rotary (gemma3), other names and an untied renamed head (gpt_neox), positions from the
#: mask and project_in/out (opt), sliding window on every layer (phi3), ALiBi from the mask
#: (bloom) and from the sequence length with a boolean mask (mpt), both eager-only.
GRID_FAMILIES = ("gpt2", "llama", "qwen2", "gemma2", "gemma3", "gpt_neox", "opt", "phi3", "bloom", "mpt")
#: Families checked once each (K=3, sdpa where the family has it, left padding).
MORE_FAMILIES = (
    "mistral", "qwen3", "gemma", "granite", "cohere", "starcoder2", "olmo2", "stablelm", "phi", "smollm3",
    "falcon", "gptj", "mixtral",
)
EAGER_ONLY = {"gemma2", "gptj", "bloom", "mpt"}

pytestmark = pytest.mark.usefixtures("single_thread")


def grid() -> list[Any]:
    cases = []
    for family in GRID_FAMILIES:
        for attn in ("eager", "sdpa"):
            if attn == "sdpa" and family in EAGER_ONLY:
                continue
            for padding in ("right", "left"):
                for k in (2, 3, 4):
                    cases.append(pytest.param(family, attn, padding, k, id=f"{family}-{attn}-{padding}-K{k}"))
    return cases


def whole_run(model: PreTrainedModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Logits, HF loss and gradients (by name) of the whole model."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), out.loss.detach(), grads


def split_run(
    stages: Sequence[StageModule], batch: Batch
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Logits, loss and gradients (by whole-model name) of the stages run one after another."""
    hidden = batch.input_ids
    for stage in stages:
        hidden = stage(hidden, attention_mask=batch.attention_mask)
    loss = causal_lm_loss(hidden, batch.labels)
    loss.backward()
    grads: dict[str, torch.Tensor] = {}
    for stage in stages:
        for name, param in stage.named_model_parameters():
            assert name not in grads, f"{name} reported by two stages"
            assert param.grad is not None, f"{name} got no gradient"
            grads[name] = param.grad.clone()
    return hidden.detach(), loss.detach(), grads


def assert_same_run(whole: tuple[Any, ...], split: tuple[Any, ...]) -> None:
    logits, loss, grads = whole
    split_logits, split_loss, split_grads = split
    assert torch.allclose(split_logits, logits, atol=TOLERANCE, rtol=0)
    assert abs(split_loss.item() - loss.item()) <= TOLERANCE
    assert split_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(split_grads[name], grad, atol=TOLERANCE, rtol=0), name


@pytest.fixture(scope="module")
def model_cache(load_tiny: TinyLoader) -> dict[tuple[str, str], PreTrainedModel]:
    """One loaded model per (family, attention) for this module's grid tests."""
    return {}


def cached_model(cache: dict[tuple[str, str], PreTrainedModel], load: TinyLoader, family: str, attn: str) -> Any:
    if (family, attn) not in cache:
        cache[(family, attn)] = load(family, attn).train()
    return cache[(family, attn)]


# --------------------------------------------------------------------------- split vs whole


@pytest.mark.parametrize(("family", "attn", "padding", "k"), grid())
def test_split_matches_whole(
    family: str, attn: str, padding: str, k: int, model_cache: dict[Any, Any], load_tiny: TinyLoader
) -> None:
    """K stages reproduce the whole model's logits, loss and every parameter gradient."""
    model = cached_model(model_cache, load_tiny, family, attn)
    batch = padded_batch(vocab_size=model.config.vocab_size, padding=padding)
    whole = whole_run(model, batch)
    split = split_run(split_model(model, even_stage_specs(model.config.num_hidden_layers, k)), batch)
    model.zero_grad(set_to_none=True)
    assert_same_run(whole, split)


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_more_families_split_matches_whole(family: str, load_tiny: TinyLoader) -> None:
    """Further families split exactly too (K=3, sdpa where supported, left padding)."""
    model = load_tiny(family, "eager" if family in EAGER_ONLY else "sdpa").train()
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="left")
    whole = whole_run(model, batch)
    assert_same_run(whole, split_run(split_model(model, even_stage_specs(4, 3)), batch))


@pytest.mark.parametrize(
    ("family", "overrides"),
    [("bloom", {"hidden_size": 48, "n_head": 6}), ("mpt", {"d_model": 48, "n_heads": 6})],
)
def test_alibi_with_a_head_count_not_a_power_of_two_matches_whole(
    family: str, overrides: dict[str, int], load_tiny: TinyLoader
) -> None:
    """Six heads take the slopes' interleaving path; K=3 still reproduces the whole model."""
    model = load_tiny(family, "eager", **overrides).train()
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="left")
    whole = whole_run(model, batch)
    assert_same_run(whole, split_run(split_model(model, even_stage_specs(4, 3)), batch))


#: ALiBi variants: (family, attention, config overrides).
ALIBI_CASES = [
    ("bloom", "eager", {}),
    ("mpt", "eager", {}),
    ("falcon", "eager", {"alibi": True}),
    ("falcon", "sdpa", {"alibi": True}),
]


@pytest.mark.parametrize(("family", "attn", "overrides"), ALIBI_CASES[2:])
def test_falcon_with_alibi_split_matches_whole(
    family: str, attn: str, overrides: dict[str, Any], load_tiny: TinyLoader
) -> None:
    """Falcon with alibi=True (bias folded into the mask) splits exactly, K=3, left padding."""
    model = load_tiny(family, attn, **overrides).train()
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="left")
    whole = whole_run(model, batch)
    assert_same_run(whole, split_run(split_model(model, even_stage_specs(4, 3)), batch))


@pytest.mark.parametrize(("family", "attn", "overrides"), ALIBI_CASES)
def test_alibi_without_an_attention_mask_matches_whole(
    family: str, attn: str, overrides: dict[str, Any], load_tiny: TinyLoader
) -> None:
    """With no mask at all (the stacks then number keys themselves; sdpa could skip the mask), K=2 matches."""
    model = load_tiny(family, attn, **overrides).train()
    ids = torch.randint(3, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    whole = (out.logits.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    stages = split_model(model, even_stage_specs(4, 2))
    logits = stages[1](stages[0](ids))
    loss = causal_lm_loss(logits, ids)
    loss.backward()
    grads = {name: p.grad.clone() for stage in stages for name, p in stage.named_model_parameters()}
    model.zero_grad(set_to_none=True)
    assert_same_run(whole, (logits.detach(), loss.detach(), grads))


@pytest.mark.parametrize("family", ["bloom", "mpt"])
def test_alibi_split_matches_whole_in_bfloat16(family: str, tiny_model_dir: TinyDir) -> None:
    """In bfloat16 the stages give the whole model's logits bit for bit (BLOOM casts its bias, MPT keeps float32)."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir(family), attn_implementation="eager", dtype=torch.bfloat16
    )
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="left")
    with torch.no_grad():
        whole = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        hidden = batch.input_ids
        for stage in split_model(model, even_stage_specs(4, 3)):
            hidden = stage(hidden, attention_mask=batch.attention_mask)
    assert torch.equal(hidden, whole)


def test_stages_without_blocks_match_whole(load_tiny: TinyLoader) -> None:
    """A data owner holding only embeddings and head (0 blocks) still reproduces the model."""
    model = load_tiny("gpt2").train()
    batch = padded_batch(vocab_size=256, padding="right")
    whole = whole_run(model, batch)
    assert_same_run(whole, split_run(split_model(model, stage_specs_from_counts([0, 4, 0])), batch))


def test_single_stage_matches_whole(load_tiny: TinyLoader) -> None:
    """K=1 holds everything, tied weights once."""
    model = load_tiny("gemma2", "eager").train()
    batch = padded_batch(vocab_size=256, padding="left")
    whole = whole_run(model, batch)
    assert_same_run(whole, split_run(split_model(model, even_stage_specs(4, 1)), batch))


def test_explicit_position_ids_match_whole(load_tiny: TinyLoader) -> None:
    """Position ids given by the caller (counted from the first real token) reach every stage."""
    model = load_tiny("llama").eval()
    batch = padded_batch(vocab_size=256, padding="left")
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    whole = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions).logits
    hidden = batch.input_ids
    for stage in split_model(model, even_stage_specs(4, 3)):
        hidden = stage(hidden, attention_mask=batch.attention_mask, position_ids=positions)
    assert torch.allclose(hidden, whole, atol=TOLERANCE, rtol=0)


def test_eval_mode_split_matches_whole_with_dropout_configured(tiny_model_dir: TinyDir) -> None:
    """With dropout configured (GPT-2's 0.1), split and whole agree in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir("gpt2", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    ).eval()
    assert model.config.resid_pdrop == 0.1
    batch = padded_batch(vocab_size=256, padding="right")
    whole = whole_run(model, batch)
    assert_same_run(whole, split_run(split_model(model, even_stage_specs(4, 2)), batch))


# --------------------------------------------------------------------------- loss


def test_causal_lm_loss_matches_hf_loss(load_tiny: TinyLoader) -> None:
    """causal_lm_loss on the model's logits equals the loss the model computes itself."""
    model = load_tiny("llama").eval()
    batch = padded_batch(vocab_size=256, padding="right")
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    assert torch.allclose(causal_lm_loss(out.logits, batch.labels), out.loss, atol=1e-6, rtol=0)


def test_micro_batch_losses_add_up_to_batch_loss() -> None:
    """With num_items = the batch's valid-token count, micro-batch losses sum to the batch loss."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, 11, generator=generator)
    labels = torch.randint(0, 11, (4, 6), generator=generator)
    labels[1, 3:] = -100
    labels[3, :2] = -100
    valid = int((labels[:, 1:] != -100).sum())
    parts = sum(causal_lm_loss(logits[i : i + 2], labels[i : i + 2], num_items=valid) for i in (0, 2))
    assert torch.allclose(parts, causal_lm_loss(logits, labels), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- names and ties


def test_named_model_parameters_partition_the_whole_models_names(load_tiny: TinyLoader) -> None:
    """Stages report each whole-model parameter name exactly once, the tied one from stage 0."""
    model = load_tiny("gpt2")
    stages = split_model(model, even_stage_specs(4, 3))
    reported = [[name for name, _ in stage.named_model_parameters()] for stage in stages]
    flat = [name for names in reported for name in names]
    assert sorted(flat) == sorted(name for name, _ in model.named_parameters())
    assert "transformer.wte.weight" in reported[0]
    assert all(not name.startswith("lm_head") for name in flat)


def test_split_tied_head_shares_the_embedding_parameter(load_tiny: TinyLoader) -> None:
    """In a split tied model, the last stage's head weight is the first stage's embedding weight."""
    model = load_tiny("gpt2")
    first, _, last = split_model(model, even_stage_specs(4, 3))
    assert first.tied_embeddings
    assert last.get_submodule("lm_head").weight is first.get_submodule("transformer.wte").weight


def test_untied_head_is_reported_by_the_last_stage(load_tiny: TinyLoader) -> None:
    """An untied head weight is the last stage's own parameter, under the whole model's name."""
    model = load_tiny("gpt_neox")
    stages = split_model(model, even_stage_specs(4, 2))
    assert not stages[0].tied_embeddings
    assert "lm_head.weight" in dict(stages[-1].named_model_parameters())


def test_tie_stage_weights_restores_u_shape_gradients(tiny_model_dir: TinyDir, tmp_path: Path) -> None:
    """Separately loaded first and last stages, once tied, give the whole model's gradients."""
    directory = tiny_model_dir("gpt2")
    model = AutoModelForCausalLM.from_pretrained(directory).train()
    batch = padded_batch(vocab_size=256, padding="left")
    whole = whole_run(model, batch)
    stages = [load_stage(model.config, spec, directory).train() for spec in even_stage_specs(4, 3)]
    assert stages[2].get_submodule("lm_head").weight is not stages[0].get_submodule("transformer.wte").weight
    tie_stage_weights(stages[0], stages[2])
    assert stages[2].get_submodule("lm_head").weight is stages[0].get_submodule("transformer.wte").weight
    assert_same_run(whole, split_run(stages, batch))


def test_tie_stage_weights_refuses_untied_models(load_tiny: TinyLoader) -> None:
    """Tying stages of a model without tied embeddings is a user error."""
    stages = split_model(load_tiny("llama"), even_stage_specs(4, 2))
    with pytest.raises(ValueError, match="does not tie"):
        tie_stage_weights(stages[0], stages[1])


# --------------------------------------------------------------------------- hosting a stage alone


def stage_outputs(stages: Sequence[StageModule], batch: Batch) -> list[torch.Tensor]:
    outputs, hidden = [], batch.input_ids
    with torch.no_grad():
        for stage in stages:
            hidden = stage(hidden, attention_mask=batch.attention_mask)
            outputs.append(hidden)
    return outputs


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3", "gpt_neox", "opt", "bloom", "mpt"])
def test_load_stage_from_whole_checkpoint_matches_split(family: str, tiny_model_dir: TinyDir) -> None:
    """Stages loaded from model.safetensors compute what the split loaded model computes."""
    directory = tiny_model_dir(family)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    specs = stage_specs_from_counts([1, 2, 1])
    batch = padded_batch(vocab_size=256, padding="left")
    expected = stage_outputs(split_model(model, specs), batch)
    loaded = stage_outputs([load_stage(model.config, spec, directory) for spec in specs], batch)
    for got, want in zip(loaded, expected, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_load_stage_from_stage_files_matches_whole_checkpoint(
    family: str, tiny_model_dir: TinyDir, tmp_path: Path
) -> None:
    """A stage saved with save_stage_weights and loaded from that file alone computes the same."""
    directory = tiny_model_dir(family)
    config = AutoModelForCausalLM.from_pretrained(directory).config
    specs = even_stage_specs(4, 3)
    from_whole = [load_stage(config, spec, directory) for spec in specs]
    files = []
    for stage in from_whole:
        files.append(tmp_path / f"stage-{stage.spec.index}.safetensors")
        save_stage_weights(stage, files[-1])
    from_files = [load_stage(config, spec, file) for spec, file in zip(specs, files, strict=True)]
    batch = padded_batch(vocab_size=256, padding="right")
    for got, want in zip(stage_outputs(from_files, batch), stage_outputs(from_whole, batch), strict=True):
        assert torch.equal(got, want)


def test_stage_file_holds_exactly_the_stages_tensors(load_tiny: TinyLoader, tmp_path: Path) -> None:
    """save_stage_weights writes the stage's tensors under whole-model names, the tied head as the embedding."""
    model = load_tiny("gpt2")
    last = split_model(model, even_stage_specs(4, 2))[1]
    save_stage_weights(last, tmp_path / "last.safetensors")
    with safe_open(str(tmp_path / "last.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    assert "transformer.h.2.attn.c_attn.weight" in keys and "transformer.h.1.attn.c_attn.weight" not in keys
    assert torch.equal(handle_tensor(tmp_path / "last.safetensors", "transformer.ln_f.weight"),
                       model.transformer.ln_f.weight.detach())


def handle_tensor(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(name)


class _RecordingOpen:
    """Wraps safetensors.safe_open, recording every tensor read."""

    def __init__(self) -> None:
        self.read: list[str] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        recorder = self

        class Handle:
            def __init__(self) -> None:
                self._inner = safe_open(*args, **kwargs)

            def __enter__(self) -> Handle:
                self._inner.__enter__()
                return self

            def __exit__(self, *exc: Any) -> None:
                self._inner.__exit__(*exc)

            def __getattr__(self, name: str) -> Any:
                return getattr(self._inner, name)

            def get_tensor(self, name: str) -> torch.Tensor:
                recorder.read.append(name)
                return self._inner.get_tensor(name)

        return Handle()


@pytest.mark.parametrize("index", [0, 1, 2])
def test_load_stage_reads_only_its_own_tensors(
    index: int, tiny_model_dir: TinyDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_stage reads from the whole checkpoint exactly the tensors of its own pieces."""
    directory = tiny_model_dir("gpt2")
    config = AutoModelForCausalLM.from_pretrained(directory).config
    recorder = _RecordingOpen()
    monkeypatch.setattr(partition, "safe_open", recorder)
    spec = even_stage_specs(4, 3)[index]
    stage = load_stage(config, spec, directory)
    assert sorted(recorder.read) == sorted(stage.model_state())
    blocks = {int(name.split(".")[2]) for name in recorder.read if name.startswith("transformer.h.")}
    assert blocks == set(range(spec.layer_start, spec.layer_end))
    assert ("transformer.wte.weight" in recorder.read) == (spec.is_first or spec.is_last)  # tied head
    assert all(p.device.type == "cpu" for p in stage.parameters())


def test_load_stage_accepts_a_checkpoint_of_the_bare_stack(tmp_path: Path, load_tiny: TinyLoader) -> None:
    """Tensors saved without the base_model_prefix (a bare LlamaModel) load into a stage."""
    model = load_tiny("llama").eval()
    model.model.save_pretrained(tmp_path / "base")
    specs = even_stage_specs(4, 2)
    stage = load_stage(model.config, specs[0], tmp_path / "base")
    batch = padded_batch(vocab_size=256, padding="right")
    expected = stage_outputs(split_model(model, specs)[:1], batch)
    assert torch.equal(stage_outputs([stage], batch)[0], expected[0])


def test_load_stage_keeps_the_configs_attention(tiny_model_dir: TinyDir) -> None:
    """A stage loaded from an eager model's config runs eager attention too."""
    directory = tiny_model_dir("llama")
    config = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").config
    assert load_stage(config, even_stage_specs(4, 2)[1], directory).config._attn_implementation == "eager"


def test_load_stage_refuses_buffers_it_cannot_recompute(
    tiny_model_dir: TinyDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the model's _init_weights leaves a non-persistent buffer unset, load_stage says so."""
    directory = tiny_model_dir("llama")
    config = AutoModelForCausalLM.from_pretrained(directory).config
    monkeypatch.setattr(LlamaPreTrainedModel, "_init_weights", lambda self, module: None)
    with pytest.raises(UnsupportedModelError, match="inv_freq"):
        load_stage(config, even_stage_specs(4, 2)[1], directory)


def test_load_stage_names_missing_tensors(tmp_path: Path, load_tiny: TinyLoader) -> None:
    """Weight files lacking a stage's tensors give a ValueError naming the tensor."""
    model = load_tiny("llama")
    first = split_model(model, even_stage_specs(4, 2))[0]
    save_stage_weights(first, tmp_path / "first.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.2"):
        load_stage(model.config, even_stage_specs(4, 2)[1], tmp_path / "first.safetensors")


# --------------------------------------------------------------------------- specs and errors


def test_even_stage_specs_cover_every_block_once() -> None:
    """Even specs are consecutive, cover all blocks, and differ in size by at most one."""
    specs = even_stage_specs(30, 4)
    counts = [spec.num_blocks for spec in specs]
    assert sum(counts) == 30 and max(counts) - min(counts) <= 1
    assert [spec.layer_start for spec in specs[1:]] == [spec.layer_end for spec in specs[:-1]]
    assert specs[0].is_first and specs[-1].is_last and not specs[1].is_first


def test_stage_specs_from_counts_follow_the_counts() -> None:
    """Specs built from counts hold exactly those numbers of blocks, in order."""
    specs = stage_specs_from_counts([0, 3, 1])
    assert [(s.layer_start, s.layer_end) for s in specs] == [(0, 0), (0, 3), (3, 4)]
    assert all(s.num_stages == 3 for s in specs)


@pytest.mark.parametrize(
    "make",
    [
        lambda: even_stage_specs(4, 5),
        lambda: even_stage_specs(4, 0),
        lambda: stage_specs_from_counts([]),
        lambda: stage_specs_from_counts([2, -1]),
        lambda: StageSpec(index=2, num_stages=2, layer_start=0, layer_end=1),
        lambda: StageSpec(index=0, num_stages=1, layer_start=3, layer_end=1),
    ],
)
def test_bad_specs_raise_value_error(make: Any) -> None:
    """Impossible stage specs are refused with a ValueError."""
    with pytest.raises(ValueError):
        make()


def test_split_model_refuses_specs_that_miss_blocks(load_tiny: TinyLoader) -> None:
    """Specs that do not cover every block of the model are refused."""
    with pytest.raises(ValueError, match="cover"):
        split_model(load_tiny("llama"), stage_specs_from_counts([1, 2]))


def test_non_transformers_module_is_unsupported() -> None:
    """A module that is not a transformers model cannot be split."""
    with pytest.raises(UnsupportedModelError, match="not a transformers model"):
        find_layout(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def test_model_without_a_final_norm_is_unsupported(load_tiny: TinyLoader) -> None:
    """A stack whose final norm cannot be found is refused, pointing at families.py."""
    model = load_tiny("llama")
    model.model.final_piece = model.model.norm
    del model.model.norm
    with pytest.raises(UnsupportedModelError, match=r"families\.py"):
        find_layout(model)


def test_router_loss_config_is_unsupported() -> None:
    """A config asking for a router loss from every block is refused with the setting to change."""
    config = tiny_config("llama")
    config.output_router_logits = True
    with pytest.raises(UnsupportedModelError, match="output_router_logits"):
        find_layout(AutoModelForCausalLM.from_config(config))


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_split_matches_whole(smollm2: PreTrainedModel) -> None:
    """The real SmolLM2-135M (gguf) split into 4 stages matches the whole model on a short batch."""
    model = smollm2.train()
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="left", lengths=(16, 11))
    whole = whole_run(model, batch)
    split = split_run(split_model(model, even_stage_specs(model.config.num_hidden_layers, 4)), batch)
    model.zero_grad(set_to_none=True)
    assert_same_run(whole, split)
