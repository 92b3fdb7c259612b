"""Automatic recovery: kill a helper at a random step of a run and let the system recover, N times.

Real processes on loopback: ``titanic-server run`` planning three stages, one data owner
(``titanic-client run --data``) and ``trials + 1`` helpers, so every run needs one helper
for its middle stage and every trial has one left to lose. A run file trains LoRA adapters
(case 1) for ``rounds`` rounds of ``steps`` steps. First one run trains undisturbed (the
reference); then each trial starts the same run, waits until the owner has trained a step
drawn at random (round and step, from ``--seed``), SIGKILLs the helper holding the middle
stage, and waits for the run to finish by itself. Per trial it prints

* ``detect_s``: from the kill until the server named the lost client (the recovery's
  ``detected_at`` in the run's history; the same clock, one machine);
* ``recover_s``: from the kill until training resumed (the replayed round's first
  ``Train`` was sent, after the new plan was delivered, prepared and loaded);
* ``redo_steps``: the owner's steps of the interrupted round, trained again;
* ``final_diff``: the largest absolute difference of the final adapters from the
  reference's.

The last line::

    trials=<n> completed=<n> detect_s_max=<x> recover_s_p50=<x> recover_s_max=<x> redo_steps_mean=<x> final_max_diff=<x>

Targets: ``completed = trials``, ``final_max_diff <= 1e-4``, ``detect_s_max`` within the
heartbeat timeout (``--heartbeat-timeout``; a killed host is usually named at once by its
owner's bridge, well before that).

    python -m bench.recovery --quick              # 2 trials, tiny Llama, 2 rounds x 6 steps
    python -m bench.recovery --trials 5           # 5 trials, 2 rounds x 12 steps
    python -m bench.recovery --model DIR --data PATH
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-recovery-join-token"
ADMIN = "bench-recovery-admin-token"


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoverySettings:
    trials: int = 5
    rounds: int = 2
    steps: int = 12  # optimizer steps per round
    batch_size: int = 2
    seq_len: int = 32
    heartbeat_timeout_s: float = 3.0
    seed: int = 0  # draws the round and step of each kill
    model: str = ""  # a Hugging Face model folder ("": a tiny Llama built here)
    data: str = ""  # a .txt file or folder for the owner ("": KJV books)


@dataclass(frozen=True, slots=True, kw_only=True)
class Trial:
    kill_round: int
    kill_step: int
    victim: str
    completed: bool
    detect_s: float
    recover_s: float
    redo_steps: int
    final_diff: float


class _Proc:
    """A child process whose output is collected by a thread."""

    def __init__(self, name: str, *args: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self.popen = subprocess.Popen(
            [sys.executable, "-m", *args], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


class _Federation:
    """The server and its clients, and the admin API calls the benchmark needs."""

    def __init__(self, work: Path, model: Path, data: Path, settings: RecoverySettings) -> None:
        self.procs: list[_Proc] = []
        port = _free_port()
        timeout = settings.heartbeat_timeout_s
        self.server = self._spawn(
            "server", "server.cli", "run", "--port", str(port), "--admin-port", "0", "--state-dir", str(work / "state"),
            "--join-token", TOKEN, "--admin-token", ADMIN, "--model", str(model), "--stages", "3",
            "--heartbeat-interval", f"{timeout / 10:g}", "--heartbeat-timeout", f"{timeout:g}", "--settle", "0.5",
        )  # fmt: skip
        line = _wait(lambda: next((s for s in self.server.lines if s.startswith("titanic-server ready")), ""), 120,
                     "the server")  # fmt: skip
        self.admin_url = dict(part.split("=", 1) for part in line.split()[2:])["admin"]
        control = f"127.0.0.1:{port}"
        common = ["run", "--server", control, "--token", TOKEN, "--quick-profile", "--reconnect-initial", "0.2",
                  "--reconnect-max", "1"]  # fmt: skip
        self._spawn(
            "owner",
            "client.cli",
            *common,
            "--name",
            "owner",
            "--cache-dir",
            str(work / "owner"),
            "--data",
            str(data),
        )
        self.helpers: dict[str, _Proc] = {}
        for i in range(settings.trials + 1):  # the fastest helper left takes the middle stage
            name = f"helper{i}"
            self.helpers[name] = self._spawn(
                name, "client.cli", *common, "--name", name, "--cache-dir", str(work / name), "--device", "cpu",
                "--declare-flops-per-s", f"{5e10 / (i + 1):g}", "--declare-upload-bytes-per-s", "1e8",
                "--declare-download-bytes-per-s", "1e8", "--declare-rtt-s", "0.001",
            )  # fmt: skip

    def _spawn(self, name: str, *args: str) -> _Proc:
        proc = _Proc(name, *args)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()

    def get(self, route: str) -> Any:
        request = urllib.request.Request(self.admin_url + route, headers={"Authorization": f"Bearer {ADMIN}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def start(self, spec: dict[str, Any]) -> str:
        _wait(lambda: self.get("/v1/plan")["state"] == "connected", 180, "a connected plan", 0.2)
        body = json.dumps({"spec": spec}).encode()
        request = urllib.request.Request(
            self.admin_url + "/v1/runs", data=body, method="POST",
            headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as response:
            return str(json.load(response)["run_id"])

    def finish(self, run_id: str, timeout_s: float = 600) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            run = self.get(f"/v1/runs/{run_id}")
            return run if run["state"] in ("done", "failed", "stopped") else None

        result: dict[str, Any] = _wait(ended, timeout_s, f"{run_id} to end", 0.3)
        return result

    def middle_holder(self) -> str:
        (name,) = {r["client_id"] for r in self.get("/v1/plan")["rows"] if not r["local"]}
        return str(name)


def _adapters(run: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(Path(run["checkpoints"][-1]) / "adapter_model.safetensors")


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    if set(a) != set(b):
        return float("inf")
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def _prepare_inputs(work: Path, settings: RecoverySettings) -> tuple[Path, Path]:
    """The model folder and the owner's data: given, or a tiny Llama with the GPT-2 tokenizer and KJV books."""
    if settings.model:
        model = Path(settings.model)
    else:
        import torch
        from transformers import AutoModelForCausalLM

        from autograd_bridge.models import gpt2_tokenizer, save_pretrained_dir, tiny_config

        tokenizer = gpt2_tokenizer()
        torch.manual_seed(0)
        model = save_pretrained_dir(
            AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tokenizer))),
            tokenizer,
            work / "model",
        )
    if settings.data:
        data = Path(settings.data)
    else:
        from testbed.demo_data import write_owner_splits

        data = write_owner_splits(work / "data", 1, max_chars_per_owner=20_000)[0].path
    return model, data


def run_recovery(settings: RecoverySettings, work: Path, log: Callable[[str], None] = print) -> list[Trial]:
    """The reference run and every trial, on one federation in ``work``."""
    model, data = _prepare_inputs(work, settings)
    spec = {
        "rounds": settings.rounds, "seed": 3, "tokenizer": str(model),
        "local_work": {"steps": settings.steps},
        "training": {"batch_size": settings.batch_size, "seq_len": settings.seq_len, "lr": 1e-2},
        "finetune": {"mode": "lora", "r": 4}, "evaluation": {"val_fraction": 0.2},
    }  # fmt: skip
    draw = random.Random(settings.seed)
    federation = _Federation(work, model, data, settings)
    try:
        began = time.perf_counter()
        reference_run = federation.finish(federation.start(spec))
        if reference_run["state"] != "done":
            raise RuntimeError(
                f"the undisturbed run ended {reference_run['state']}: {reference_run['error']}"
            )
        reference = _adapters(reference_run)
        log(f"reference run: {time.perf_counter() - began:.1f} s")
        trials = []
        for n in range(settings.trials):
            kill_round, kill_step = draw.randint(1, settings.rounds), draw.randint(1, settings.steps - 1)
            run_id = federation.start(spec)

            def reached(
                run_id: str = run_id, kill_round: int = kill_round, kill_step: int = kill_step
            ) -> bool:
                live = federation.get(f"/v1/runs/{run_id}")["live"].get("owner")
                return bool(live) and (live["round"], live["done"]) >= (kill_round, kill_step)

            _wait(reached, 300, f"round {kill_round} step {kill_step}", 0.02)
            victim = federation.middle_holder()
            killed_at = time.time()
            os.kill(federation.helpers[victim].popen.pid, signal.SIGKILL)
            run = federation.finish(run_id)
            lost = [e for e in run["recoveries"] if e.get("lost") == victim]
            done = run["state"] == "done" and bool(lost)
            entry = lost[0] if lost else {}
            trial = Trial(
                kill_round=kill_round, kill_step=kill_step, victim=victim, completed=done,
                detect_s=entry.get("detected_at", float("nan")) - killed_at,
                recover_s=entry.get("resumed_at", float("nan")) - killed_at,
                redo_steps=int(entry.get("steps_redone", 0)),
                final_diff=_max_diff(_adapters(run), reference) if done else float("inf"),
            )  # fmt: skip
            trials.append(trial)
            log(
                f"trial {n + 1}: killed {victim} at round {kill_round} step {kill_step}: {run['state']}, "
                f"detect {trial.detect_s:.3f} s, recover {trial.recover_s:.3f} s, redo {trial.redo_steps} steps, "
                f"final diff {trial.final_diff:.3g}" + ("" if done else f" ({run['error']})")
            )
        return trials
    finally:
        federation.close()


def summary_line(trials: Sequence[Trial]) -> str:
    """The benchmark's last line."""
    done = [t for t in trials if t.completed]

    def fmt(x: float) -> str:
        return f"{x:.4g}"

    nan = float("nan")
    return (
        f"trials={len(trials)} completed={len(done)} "
        f"detect_s_max={fmt(max((t.detect_s for t in done), default=nan))} "
        f"recover_s_p50={fmt(statistics.median([t.recover_s for t in done]) if done else nan)} "
        f"recover_s_max={fmt(max((t.recover_s for t in done), default=nan))} "
        f"redo_steps_mean={fmt(statistics.fmean([t.redo_steps for t in done]) if done else nan)} "
        f"final_max_diff={fmt(max((t.final_diff for t in trials), default=nan))}"
    )


def _parse(argv: Sequence[str] | None) -> RecoverySettings:
    parser = argparse.ArgumentParser(prog="python -m bench.recovery", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, help="helpers killed, one per run (default 5; --quick 2)")
    parser.add_argument("--quick", action="store_true", help="2 trials, 2 rounds x 6 steps")
    parser.add_argument("--model", default="", help="a Hugging Face model folder (default: a tiny Llama)")
    parser.add_argument("--data", default="", help="the owner's .txt file or folder (default: KJV books)")
    parser.add_argument("--steps", type=int, help="steps per round")
    parser.add_argument("--heartbeat-timeout", type=float, dest="heartbeat_timeout_s")
    parser.add_argument("--seed", type=int, default=0, help="draws where each kill happens")
    args = parser.parse_args(argv)
    settings = RecoverySettings(trials=2, steps=6) if args.quick else RecoverySettings()
    changes = {k: v for k, v in vars(args).items() if k not in ("quick",) and v not in (None, "")}
    fields = {k: v for k, v in changes.items() if k in RecoverySettings.__dataclass_fields__}
    settings = RecoverySettings(
        **{**{f: getattr(settings, f) for f in RecoverySettings.__dataclass_fields__}, **fields}
    )
    if settings.trials < 1 or settings.steps < 2:
        parser.error("--trials must be >= 1 and --steps >= 2 (a kill falls between two steps)")
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    settings = _parse(argv)
    with tempfile.TemporaryDirectory(prefix="titanic-bench-recovery-") as tmp:
        trials = run_recovery(settings, Path(tmp))
    print(summary_line(trials))
    return 0 if all(t.completed for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
