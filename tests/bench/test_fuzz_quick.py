"""bench/fuzz.py for a few seconds: the three processes start, inputs flow, and nothing crashes, hangs or answers 5xx."""

from __future__ import annotations

import re

import pytest

from bench.fuzz import main

LINE = re.compile(
    r"^inputs=(\d+) crashes=(\d+) hangs=(\d+) five_xx=(\d+) unexpected_status=(\d+) rss_growth_mib=(\S+)$",
    re.M,
)


@pytest.mark.slow
def test_a_short_fuzz_run_finds_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    """A few batches of fuzzed inputs: the last line parses and every failure count is 0."""
    assert main(["--seconds", "4", "--batch", "60"]) == 0
    (line,) = LINE.findall(capsys.readouterr().out)
    inputs, crashes, hangs, five_xx, unexpected, _growth = line
    assert int(inputs) >= 60
    assert (int(crashes), int(hangs), int(five_xx), int(unexpected)) == (0, 0, 0, 0)
