"""bench/forward_gradient.py in a reduced configuration: the line parses, seeds upload less, memory probes run in fresh processes."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from bench.forward_gradient import FwdBenchSettings, run_comparison

LINE = re.compile(
    r"mem_reduction=(\S+) mem_reduction_vs_ckpt=(\S+) upload_reduction=(\S+) ppl_base=(\S+) ppl_bp=(\S+) "
    r"ppl_fwd=(\S+) rounds_to_bp=(none|\d+)"
)


@pytest.mark.slow
def test_reduced_comparison_measures_every_figure(tmp_path: Path) -> None:
    """Tiny models throughout: each figure of the last line is measured, finite, and where the method says so, ordered."""
    from transformers import AutoModelForCausalLM

    from autograd_bridge.models import tiny_config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(tmp_path / "tiny")
    settings = FwdBenchSettings(
        owners=2, rounds=2, steps=2, batch_size=2, seq_len=32, max_chars_per_owner=6_000, tiny_layers=2, tiny_width=32,
        base_steps=10, eval_batch_size=32, perturbations=2, max_perturbations=4, candidates=3,
        methods=("bp", "fwd_fixed", "fwd_sampler"), memory_model=str(tmp_path / "tiny"), memory_batch=2,
        memory_seq=32, memory_steps=1,
    )  # fmt: skip
    record = tmp_path / "memory.json"
    result = run_comparison(settings, memory_file=record)
    match = LINE.fullmatch(result.summary_line())
    assert match is not None, result.summary_line()
    assert all(result.memory[m] > 0 for m in ("bp", "bp_ckpt", "fwd"))
    assert json.loads(record.read_text())["bytes"] == result.memory  # a rerun with the file reuses the probes
    assert float(match.group(3)) > 1  # seeds are smaller than the dense change, even for these tiny adapters
    for name, curve in result.curves.items():
        assert len(curve.ppl) == 3 and all(math.isfinite(p) and p > 1 for p in curve.ppl), name
        assert (
            curve.ppl[0] == result.curves["bp"].ppl[0]
        )  # LoRA starts with B = 0: every method starts at the base
    assert result.curves["fwd_sampler"].directions >= result.curves["fwd_fixed"].directions
