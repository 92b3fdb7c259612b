"""bench/pretrain.py in a reduced configuration: every method trains the same tokens from the same start."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import torch

from bench.pretrain import PretrainSettings, run_pretrain

LINE = re.compile(
    r"ppl_centralized=(\S+) ppl_fedavg=(\S+) ppl_fednesterov=(\S+) ppl_fedadam=(\S+) ppl_partial=(\S+) "
    r"gap_pct=(\S+) comm_reduction=(\S+)"
)
REDUCED = PretrainSettings(
    layers=1, width=32, owners=4, rounds=2, local_steps=2, batch_size=2, seq_len=16, max_chars_per_owner=4_000,
    val_fraction=0.1, eval_batch_size=64,
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread, as the benchmark's default: tiny models run faster so on the shared 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_reduced_pretraining_is_fair_learns_and_repeats():
    """Same tokens and start everywhere, perplexity falls, bytes follow the formula, and a rerun prints the same line."""
    result = run_pretrain(REDUCED)
    match = LINE.fullmatch(result.summary_line())
    assert match is not None, result.summary_line()
    assert list(result.curves) == ["centralized", "dp", "fedavg", "fednesterov", "fedadam", "partial", "fedavg_iid"]
    tokens = 4 * 2 * 2 * 2 * 15  # owners * rounds * local_steps * batch * (seq_len - 1) label positions
    for name, curve in result.curves.items():
        assert curve.tokens == tokens, name
        assert sorted(curve.ppl) == [0, 8, 16], name  # before training, after each round's tokens
        assert curve.ppl[0] == result.curves["centralized"].ppl[0], name  # one random start
        assert curve.ppl[16] < curve.ppl[0], name
    # Every federated run moves the model down and up once per owner and round (partial: half, twice as often).
    for name in ("fedavg", "fednesterov", "fedadam", "partial", "fedavg_iid"):
        assert result.curves[name].bytes_exchanged == 2 * 4 * 2 * result.model_bytes, name
    assert result.dp_bytes == 2 * result.model_bytes * 4 * 2 * 2
    assert float(match.group(7)) == pytest.approx(2.0)  # = local_steps
    assert float(match.group(6)) == pytest.approx(result.gap_pct, abs=0.01)
    assert "round" in result.table() and "data-parallel" in result.traffic()
    assert run_pretrain(REDUCED).summary_line() == result.summary_line()
