"""A mixed federation over real processes: one owner trains with forward gradients, one with backprop.

The server and the clients are real ``titanic-server run`` / ``titanic-client run`` processes
on loopback; the run file gives alice ``forward_gradient`` ([training.methods]) and uploads
through the seeds codec. Alice's middle stage sits on a helper process that must never be
asked for a BACKWARD (it logs the first request of every kind it serves), her uploads are
(seed, coefficient) pairs, and the server merges them with bob's backprop changes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from .test_training_system import BATCH, SEED, SEQ_LEN, STEPS, VAL_FRACTION, cluster, model_dir, owner_data  # noqa: F401

pytestmark = pytest.mark.slow


def _run_file(path: Path, model: Path) -> Path:
    path.write_text(
        f'case = 3\nrounds = 2\nseed = {SEED}\ntokenizer = "{model}"\n'
        f"[local_work]\nsteps = {STEPS}\n"
        f"[training]\nbatch_size = {BATCH}\nseq_len = {SEQ_LEN}\nlr = 1e-2\nclip_norm = 1.0\n"
        '[training.methods]\nalice = "forward_gradient"\n'
        "[forward_gradient]\nperturbations = 2\nmax_perturbations = 4\nvar_threshold = 1e-6\nsampler = true\ncandidates = 3\n"
        '[finetune]\nmode = "lora"\nr = 4\n'
        '[communication]\ncodec = "seeds"\n'
        f"[evaluation]\nval_fraction = {VAL_FRACTION}\n"
    )
    return path


def test_a_mixed_run_trains_alice_without_backward_and_merges_seeded_uploads(
    tmp_path: Path,
    model_dir: Path,  # noqa: F811 (the fixture imported above)
    owner_data: list[Path],  # noqa: F811
) -> None:
    """Both owners finish both rounds; alice's hosts saw PERTURB but no BACKWARD; her uploads are seeds, bob's dense."""
    from safetensors import safe_open

    owners = {"alice": owner_data[0], "bob": owner_data[1]}
    with cluster(tmp_path, model_dir, owners, helpers=2) as c:
        run = c.run_to_end(_run_file(tmp_path / "run.toml", model_dir))
        helper_logs = "".join(p.output() for p in c.started if p.name.startswith("helper"))
    history = sorted(run["history"], key=lambda h: (h["round"], h["owner"]))
    assert [(h["round"], h["owner"]) for h in history] == [(1, "alice"), (1, "bob"), (2, "alice"), (2, "bob")]
    assert all(len(h["losses"]) == STEPS and all(math.isfinite(x) for x in h["losses"]) for h in history)
    assert all(math.isfinite(r["ppl"]) for r in run["per_round"]) and len(run["checkpoints"]) == 2
    runs = {h["owner"]: h["bridge_run"] for h in history}
    asked = {
        run_id: set(re.findall(rf"run {re.escape(run_id)}: first (\w+) request", helper_logs))
        for run_id in runs.values()
    }
    assert "PERTURB" in asked[runs["alice"]] and "APPLY_DIRECTIONAL" in asked[runs["alice"]]
    assert (
        not {"BACKWARD", "FORWARD"} & asked[runs["alice"]]
    )  # evaluation forwards only: nothing kept to backprop
    assert "BACKWARD" in asked[runs["bob"]]
    tags = {}
    for owner, bridge_run in runs.items():
        for path in (c.state_dir / "weights" / "uploads" / bridge_run).glob("p*-r2-*.safetensors"):
            with safe_open(path, "pt") as f:
                tags.setdefault(owner, set()).add((f.metadata() or {}).get("titanic_codec", "dense"))
    assert tags == {"alice": {"seeds"}, "bob": {"dense"}}
