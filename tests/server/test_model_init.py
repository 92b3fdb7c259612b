"""Pre-training from scratch: the server draws a model from its config once, seeded, and serves it like any other."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from server.config import ModelSettings
from server.planning.model_source import HFModelSource


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with only a tiny Llama's config.json: no weights at all."""
    from autograd_bridge.models import tiny_config

    folder = tmp_path_factory.mktemp("config")
    tiny_config("llama").save_pretrained(folder)
    return folder


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def test_a_random_model_is_drawn_once_from_its_seed(config_dir: Path, tmp_path: Path) -> None:
    """Two servers with the same seed draw the same weights, equal to from_config under that seed; another seed differs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = ModelSettings(path=str(config_dir), init="random", init_seed=5)
    a = HFModelSource(settings, work_dir=tmp_path / "a").model_dir()
    b = HFModelSource(settings, work_dir=tmp_path / "b").model_dir()
    other = HFModelSource(ModelSettings(path=str(config_dir), init="random", init_seed=6), work_dir=tmp_path / "c").model_dir()
    wa, wb, wc = weights(a), weights(b), weights(other)
    torch.manual_seed(5)
    want = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=torch.float32).state_dict()
    assert wa and set(wa) == set(wb) and all(torch.equal(wa[n], wb[n]) for n in wa)
    assert all(torch.equal(wa[n], want[n]) for n in wa)
    assert any(not torch.equal(wa[n], wc[n]) for n in wa if wa[n].numel() > 1 and wa[n].std() > 0)
    again = HFModelSource(settings, work_dir=tmp_path / "a")
    assert again.model_dir() == a  # drawn once: a restarted server serves the same weights


def test_a_random_model_serves_partitions(config_dir: Path, tmp_path: Path) -> None:
    """The drawn model is split and profiled like a pretrained one."""
    source = HFModelSource(ModelSettings(path=str(config_dir), init="random"), work_dir=tmp_path)
    source.write_stage(index=1, num_stages=2, layer_start=2, layer_end=4, path=tmp_path / "p1.safetensors")
    stage = load_file(tmp_path / "p1.safetensors")
    assert stage and all(".layers.2." in n or ".layers.3." in n or "norm" in n or "lm_head" in n or "embed" in n for n in stage)


@pytest.mark.parametrize(("values", "message"), [({"init": "zeros"}, "init must be"), ({"init_seed": -1}, "init_seed")])
def test_bad_init_settings_are_refused(values: dict[str, object], message: str) -> None:
    """An unknown initialisation or a negative seed is a clear error."""
    with pytest.raises(ValueError, match=message):
        ModelSettings(path="x", **values)  # type: ignore[arg-type]


def test_init_flags_reach_the_model_settings(tmp_path: Path) -> None:
    """`titanic-server run --model DIR --init random --init-seed 3` asks for a seeded model from DIR's config."""
    from server.cli import build_parser, config_from_args

    args = build_parser().parse_args(["run", "--model", str(tmp_path), "--init", "random", "--init-seed", "3", "--stages", "2"])
    model = config_from_args(args).model
    assert model == ModelSettings(path=str(tmp_path), stages=2, init="random", init_seed=3)
    with pytest.raises(ValueError, match="--init-seed needs a model"):
        config_from_args(build_parser().parse_args(["run", "--init-seed", "3"]))
