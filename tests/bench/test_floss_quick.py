"""bench/floss.py in a reduced configuration: sparse uploads are smaller, perplexity is finite, reruns repeat."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import pytest
import torch

from bench.floss import Curve, FlossSettings, Method, choose, run_floss

LINE = re.compile(
    r"upload_reduction=(\S+) download_reduction=(\S+) ppl_dense=(\S+) ppl_sparse=(\S+) ppl_increase_pct=(\S+)"
)
METHODS = (
    Method(name="dense"),
    Method(name="dense_r/4", rank_divisor=4),
    Method(name="sparseadapter_0.25", download=0.25, upload=0.25, fixed_mask=True, scope="tensor"),
    Method(name="floss_ef_0.1/0.05", download=0.1, upload=0.05, error_feedback=True),
)
REDUCED = FlossSettings(
    owners=2, rounds=3, steps=2, batch_size=2, seq_len=32, max_chars_per_owner=6_000, tiny_layers=2, tiny_width=32,
    base_steps=10, eval_batch_size=32, methods=METHODS,
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread, as the benchmark's default: the line is reproducible at a fixed thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_reduced_comparison_counts_bytes_and_repeats():
    """The line parses, sparse methods upload less than dense, every perplexity is finite, and a rerun repeats it."""
    result = run_floss(REDUCED)
    match = LINE.fullmatch(result.summary_line())
    assert match is not None, result.summary_line()
    upload_reduction, download_reduction, ppl_dense, ppl_sparse, _ = (float(v) for v in match.groups())
    assert upload_reduction > 1 and download_reduction > 1
    assert math.isfinite(ppl_dense) and math.isfinite(ppl_sparse) and ppl_dense > 1 and ppl_sparse > 1
    dense = result.curves["dense"]
    for method in METHODS:
        curve = result.curves[method.name]
        assert len(curve.ppl) == REDUCED.rounds + 1 and all(math.isfinite(p) for p in curve.ppl), method.name
        assert curve.ppl[0] == dense.ppl[0], method.name  # LoRA starts with B = 0: every method starts at the base
        if method.name != "dense":
            assert curve.upload_bytes < dense.upload_bytes and curve.download_bytes < dense.download_bytes
    assert dense.ppl[-1] < dense.ppl[0]
    assert run_floss(REDUCED).summary_line() == result.summary_line()


def test_choose_takes_the_smallest_upload_within_tolerance_else_the_lowest_perplexity():
    """Within 2%: the smallest upload wins; none within: the lowest perplexity is reported, marked as outside."""
    methods = (Method(name="dense"), Method(name="a", upload=0.25), Method(name="b", upload=0.01))
    curves = {
        "dense": Curve(ppl=[20.0, 10.0], upload_bytes=1000),
        "a": Curve(ppl=[20.0, 10.1], upload_bytes=300),
        "b": Curve(ppl=[20.0, 10.19], upload_bytes=50),
    }
    assert choose(curves, methods) == ("b", True)
    curves["b"].ppl[-1] = 10.3
    assert choose(curves, methods) == ("a", True)
    curves["a"].ppl[-1] = 10.25
    assert choose(curves, methods) == ("a", False)
