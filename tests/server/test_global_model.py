"""The global model by whole-model name: which tensors and optimizer state each partition of each pipeline gets."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from autograd_bridge.lora import add_lora, lora_state
from autograd_bridge.models import tiny_config
from autograd_bridge.partition import even_stage_specs, save_stage_weights, split_model
from server.training.global_model import PartitionTensors, optimizer_state_for, partition_names


@pytest.fixture(scope="module")
def model() -> object:
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config)


def pipeline(model: object, stages: int, folder: Path) -> list[PartitionTensors]:
    """The partitions of ``model`` cut into ``stages``, as the server knows them from their weight files."""
    parts = []
    for stage in split_model(model, even_stage_specs(int(model.config.num_hidden_layers), stages)):  # type: ignore[attr-defined]
        path = folder / f"{stages}-{stage.spec.index}.safetensors"
        save_stage_weights(stage, path)
        with safe_open(str(path), framework="pt") as f:
            stored = frozenset(f.keys())
        parts.append(PartitionTensors(index=stage.spec.index, layer_start=stage.spec.layer_start,
                                      layer_end=stage.spec.layer_end, stored=stored))  # fmt: skip
    return parts


def test_one_stage_holds_the_whole_model_and_three_stages_share_it(model: object, tmp_path: Path) -> None:
    """Every global tensor belongs to the one-stage pipeline's partition 0, and to some partition of a 3-stage cut."""
    whole = {name for name, _ in model.named_parameters()}  # type: ignore[attr-defined]
    (only,) = pipeline(model, 1, tmp_path)
    assert set(partition_names(whole, only)) == whole
    three = pipeline(model, 3, tmp_path)
    held = [set(partition_names(whole, p)) for p in three]
    assert set().union(*held) == whole
    assert "model.layers.0.mlp.up_proj.weight" in held[0] and "model.norm.weight" in held[2]


def test_a_tied_head_loads_in_both_ends_but_its_optimizer_state_in_the_first(model: object, tmp_path: Path) -> None:
    """The last stage stores the tied head under the embedding's name; the state of that parameter goes to stage 0 only."""
    three = pipeline(model, 3, tmp_path)
    name = "model.embed_tokens.weight"
    assert partition_names([name], three[0]) == [name] and partition_names([name], three[2]) == [name]
    state = {f"optimizer/exp_avg/{name}": 1, "optimizer/exp_avg/model.norm.weight": 2}
    assert optimizer_state_for(state, three, 0) == {f"optimizer/exp_avg/{name}": 1}
    assert optimizer_state_for(state, three, 2) == {"optimizer/exp_avg/model.norm.weight": 2}


def test_optimizer_state_follows_names_across_differently_cut_pipelines(model: object, tmp_path: Path) -> None:
    """State uploaded by a 3-stage pipeline lands, name by name, in the partitions of a 2-stage and a 1-stage one."""
    layers = int(model.config.num_hidden_layers)  # type: ignore[attr-defined]
    state = {f"optimizer/exp_avg/model.layers.{i}.mlp.up_proj.weight": i for i in range(layers)}
    two = pipeline(model, 2, tmp_path)
    got = [optimizer_state_for(state, two, p.index) for p in two]
    assert got[0].keys() | got[1].keys() == state.keys() and not got[0].keys() & got[1].keys()
    assert all(int(n.split(".")[2]) < two[0].layer_end for n in got[0])
    (only,) = pipeline(model, 1, tmp_path)
    assert optimizer_state_for(state, [only], 0) == state


def test_lora_adapters_belong_to_the_partition_of_their_block(model: object, tmp_path: Path) -> None:
    """Adapter names are in no weight file: a partition holds those of its decoder blocks, a one-stage one all of them."""
    import copy

    adapted = copy.deepcopy(model)
    (stage,) = split_model(adapted, even_stage_specs(int(adapted.config.num_hidden_layers), 1))  # type: ignore[attr-defined]
    add_lora(stage, r=2, alpha=4)
    adapters = list(lora_state(stage))
    assert adapters
    (only,) = pipeline(model, 1, tmp_path)
    assert partition_names(adapters, only) == adapters
    three = pipeline(model, 3, tmp_path)
    per_stage = [partition_names(adapters, p) for p in three]
    assert sorted(n for names in per_stage for n in names) == sorted(adapters)
    for part, names in zip(three, per_stage, strict=True):
        assert all(part.layer_start <= int(n.split(".")[2]) < part.layer_end for n in names)
