"""Heads mode (SMHA) over the real system: two owners train different shares of the heads, the server merges per head."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from .test_training_system import SEED, cluster, dataset, load_model, model_dir, owner_data, validation_ppl

__all__ = ["model_dir", "owner_data"]  # the module fixtures this test shares with test_training_system

RUN = f"""
rounds = 2
seed = {SEED}
tokenizer = "{{tokenizer}}"
[participation]
mode = "parallel"
[local_work]
steps = 3
[training]
batch_size = 4
seq_len = 32
lr = 3e-3
[evaluation]
val_fraction = 0.2
[finetune]
mode = "heads"
head_fraction = 0.25
[finetune.head_fractions]
alice = 1.0
"""


@pytest.mark.slow
def test_each_head_is_merged_over_the_owners_that_trained_it(
    tmp_path: Path, model_dir: Path, owner_data: list[Path]
) -> None:
    """alice trains every head, bob one of four per block: bob's heads are averaged, the others are alice's, the rest frozen."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from autograd_bridge.finetune.head_layout import random_heads

    run_file = tmp_path / "run.toml"
    run_file.write_text(RUN.format(tokenizer=model_dir))
    owners = {"alice": owner_data[0], "bob": owner_data[1]}
    with cluster(
        tmp_path, model_dir, owners, helpers=1, helper_capacity=2
    ) as c:  # the helper hosts both middles
        run = c.run_to_end(run_file, timeout_s=180)
    start = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    config = AutoModelForCausalLM.from_pretrained(model_dir).config
    width = config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads
    for round_, folder in enumerate(run["checkpoints"], start=1):
        merged = load_file(Path(folder) / "model.safetensors")
        copies, weights = {}, {}
        for h in (h for h in run["history"] if h["round"] == round_):
            state: dict[str, torch.Tensor] = {}
            for path in (c.state_dir / "weights" / "uploads" / h["bridge_run"]).glob(
                f"p*-r{round_}-*.safetensors"
            ):
                state.update({n: t for n, t in load_file(path).items() if not n.startswith("optimizer/")})
            copies[h["owner"]], weights[h["owner"]] = state, h["data_samples"]
        a, b = copies["alice"], copies["bob"]
        wa, wb = (
            weights["alice"] / (weights["alice"] + weights["bob"]),
            weights["bob"] / (weights["alice"] + weights["bob"]),
        )
        for layer in range(config.num_hidden_layers):
            (head,) = random_heads(
                config.num_attention_heads, 0.25, seed=SEED, round=round_, key="bob", layer=layer
            )
            prefix = f"model.layers.{layer}.self_attn"
            for proj, index, dim in (("q_proj", head, 0), ("k_proj", head // group, 0), ("o_proj", head, 1)):
                name = f"{prefix}.{proj}.weight"
                rows = torch.zeros(merged[name].shape[dim], dtype=torch.bool)
                rows[index * width : (index + 1) * width] = True
                mask = rows.view(-1, 1) if dim == 0 else rows.view(1, -1)
                expected = torch.where(mask, wa * a[name] + wb * b[name], a[name])
                torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
                assert not torch.equal(a[name], b[name])  # both owners trained this tensor, differently
            for frozen in (
                f"model.layers.{layer}.mlp.up_proj.weight",
                f"model.layers.{layer}.input_layernorm.weight",
            ):
                assert torch.equal(merged[frozen], start[frozen])
        assert torch.equal(merged["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    last = Path(run["checkpoints"][-1])
    assert math.isfinite(
        validation_ppl(load_model(last, model_dir, adapter=False), dataset(last, owner_data[0]))
    )
