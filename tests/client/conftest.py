"""Fixtures shared by the client tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def stage_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[int, Path]]:
    """A tiny Llama's config JSON and the weight file of its middle stage (of 3)."""
    from transformers import AutoModelForCausalLM

    from autograd_bridge.models import tiny_config
    from autograd_bridge.partition import StageSpec, save_stage_weights, split_model

    config = tiny_config("llama")
    model = AutoModelForCausalLM.from_config(config)
    specs = [
        StageSpec(index=i, num_stages=3, layer_start=s, layer_end=e)
        for i, (s, e) in enumerate([(0, 1), (1, 3), (3, 4)])
    ]
    folder = tmp_path_factory.mktemp("stages")
    files = {}
    for spec, stage in zip(specs, split_model(model, specs), strict=True):
        files[spec.index] = folder / f"stage{spec.index}.safetensors"
        save_stage_weights(stage, files[spec.index])
    return config.to_json_string(), files
