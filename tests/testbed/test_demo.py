"""``titanic-server demo --tiny``: a server and four client processes train case 3 with LoRA, offline."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from testbed.demo import DemoSettings, run_demo


@pytest.mark.slow
def test_tiny_demo_trains_and_leaves_a_loadable_model(tmp_path: Path) -> None:
    """The tiny demo finishes every round, its weighted perplexity falls, and the merged model loads."""
    from transformers import AutoModelForCausalLM

    out = io.StringIO()
    run = run_demo(DemoSettings(tiny=True, out=tmp_path / "demo", rounds=2, steps=4, lr=1e-2), stdout=out)
    printed = out.getvalue()
    assert run["state"] == "done" and "ppl (weighted)" in printed and "plan-" in printed
    first, last = run["per_round"][0]["ppl"], run["per_round"][-1]["ppl"]
    assert last < first
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "demo" / "trained-model")
    assert model.config.num_hidden_layers == 4
