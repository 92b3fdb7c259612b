"""bench/heterogeneity.py in pieces: the runs it asks for, how it reads a run's idle figures, its last line, its data.

A whole configuration starts a server and four client processes and takes minutes on the shared
2-core machines, longer than a quick test may; the system itself (local work, idle accounting over
real processes) is tested in tests/server (test_dashboard.py runs a time-budget run on its
federation). Here the benchmark's own logic is checked, and the CPU shares on a real process when
this machine lets us write cgroups.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.heterogeneity import (
    CONFIGS,
    CpuShares,
    HeterogeneityResult,
    HeterogeneitySettings,
    Outcome,
    owner_idle,
    prepare_data,
    run_spec,
    training_seconds,
)
from server.training.spec import spec_from_mapping

LINE = re.compile(
    r"idle_s1=(\S+) idle_s2a=(\S+) idle_s2b=(\S+) idle_s3=(\S+) wall_s1=(\S+) wall_s2a=(\S+) wall_s2b=(\S+) wall_s3=(\S+) "
    r"ppl_s1=(\S+) ppl_s2a=(\S+) ppl_s2b=(\S+) ppl_s3=(\S+) smha25_wall_pct=(\S+) smha25_ppl_pct=(\S+)"
)
OWNERS = ["owner0", "owner1", "owner2", "owner3"]


def test_every_strategy_is_a_valid_run_file_of_its_local_work() -> None:
    """The non-SMHA configurations are run files the server accepts, with the poster's strategies as local work."""
    settings = HeterogeneitySettings(steps=8, batch_size=4)
    modes = {}
    for config in ("s1", "s2a", "s2b", "s3", "homogeneous"):
        spec = spec_from_mapping(run_spec(config, settings, "/models/m", OWNERS))
        modes[config] = (
            spec.local_work.mode,
            spec.local_work.batch,
            spec.local_work.accumulate,
            spec.local_work.samples,
        )
        assert spec.participation.mode == "parallel" and spec.rounds == settings.rounds
    assert modes == {"s1": ("steps", "device", True, 0), "s2a": ("samples", "run", True, 32),
                     "s2b": ("samples", "run", False, 32), "s3": ("time", "device", True, 0),
                     "homogeneous": ("steps", "device", True, 0)}  # fmt: skip


def test_smha_configurations_use_the_heads_keys() -> None:
    """SMHA rows ask for [finetune] mode "heads": 1/4 or 1/2 of the heads, or per owner with the fastest training all."""
    settings = HeterogeneitySettings()
    assert run_spec("smha25", settings, "m", OWNERS)["finetune"]["head_fraction"] == 0.25
    assert run_spec("smha50", settings, "m", OWNERS)["finetune"]["head_fraction"] == 0.5
    per_owner = run_spec("s3_smha", settings, "m", OWNERS)
    assert per_owner["local_work"]["mode"] == "time"
    assert per_owner["finetune"]["head_fractions"] == {
        "owner0": 0.25,
        "owner1": 0.25,
        "owner2": 0.5,
        "owner3": 1.0,
    }
    with pytest.raises(ValueError, match="--configs"):
        HeterogeneitySettings(configs=("s4",))
    assert set(CONFIGS) >= set(HeterogeneitySettings().configs)


def test_smha_configurations_are_run_files_the_server_accepts() -> None:
    """Every SMHA row parses as a run file in heads mode and passes the check that one owner trains every head."""
    settings = HeterogeneitySettings(steps=8, batch_size=4)
    for config in ("smha25", "smha50", "s1_smha", "s3_smha"):
        spec = spec_from_mapping(run_spec(config, settings, "/models/m", OWNERS))
        assert spec.finetune.mode == "heads"
        spec.finetune.check_owners(OWNERS)  # raises when no owner trains all heads
        assert spec.finetune.fraction_of("owner3") == 1.0
    assert spec_from_mapping(run_spec("smha25", settings, "m", OWNERS)).finetune.fraction_of("owner0") == 0.25


def test_idle_is_weighted_by_round_length_and_the_line_has_every_key() -> None:
    """An owner's idle ratio is its idle seconds over the rounds' training seconds; the line names every figure."""
    run = {"per_round": [
        {"idle": {"owner0": {"idle": 0.5, "wall_s": 2.0}, "owner1": {"idle": 0.0, "wall_s": 2.0}}},
        {"idle": {"owner0": {"idle": 0.0, "wall_s": 6.0}, "owner1": {"idle": 0.25, "wall_s": 6.0}}},
    ]}  # fmt: skip
    idle = owner_idle(run, ["owner0", "owner1"])
    assert idle == {"owner0": pytest.approx(1 / 8), "owner1": pytest.approx(1.5 / 8)}
    assert training_seconds(run) == 8.0
    result = HeterogeneityResult()
    for name, wall, ppl in (("s1", 10.0, 5.0), ("s3", 8.0, 4.0), ("smha25", 7.5, 5.5)):
        result.outcomes[name] = Outcome(
            wall_s=wall, train_s=wall, idle=0.01, idle_per_owner=idle, ppl=ppl, steps={}, samples={}
        )
    match = LINE.fullmatch(result.summary_line())
    assert match is not None, result.summary_line()
    assert float(match.group(13)) == pytest.approx(-25.0) and float(match.group(14)) == pytest.approx(10.0)
    assert math.isnan(float(match.group(2))) and float(match.group(8)) == 8.0
    assert "config" in result.table()


def test_one_text_file_is_cut_into_four_owners(tmp_path: Path) -> None:
    """--data FILE.txt: four contiguous pieces cut at line ends, every character kept."""
    text = "".join(f"line {i}\n" for i in range(40))
    source = tmp_path / "all.txt"
    source.write_text(text)
    parts = prepare_data(HeterogeneitySettings(data=str(source)), tmp_path / "owners")
    assert len(parts) == 4 and "".join(p.read_text() for p in parts) == text
    assert all(p.read_text().endswith("\n") or p == parts[-1] for p in parts)


def test_cpu_shares_hold_a_process_to_its_quota() -> None:
    """A busy child process in a cgroup of 0.05 core uses about that much CPU (needs root and the cgroup cpu controller)."""
    shares = CpuShares("test")
    if shares.root is None:
        pytest.skip("no writable cgroup cpu controller here")
    busy = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"]
    )
    try:
        if not shares.limit("busy", busy.pid, 0.05):
            pytest.skip("this machine does not let us write cgroups")
        import os

        before = os.times()
        busy.wait(30)
        after = os.times()
        used = (after.children_user + after.children_system) - (before.children_user + before.children_system)
        assert (
            used < 0.5
        )  # 3 s of wall time at 0.05 core: about 0.15 s of CPU, far below the 3 s it would use unheld
    finally:
        if busy.poll() is None:
            busy.kill()
        busy.wait(5)
        shares.close()
