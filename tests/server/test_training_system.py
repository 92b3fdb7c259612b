"""Training runs over the real system: a server and client processes on loopback train a tiny model.

Every test starts ``titanic-server run`` and ``titanic-client run`` processes, starts a run
with ``titanic-server runs start FILE``, waits for it through the admin API, and checks the
checkpoints the server wrote against what the owners reported.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .support import (
    ADMIN_TOKEN,
    REPO_ROOT,
    Process,
    admin,
    client_args,
    processes,
    spawn,
    start_server,
    wait_until,
)

SEQ_LEN = 32
VAL_FRACTION = 0.2
SEED = 3
STEPS = 3
BATCH = 4
HELPER_FLAGS = ["--device", "cpu", "--declare-upload-bytes-per-s", "1e8", "--declare-download-bytes-per-s", "1e8",
                "--declare-rtt-s", "0.001"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (4 blocks) with the real GPT-2 tokenizer, saved as a Hugging Face directory."""
    import torch
    from transformers import AutoModelForCausalLM

    from autograd_bridge.models import gpt2_tokenizer, save_pretrained_dir, tiny_config

    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tokenizer)))
    path = tmp_path_factory.mktemp("model")
    save_pretrained_dir(model, tokenizer, path)
    return path


@pytest.fixture(scope="module")
def owner_data(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two owners' KJV books (split by book, non-IID)."""
    from testbed.demo_data import write_owner_splits

    splits = write_owner_splits(tmp_path_factory.mktemp("data"), 2, max_chars_per_owner=10_000)
    return [s.path for s in splits]


@dataclass
class Cluster:
    """A running server and its clients."""

    server: Process
    admin_url: str
    state_dir: Path
    port: int  # the control plane's, fixed so clients find a restarted server
    started: list[Process]

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "server.cli", *args, "--admin", self.admin_url, "--token", ADMIN_TOKEN],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def run_to_end(self, run_file: Path, *flags: str, timeout_s: float = 300) -> dict[str, Any]:
        """Start a run with ``runs start`` and wait until it is done; returns its final state."""
        try:
            wait_until(lambda: admin(self.admin_url, "/v1/plan")["state"] == "connected", 120, "a connected plan")
        except TimeoutError as exc:
            raise AssertionError(f"no connected plan: {admin(self.admin_url, '/v1/plan')}") from exc
        run_id = json.loads(self.cli("runs", "start", str(run_file), *flags, "--json"))["run_id"]

        def finished() -> dict[str, Any] | None:
            run = admin(self.admin_url, f"/v1/runs/{run_id}")
            assert run["state"] not in ("failed", "stopped"), run["error"] + "\n" + self.server.output()[-3000:]
            return run if run["state"] == "done" else None

        result: dict[str, Any] = wait_until(finished, timeout_s, "the run to finish", interval_s=0.5)
        return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_process(
    state_dir: Path, model_dir: Path, port: int, stages: int = 3, extra: Sequence[str] = ()
) -> tuple[Process, str]:
    server, _, admin_url = start_server(
        state_dir, "--model", str(model_dir), "--stages", str(stages), "--port", str(port), *extra,
        "--heartbeat-interval", "0.4", "--heartbeat-timeout", "5", "--settle", "0.5",
    )
    return server, admin_url


@contextlib.contextmanager
def cluster(
    tmp_path: Path, model_dir: Path, owners: Mapping[str, Path], helpers: int, helper_capacity: int = 1, stages: int = 3,
    server_flags: Sequence[str] = (),
) -> Iterator[Cluster]:
    """A server planning ``stages`` stages, one client per owner (with its data) and ``helpers`` helper clients."""
    port = free_port()
    with processes() as started:
        server, admin_url = server_process(tmp_path / "state", model_dir, port, stages, server_flags)
        started.append(server)
        control = f"127.0.0.1:{port}"
        for name, data in owners.items():
            started.append(spawn(name, "client.cli", *client_args(control, name, tmp_path / name, "--data", str(data))))
        for i in range(helpers):
            flags = [*HELPER_FLAGS, "--declare-flops-per-s", f"{5e10 / (i + 1):g}", "--capacity", str(helper_capacity)]
            started.append(spawn(f"helper{i}", "client.cli", *client_args(control, f"helper{i}", tmp_path / f"h{i}", *flags)))
        yield Cluster(server=server, admin_url=admin_url, state_dir=tmp_path / "state", port=port, started=started)


def write_run(path: Path, model_dir: Path, **values: object) -> Path:
    """A run file with this module's settings and ``values``."""
    settings: dict[str, object] = {
        "rounds": 2, "steps_per_round": STEPS, "batch_size": BATCH, "seq_len": SEQ_LEN, "lr": 3e-3, "seed": SEED,
        "val_fraction": VAL_FRACTION, "tokenizer": str(model_dir), **values,
    }
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    return path


def dataset(checkpoint: Path, data: Path) -> Any:
    from transformers import AutoTokenizer

    from client.data import DataSettings, OwnerDataset

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return OwnerDataset.from_path(data, tokenizer, settings=DataSettings(seq_len=SEQ_LEN, val_fraction=VAL_FRACTION, seed=SEED))


def validation_ppl(model: Any, data: Any) -> float:
    """Perplexity of ``model`` on an owner's validation split, computed here in one process."""
    from autograd_bridge.partition import even_stage_specs, split_model
    from autograd_bridge.pipeline import Pipeline
    from autograd_bridge.runtime import EventLoopThread
    from client.training import evaluate

    whole = split_model(model, even_stage_specs(int(model.config.num_hidden_layers), 1))[0]
    with EventLoopThread() as runtime:
        pipeline = Pipeline([whole], runtime)
        _, ppl = evaluate(pipeline, data, 8)
        pipeline.close()
    return ppl


def centralized_losses(model_dir: Path, batches: list[Any], lr: float = 3e-3, optimizer: str = "adamw") -> list[float]:
    """The loss of each batch, before its update, when one process trains the whole model on them in order."""
    import torch
    from transformers import AutoModelForCausalLM

    from autograd_bridge.partition import causal_lm_loss

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    kind = torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW
    step = kind(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for batch in batches:
        loss = causal_lm_loss(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels)
        loss.backward()
        step.step()
        step.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def owner_batches(model_dir: Path, data: Path, round_: int) -> list[Any]:
    """The batches an owner trains in round ``round_`` (1-based)."""
    import itertools

    stream = dataset(model_dir, data).stream(BATCH, start=(round_ - 1) * STEPS)
    return list(itertools.islice(stream, STEPS))


def load_model(folder: Path, model_dir: Path, adapter: bool) -> Any:
    from transformers import AutoModelForCausalLM

    if not adapter:
        return AutoModelForCausalLM.from_pretrained(folder)
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), folder).merge_and_unload()


@pytest.mark.slow
def test_case1_trains_to_completion_and_checkpoints_load(tmp_path: Path, model_dir: Path, owner_data: list[Path]) -> None:
    """A case-1 run trains every round; each checkpoint loads and reproduces the owner's reported perplexity."""
    run_file = write_run(tmp_path / "run.toml", model_dir, case=1, rounds=3)
    with cluster(tmp_path, model_dir, {"owner": owner_data[0]}, helpers=2) as c:
        run = c.run_to_end(run_file, "--rounds", "2")
        listed = c.cli("runs")
        shown = c.cli("runs", "show", run["run_id"])
    assert run["run_id"] in listed and "done" in listed and "ppl (weighted)" in shown
    history = run["history"]
    assert [h["round"] for h in history] == [1, 2]
    assert all(len(h["losses"]) == STEPS and h["samples"] == STEPS * BATCH for h in history)
    assert history[1]["losses"][-1] < history[0]["losses"][0]
    # Split training over the network is centralized training on the same batches (fp32 rounding).
    want = centralized_losses(model_dir, owner_batches(model_dir, owner_data[0], 1) + owner_batches(model_dir, owner_data[0], 2))
    got = history[0]["losses"] + history[1]["losses"]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-5
    assert len(run["checkpoints"]) == 2
    for h, folder in zip(history, run["checkpoints"], strict=True):
        data = dataset(Path(folder), owner_data[0])
        ppl = validation_ppl(load_model(Path(folder), model_dir, adapter=False), data)
        assert math.isclose(ppl, h["ppl"], rel_tol=1e-4)


@pytest.mark.slow
def test_case3_lora_merges_the_owners_adapters_by_samples(tmp_path: Path, model_dir: Path, owner_data: list[Path]) -> None:
    """In case 3 with LoRA, each round's checkpoint holds the sample-weighted mean of the owners' uploaded adapters."""
    import torch
    from safetensors.torch import load_file

    from server.training.run_manager import from_peft_names

    run_file = write_run(tmp_path / "run.toml", model_dir, case=3, finetune="lora", lora_r=4, lr=1e-2)
    owners = {"alice": owner_data[0], "bob": owner_data[1]}
    with cluster(tmp_path, model_dir, owners, helpers=2) as c:
        run = c.run_to_end(run_file)
    assert [(h["round"], h["owner"]) for h in sorted(run["history"], key=lambda h: (h["round"], h["owner"]))] == [
        (1, "alice"), (1, "bob"), (2, "alice"), (2, "bob")
    ]
    assert all(set(r["owners"]) == {"alice", "bob"} and r["ppl"] > 0 for r in run["per_round"])
    for round_, folder in enumerate(run["checkpoints"], start=1):
        merged = from_peft_names(load_file(Path(folder) / "adapter_model.safetensors"))
        assert merged and all("lora_" in name for name in merged)
        copies, weights = [], []
        for h in (h for h in run["history"] if h["round"] == round_):
            uploads = c.state_dir / "weights" / "uploads" / h["bridge_run"]
            state: dict[str, torch.Tensor] = {}
            for path in uploads.glob(f"p*-r{round_}-*.safetensors"):
                state.update(load_file(path))
            # Uploads carry the holders' AdamW state too; the merge averages only the adapters.
            assert any(n.startswith("optimizer/exp_avg/") for n in state)
            copies.append({n: t for n, t in state.items() if not n.startswith("optimizer/")})
            weights.append(h["data_samples"])
        assert set(copies[0]) == set(merged)
        for name, value in merged.items():
            expected = sum(w * copy[name] for w, copy in zip(weights, copies, strict=True)) / sum(weights)
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        assert any(not torch.equal(copies[0][n], copies[1][n]) for n in merged)  # the owners trained differently
    model = load_model(Path(run["checkpoints"][-1]), model_dir, adapter=True)
    assert math.isfinite(validation_ppl(model, dataset(Path(run["checkpoints"][-1]), owner_data[0])))


@pytest.mark.slow
def test_case2_hands_the_model_from_owner_to_owner(tmp_path: Path, model_dir: Path, owner_data: list[Path]) -> None:
    """In case 2 the owners train in turn (model and AdamW state handed over) exactly like one process on their batches in order."""
    run_file = write_run(tmp_path / "run.toml", model_dir, case=2, rounds=2)
    owners = {"alice": owner_data[0], "bob": owner_data[1]}
    with cluster(tmp_path, model_dir, owners, helpers=2) as c:
        run = c.run_to_end(run_file)
    history = run["history"]
    assert [(h["round"], h["owner"]) for h in history] == [(1, "alice"), (1, "bob"), (2, "alice"), (2, "bob")]
    assert history[0]["bridge_run"] != history[1]["bridge_run"]
    batches = [b for h in history for b in owner_batches(model_dir, owners[h["owner"]], h["round"])]
    want = centralized_losses(model_dir, batches)
    got = [x for h in history for x in h["losses"]]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-5
    folder = run["checkpoints"][-1]
    model = load_model(Path(folder), model_dir, adapter=False)
    ppl = validation_ppl(model, dataset(Path(folder), owner_data[1]))
    assert math.isclose(ppl, history[-1]["ppl"], rel_tol=1e-4)


@pytest.mark.slow
def test_a_restarted_server_resumes_from_the_last_checkpoint(tmp_path: Path, model_dir: Path, owner_data: list[Path]) -> None:
    """After a restart, ``runs start --resume`` continues with round 2 from round 1's checkpoint and data position."""
    from autograd_bridge.partition import causal_lm_loss

    run_file = write_run(tmp_path / "run.toml", model_dir, case=1, rounds=2)
    with cluster(tmp_path, model_dir, {"owner": owner_data[0]}, helpers=1) as c:
        first = c.run_to_end(run_file, "--rounds", "1")
        assert c.server.terminate() == 0
        c.server, c.admin_url = server_process(c.state_dir, model_dir, c.port)
        c.started.append(c.server)
        resumed = c.run_to_end(run_file, "--resume", first["run_id"])
    assert resumed["run_id"] == first["run_id"] and resumed["resumed_from"] == 1
    assert [h["round"] for h in resumed["history"]] == [1, 2] and len(resumed["checkpoints"]) == 2
    # The first step of round 2 is computed before any update: it is the round-1 checkpoint's
    # loss on the owner's batch number STEPS, so the pipeline started from that checkpoint.
    folder = Path(first["checkpoints"][0])
    model = load_model(folder, model_dir, adapter=False)
    batch = next(dataset(folder, owner_data[0]).stream(BATCH, start=STEPS))
    import torch

    with torch.no_grad():
        expected = float(causal_lm_loss(model(batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels))
    assert math.isclose(resumed["history"][1]["losses"][0], expected, rel_tol=1e-4)
    # The AdamW state came back with the checkpoint: the two rounds, interrupted by the
    # restart, are the loss curve of one uninterrupted process.
    want = centralized_losses(model_dir, owner_batches(model_dir, owner_data[0], 1) + owner_batches(model_dir, owner_data[0], 2))
    got = resumed["history"][0]["losses"] + resumed["history"][1]["losses"]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-5


@pytest.mark.slow
def test_case3_fedadam_steps_from_the_round_zero_snapshot(tmp_path: Path, model_dir: Path, owner_data: list[Path]) -> None:
    """With aggregator = "fedadam" each checkpoint is FedAdam's step from the previous global state, the first from round 0's upload."""
    import torch
    from safetensors.torch import load_file

    from server.training.aggregation import ClientUpdate, FedAdam
    from server.training.run_manager import from_peft_names

    def uploaded(bridge_run: str, round_: int) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for path in (c.state_dir / "weights" / "uploads" / bridge_run).glob(f"p*-r{round_}-*.safetensors"):
            state.update({n: t for n, t in load_file(path).items() if not n.startswith("optimizer/")})
        return state

    server = {"server_lr": 0.02, "server_beta1": 0.8, "server_beta2": 0.95, "server_tau": 1e-3}
    run_file = write_run(tmp_path / "run.toml", model_dir, case=3, finetune="lora", lora_r=4, lr=1e-2, aggregator="fedadam", **server)
    owners = {"alice": owner_data[0], "bob": owner_data[1]}
    with cluster(tmp_path, model_dir, owners, helpers=2) as c:
        run = c.run_to_end(run_file)
    assert [h["round"] for h in run["history"]].count(2) == 2 and len(run["checkpoints"]) == 2
    runs = sorted({h["bridge_run"] for h in run["history"]})
    snapshots = [s for s in (uploaded(r, 0) for r in runs) if s]
    assert len(snapshots) == 1, "exactly one pipeline (the first) uploads the starting state"
    reference = snapshots[0]
    fedadam = FedAdam(lr=0.02, beta1=0.8, beta2=0.95, tau=1e-3)
    for round_, folder in enumerate(run["checkpoints"], start=1):
        merged = from_peft_names(load_file(Path(folder) / "adapter_model.safetensors"))
        assert set(merged) == set(reference) and all("lora_" in name for name in merged)
        updates = [
            ClientUpdate(state=uploaded(h["bridge_run"], round_), num_samples=h["data_samples"], client_id=h["owner"])
            for h in run["history"] if h["round"] == round_
        ]
        expected = fedadam.aggregate(reference, updates)  # the moments carry over into round 2, as on the server
        for name, value in merged.items():
            torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-7)
        assert any(not torch.equal(merged[n], reference[n]) for n in merged)  # the step moved the adapters
        reference = merged


@pytest.mark.slow
def test_a_client_serving_several_pipelines_keeps_their_state_apart(
    tmp_path: Path, model_dir: Path, owner_data: list[Path]
) -> None:
    """With one helper, a client hosts middle stages of both owners' pipelines, and each pipeline trains as if alone."""
    run_file = write_run(tmp_path / "run.toml", model_dir, case=3, rounds=1)
    owners = {"alice": owner_data[0], "bob": owner_data[1]}
    with cluster(tmp_path, model_dir, owners, helpers=1, helper_capacity=2) as c:
        run = c.run_to_end(run_file)
        plan = admin(c.admin_url, "/v1/plan")
    pipelines_of: dict[str, set[str]] = {}
    for row in plan["rows"]:
        if not row["local"]:
            pipelines_of.setdefault(row["client_id"], set()).add(row["run_id"])
    assert any(len(runs) == 2 for runs in pipelines_of.values()), plan["rows"]
    # Round 1 of case 3 starts every pipeline from the same weights: each owner's loss curve
    # is one process training on that owner's batches alone, unless activations, gradients
    # or optimizer state leaked between the pipelines on the shared client.
    for h in run["history"]:
        want = centralized_losses(model_dir, owner_batches(model_dir, owners[h["owner"]], 1))
        assert max(abs(a - b) for a, b in zip(h["losses"], want, strict=True)) < 1e-5, h["owner"]


@pytest.mark.slow
def test_a_run_can_train_with_sgd_on_every_stage(tmp_path: Path, model_dir: Path, owner_data: list[Path]) -> None:
    """``optimizer = "sgd"`` reaches the owner's ends and the hosts alike: the curve is one process's SGD, not AdamW's."""
    run_file = write_run(tmp_path / "run.toml", model_dir, case=1, rounds=1, optimizer="sgd", lr=0.5)
    with cluster(tmp_path, model_dir, {"owner": owner_data[0]}, helpers=1) as c:
        run = c.run_to_end(run_file)
    got = run["history"][0]["losses"]
    batches = owner_batches(model_dir, owner_data[0], 1)
    assert max(abs(a - b) for a, b in zip(got, centralized_losses(model_dir, batches, 0.5, "sgd"), strict=True)) < 1e-5
    assert max(abs(a - b) for a, b in zip(got, centralized_losses(model_dir, batches, 0.5, "adamw"), strict=True)) > 1e-3


@pytest.mark.slow
def test_a_round_of_a_thousand_steps_reports_every_step(tmp_path: Path, model_dir: Path, owner_data: list[Path]) -> None:
    """A 1,000-step round comes back whole: every step's loss, tokens, time, and bridge bytes to the helper's stage.

    Before the typed RoundReport the metrics travelled as JSON in a status message cut to
    4,096 characters, and a round of a few hundred steps failed the run.
    """
    steps = 1000
    run_file = write_run(tmp_path / "run.toml", model_dir, case=1, rounds=1, steps_per_round=steps, batch_size=1,
                         seq_len=8, lr=1e-3)  # fmt: skip
    with cluster(tmp_path, model_dir, {"owner": owner_data[0]}, helpers=1) as c:
        run = c.run_to_end(run_file, timeout_s=600)
        shown = c.cli("runs", "show", run["run_id"])
    (entry,) = run["history"]
    assert len(entry["losses"]) == len(entry["tokens"]) == len(entry["step_times"]) == steps
    assert all(math.isfinite(x) for x in entry["losses"]) and all(t > 0 for t in entry["tokens"])
    # The helper hosts the middle stage: activations went to it and gradients came back every step.
    assert set(entry["bytes_sent"]) == {"1"} and entry["bytes_sent"]["1"] > 0 and entry["bytes_received"]["1"] > 0
    assert entry["samples"] == steps and entry["ppl"] > 0 and run["run_id"] in shown
    # While the round trained, the owner's progress reports drew the same curve step by step.
    live = run["live"]["owner"]
    assert live["round"] == 1 and live["done"] == steps and live["losses"] == entry["losses"]


@pytest.mark.slow
def test_an_owner_alone_trains_the_whole_model_as_a_one_stage_pipeline(
    tmp_path: Path, model_dir: Path, owner_data: list[Path]
) -> None:
    """With one stage planned, the owner holds the whole model, no bridge bytes flow, and training is centralized training."""
    run_file = write_run(tmp_path / "run.toml", model_dir, case=1, rounds=1, stages=1)
    with cluster(tmp_path, model_dir, {"owner": owner_data[0]}, helpers=0, stages=1) as c:
        run = c.run_to_end(run_file)
        plan = admin(c.admin_url, "/v1/plan")
    assert [(r["client_id"], r["partition"], r["local"]) for r in plan["rows"]] == [("owner", 0, True)]
    (entry,) = run["history"]
    assert entry["bytes_sent"] == {} and len(entry["losses"]) == STEPS
    want = centralized_losses(model_dir, owner_batches(model_dir, owner_data[0], 1))
    assert max(abs(a - b) for a, b in zip(entry["losses"], want, strict=True)) < 1e-5


@pytest.mark.slow
def test_pretraining_from_scratch_with_a_schedule_and_clipping_is_centralized_training(
    tmp_path: Path, model_dir: Path, owner_data: list[Path]
) -> None:
    """A model drawn from its config by the server, a cosine schedule with warm-up that continues across rounds, and
    joint gradient clipping over the owner's and the helpers' stages: the split run's losses are one process's."""
    import itertools

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from autograd_bridge.optim import lr_at
    from autograd_bridge.partition import causal_lm_loss

    config_dir = tmp_path / "config"
    AutoConfig.from_pretrained(model_dir).save_pretrained(config_dir)  # the config alone: no weights to start from
    run_file = tmp_path / "run.toml"
    run_file.write_text(
        f'rounds = 2\nseed = {SEED}\ntokenizer = "{model_dir}"\n'
        f'[participation]\nmode = "single"\n[local_work]\nsteps = {STEPS}\n'
        f'[training]\nbatch_size = {BATCH}\nseq_len = {SEQ_LEN}\nlr = 3e-3\nschedule = "cosine"\nwarmup_steps = 2\n'
        f'min_lr = 3e-4\nclip_norm = 0.5\n[evaluation]\nval_fraction = {VAL_FRACTION}\n'
    )
    flags = ["--init", "random", "--init-seed", "7"]
    with cluster(tmp_path, config_dir, {"owner": owner_data[0]}, helpers=2, server_flags=flags) as c:
        run = c.run_to_end(run_file)
    got = [x for h in sorted(run["history"], key=lambda h: h["round"]) for x in h["losses"]]
    lrs = [x for h in sorted(run["history"], key=lambda h: h["round"]) for x in h["lrs"]]

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    want, want_lrs = [], []
    stream = dataset(model_dir, owner_data[0]).stream(BATCH, start=0)
    for step, batch in enumerate(itertools.islice(stream, 2 * STEPS)):
        lr = lr_at("cosine", step, lr=3e-3, warmup_steps=2, total_steps=2 * STEPS, min_lr=3e-4)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = causal_lm_loss(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        want.append(loss.item())
        want_lrs.append(lr)
    assert lrs == pytest.approx(want_lrs, rel=1e-12)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-5
    assert all(n > 0 for h in run["history"] for n in h["grad_norms"])
    # Photon's signals: a merge per round, the second moving the model the first merged.
    signals = run["signals"]
    assert [s["round"] for s in signals] == [1, 2] and all(s["model"]["total"] > 0 for s in signals)
    assert signals[1]["update"]["total"] > 0 and all(n > 0 for h in run["history"] for n in h["output_norms"])


@pytest.mark.slow
def test_floss_sparse_changes_step_fedadam(tmp_path: Path, model_dir: Path, owner_data: list[Path]) -> None:
    """FLoSS over real processes: owners upload top-k changes of their adapters, pipelines load top-k of the global ones,
    and each checkpoint is FedAdam's step on the sparse changes' weighted mean; the bytes counted are the files sent."""
    import torch
    from safetensors.torch import load_file

    from autograd_bridge.codecs import decode_update
    from server.training.aggregation import ClientUpdate, FedAdam
    from server.training.run_manager import from_peft_names

    def uploads(bridge_run: str, round_: int) -> tuple[dict[str, torch.Tensor], float]:
        """A pipeline's uploaded changes of a round, and the largest share of entries one partition's file kept."""
        state: dict[str, torch.Tensor] = {}
        densest = 0.0
        for path in (c.state_dir / "weights" / "uploads" / bridge_run).glob(f"p*-r{round_}-*"):
            part = {n: t for n, t in decode_update(path.read_bytes()).items() if not n.startswith("optimizer/")}
            entries = sum(t.numel() for t in part.values())
            if entries:  # top-k ranks a partition's tensors together ([communication] scope = "partition")
                densest = max(densest, sum(int((t != 0).sum()) for t in part.values()) / entries)
            state.update(part)
        return state, densest

    run_file = tmp_path / "run.toml"
    run_file.write_text(
        f'rounds = 2\nseed = {SEED}\ntokenizer = "{model_dir}"\n[participation]\nmode = "parallel"\n'
        f'[local_work]\nsteps = {STEPS}\n[training]\nbatch_size = {BATCH}\nseq_len = {SEQ_LEN}\nlr = 1e-2\n'
        f'[finetune]\nmode = "lora"\nr = 4\n[aggregation]\nrule = "fedadam"\nserver_lr = 0.02\n'
        f'[communication]\ncodec = "topk"\nupload_density = 0.25\ndownload_density = 0.5\noptimizer_state = false\n'
        f'[communication.clients.bob]\nupload_density = 0.1\n[evaluation]\nval_fraction = {VAL_FRACTION}\n'
    )
    owners = {"alice": owner_data[0], "bob": owner_data[1]}
    with cluster(tmp_path, model_dir, owners, helpers=2) as c:
        run = c.run_to_end(run_file)
        runs = sorted({h["bridge_run"] for h in run["history"]})
        snapshots = [s for s, _ in (uploads(r, 0) for r in runs) if s]
        assert len(snapshots) == 1, "the first pipeline uploads the starting adapters, whole"
        reference = snapshots[0]
        sent = sum(f.stat().st_size for r in runs for f in (c.state_dir / "weights" / "uploads" / r).glob("p*-r1-*"))
        fedadam = FedAdam(lr=0.02)
        for round_, folder in enumerate(run["checkpoints"], start=1):
            merged = from_peft_names(load_file(Path(folder) / "adapter_model.safetensors"))
            updates = []
            for h in (h for h in run["history"] if h["round"] == round_):
                changes, densest = uploads(h["bridge_run"], round_)
                assert densest <= 0.25 + 1e-3, (h["owner"], densest)  # bob's own partitions send 0.1, the others 0.25
                updates.append(ClientUpdate(state=changes, num_samples=h["data_samples"], client_id=h["owner"], delta=True))
            expected = fedadam.aggregate(reference, updates)
            for name, value in merged.items():
                torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-7)
            reference = merged
    # What each client uploaded and downloaded per round is counted, and sparse uploads are far below dense ones.
    uploaded = {r: sum(t["uploaded"] for t in run["traffic"] if t["round"] == r) for r in (0, 1, 2)}
    downloaded = {r: sum(t["downloaded"] for t in run["traffic"] if t["round"] == r) for r in (1, 2)}
    dense = sum(t.numel() * 4 for t in snapshots[0].values())  # the whole adapters, fp32: what round 0 sent
    assert uploaded[0] >= dense and downloaded[1] == 0 and downloaded[2] > 0  # round 1 starts from the snapshot
    assert uploaded[1] == sent  # the bytes counted are the bytes that arrived
    # Two pipelines each send a quarter (bob's ends a tenth) of their entries: well below their dense adapters,
    # file headers included (measured 0.40 of dense on this tiny model), and downloads keep half.
    assert 0 < uploaded[1] < 0.5 * (2 * dense) and downloaded[2] < 0.8 * (2 * dense)


@pytest.mark.slow
def test_a_chained_run_trains_exactly_as_one_process(tmp_path: Path, model_dir: Path, owner_data: list[Path]) -> None:
    """``[training] path = "chain"`` over two helpers (K = 4): hosts hand activations on; losses are centralized training's."""
    run_file = write_run(tmp_path / "run.toml", model_dir, case=1, rounds=1)
    run_file.write_text(run_file.read_text() + '\n[training]\npath = "chain"\nmicro_batches = 2\n')
    with cluster(tmp_path, model_dir, {"owner": owner_data[0]}, helpers=2, stages=4) as c:
        run = c.run_to_end(run_file)
        plan = admin(c.admin_url, "/v1/plan")
    assert sorted({r["client_id"] for r in plan["rows"] if not r["local"]}) == ["helper0", "helper1"]
    assert set(plan["summary"]["est_step_s"]["owner"]) == {"relay", "chain"}
    entry = run["history"][0]
    assert entry["path"] == "chain" and entry["est_step_s"] == plan["summary"]["est_step_s"]["owner"]["chain"]
    want = centralized_losses(model_dir, owner_batches(model_dir, owner_data[0], 1))
    assert max(abs(a - b) for a, b in zip(entry["losses"], want, strict=True)) < 1e-5
