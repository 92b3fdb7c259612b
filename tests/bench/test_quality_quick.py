"""bench/quality.py in a reduced configuration: cases 1 and 2 reproduce centralized training."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import torch

from bench.quality import QualitySettings, run_quality

LINE = re.compile(
    r"ppl_centralized=(\S+) ppl_fedavg=(\S+) ppl_case1=(\S+) ppl_case2=(\S+) ppl_case3=(\S+) "
    r"case12_max_loss_diff=(\S+)"
)


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread: tiny models run faster so on the shared 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_reduced_comparison_matches_centralized_and_learns():
    """The summary line parses, cases 1/2 equal centralized within 1e-5, and perplexity falls."""
    settings = QualitySettings(
        rounds=2, steps=2, batch_size=2, seq_len=32, max_chars_per_owner=6_000,
        tiny_layers=3, tiny_width=32, lr=5e-3, eval_batch_size=16,
    )
    result = run_quality(settings)
    match = LINE.fullmatch(result.summary_line())
    assert match is not None, result.summary_line()
    values = [float(v) for v in match.groups()]
    assert all(v > 0 for v in values[:5])
    assert values[5] < 1e-5 and result.case12_max_loss_diff < 1e-5
    assert len(result.losses["case1"]) == len(result.losses["centralized"]) == 2 * 2 * 2
    for method, curve in result.ppl.items():
        assert len(curve) == 3 and curve[-1] < curve[0], method
    assert "round" in result.table()
