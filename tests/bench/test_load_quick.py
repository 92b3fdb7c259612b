"""bench/load.py with a handful of clients: every client registers, beats, and the plan sees them all."""

from __future__ import annotations

import math
import re

import pytest

from bench.load import main

LINE = re.compile(
    r"^clients=(\d+) heartbeat_p99_ms=(\S+) register_p99_ms=(\S+) plan_ms=(\S+) server_rss_mib=(\S+)$", re.M
)


@pytest.mark.slow
def test_a_small_load_run_reports_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    """Ten clients for three seconds: the last line parses, with finite latencies, a plan time and the server's RSS."""
    assert main(["--clients", "10", "--seconds", "3", "--join-rate", "50"]) == 0
    out = capsys.readouterr().out
    (line,) = LINE.findall(out)
    clients, heartbeat, register, plan, rss = line
    assert int(clients) == 10 and "failures none" in out
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in (heartbeat, register, plan, rss))
