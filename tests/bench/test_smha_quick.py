"""bench/smha.py in a reduced configuration: the line parses, fewer heads train fewer weights, reruns repeat."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import pytest
import torch

from bench.smha import SmhaSettings, _trained_elements, run_smha

LINE = re.compile(
    r"smha25_step_pct=(\S+) smha50_step_pct=(\S+) smha25_ppl_pct=(\S+) smha50_ppl_pct=(\S+) full_step_pct=(\S+)"
)
REDUCED = SmhaSettings(
    model="tiny", steps=6, steps_per_round=3, batch_size=2, seq_len=32, lr=1e-3, max_chars=8_000, tiny_layers=2,
    tiny_width=32, tiny_heads=4, tiny_kv_heads=2, base_steps=5, eval_batch_size=16,
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread, as the benchmark's default."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_reduced_comparison_line_and_repeat():
    """The line parses; 1/4 of the heads trains fewer weights than 1/2 than all; losses repeat on a rerun."""
    result = run_smha(REDUCED)
    match = LINE.fullmatch(result.summary_line())
    assert match is not None, result.summary_line()
    assert all(math.isfinite(float(v)) for v in match.groups())
    trained = [_trained_elements(result.by_name(n)) for n in ("heads_0.25", "heads_0.5", "heads_1", "full")]
    assert trained == sorted(trained) and len(set(trained)) == 4
    for mode in result.modes:
        assert len(mode.losses) == REDUCED.steps and math.isfinite(mode.ppl) and mode.ppl > 1, mode.name
        assert mode.losses[0] == result.modes[0].losses[0]  # every mode starts from the same model and batch
    again = run_smha(REDUCED)
    assert [m.losses for m in again.modes] == [m.losses for m in result.modes]
    assert [m.ppl for m in again.modes] == [m.ppl for m in result.modes]
