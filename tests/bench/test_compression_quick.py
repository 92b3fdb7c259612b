"""bench/compression.py in a reduced configuration: compression changes the bytes and, a little, the loss."""

from __future__ import annotations

import re

import pytest

from bench.compression import CompressionSettings, run_compression, summary_line

LINE = re.compile(
    r"loss_none=(\S+) loss_fp16=(\S+) loss_int8=(\S+) delta_fp16_pct=(\S+) delta_int8_pct=(\S+) "
    r"bytes_fp16=(\S+) bytes_int8=(\S+)"
)


@pytest.mark.slow
def test_reduced_compression_bench_measures_loss_and_bytes():
    """Each compression trains the same batches from the same start; fp16 and int8 send fewer bytes."""
    settings = CompressionSettings(steps=2, batch_size=4, seq_len=32, micro_batches=2, max_chars=8_000)
    outcomes = run_compression(settings)
    match = LINE.fullmatch(summary_line(outcomes))
    assert match is not None, summary_line(outcomes)
    none, fp16, int8 = outcomes["none"], outcomes["fp16"], outcomes["int8"]
    assert int8.losses != none.losses and fp16.losses != none.losses  # the activations did travel compressed
    assert fp16.bytes_per_step < 0.75 * none.bytes_per_step
    assert int8.bytes_per_step < fp16.bytes_per_step
    assert abs(float(match.group(5))) < 5  # int8 moves the loss by well under 5% here
