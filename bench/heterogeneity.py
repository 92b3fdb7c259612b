"""Heterogeneous owners: local-work strategies 1, 2a, 2b and 3 (and SMHA) against homogeneous owners.

Reproduces the table of the poster "Federated LLM Training with Heterogeneous Mobile Clients" over
real processes: a ``titanic-server run`` and four ``titanic-client run`` data owners on loopback,
each owner holding the whole model (one stage: every owner is its own pipeline, parallel
participation, FedAvg over the owners' copies after every round). The owners differ as the
poster's do:

* **speed** 1 : 1 : 2 : 4, as a CPU share: each owner process runs in a cgroup whose CFS quota is
  ``speed x cpu_unit`` of one core (cgroup v1 ``cpu`` or v2 ``cpu.max``, written as root once
  the plan is connected, so start-up runs at full speed); FLOP/s are declared in the same ratio
  (``speed x cpu_unit x`` the FLOP/s one thread of this machine achieves training the model,
  measured by the benchmark), which sizes the time budget of the first round;
* **largest micro-batch** 1 : 2 : 4 : 8, declared (``--declare-max-micro-batch``).

Homogeneous owners all have speed 2 and micro-batch 4: the same total CPU and about the same
total memory. Every configuration starts a fresh federation (a run that follows another on the
same plan would continue from its weights) with the same model, data, rounds and seed:

    s1           [local_work] mode = "steps", batch = "device": the same steps, each at its largest micro-batch
    s2a          mode = "samples", accumulate = true: the same samples in steps of batch_size, micro-batched
    s2b          mode = "samples", accumulate = false: the same samples in steps of each device's micro-batch
    s3           mode = "time", batch = "device": a wall-time budget per round (sized for ``steps`` steps)
    homogeneous  s1 on the homogeneous owners
    smha25 smha50        s1 with [finetune] mode = "heads", head_fraction 1/4 or 1/2 (the fastest owner: all heads)
    s1_smha s3_smha      s1 or s3 with per-owner head fractions 1/4, 1/4, 1/2, 1 (the fastest trains all heads)

Measured per configuration: wall time of the run (from its start to its last checkpoint, bench
clock), the owners' mean idle ratio (bubble + waiting for the round's slowest, of each round's
training time, as the server's idle accounting reports it, averaged over rounds weighted by
their length and then over owners), and the validation perplexity of the final checkpoint on
every owner's held-out sequences (token-weighted), computed in this process.

    python -m bench.heterogeneity --quick --configs s3            # tiny Llama, 2 rounds of 8 steps: about 2 minutes
    for c in s1 s2a s2b s3 homogeneous; do                          # 3 rounds of 16 steps, 4-8 minutes each
        python -m bench.heterogeneity --configs $c --results het.json; done
    python -m bench.heterogeneity --configs smha25,smha50,s1_smha,s3_smha --results het.json

Each configuration starts its own federation, which takes minutes on a busy 2-core machine, so
``--results FILE`` collects configurations over several invocations; the table and the last line
cover every configuration the file holds.

The last line: ``idle_s1=... idle_s2a=... idle_s2b=... idle_s3=... wall_s1=... wall_s2a=...
wall_s2b=... wall_s3=... ppl_s1=... ppl_s2a=... ppl_s2b=... ppl_s3=... smha25_wall_pct=...
smha25_ppl_pct=...`` (idle as a fraction; the SMHA figures are percent changes against s1, nan
when not run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
HETEROGENEOUS = ((1.0, 1), (1.0, 2), (2.0, 4), (4.0, 8))  # (speed, largest micro-batch) per owner
HOMOGENEOUS = ((2.0, 4),) * 4
STRATEGIES = ("s1", "s2a", "s2b", "s3")
SMHA = ("smha25", "smha50", "s1_smha", "s3_smha")
CONFIGS = (*STRATEGIES, "homogeneous", *SMHA)
DEFAULT_CONFIGS = (*STRATEGIES, "homogeneous")
SMHA_FRACTIONS = (0.25, 0.25, 0.5, 1.0)  # per owner, slowest first: the fastest trains every head
ENDED = ("done", "failed", "stopped")


@dataclass(frozen=True, slots=True, kw_only=True)
class HeterogeneitySettings:
    """One comparison."""

    model: str = "tiny"  # "tiny" (a small Llama from a config, GPT-2 tokenizer) or a model folder
    data: str | None = (
        None  # None: the KJV split by book; a .txt file (cut in 4) or a folder of 4+ .txt files
    )
    configs: tuple[str, ...] = DEFAULT_CONFIGS
    rounds: int = 3  # rounds of every configuration
    steps: int = 16  # s1's steps per round (s2: steps x batch_size samples; s3: the budget's steps)
    batch_size: int = 4  # the run's batch (s2a's steps)
    seq_len: int = 32
    lr: float = 3e-3
    seed: int = 0
    cpu_unit: float = 0.1  # share of one core per unit of speed (the fastest owner: 4 x cpu_unit)
    max_chars_per_owner: int = 8_000  # KJV text per owner
    val_fraction: float = 0.1
    tiny_layers: int = 2
    tiny_width: int = 32
    timeout_s: float = 900.0  # per configuration

    def __post_init__(self) -> None:
        unknown = [c for c in self.configs if c not in CONFIGS]
        if unknown or not self.configs:
            raise ValueError(
                f"--configs takes names among {', '.join(CONFIGS)}; got {', '.join(unknown) or 'none'}"
            )
        if self.rounds < 1 or self.steps < 1 or self.batch_size < 1 or not 0 < self.cpu_unit <= 0.25:
            raise ValueError("rounds, steps and batch_size must be >= 1, and cpu_unit in (0, 0.25]")


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What one configuration measured."""

    wall_s: float  # the run, start to done
    train_s: float  # the rounds' training time (the idle accounting's round wall times, summed)
    idle: float  # the owners' mean idle ratio
    idle_per_owner: dict[str, float]
    ppl: float  # final checkpoint, every owner's validation split
    steps: dict[str, list[int]]  # owner -> steps per round
    samples: dict[str, list[int]]  # owner -> sequences trained per round
    cpu_share: bool = True  # the speeds were enforced as CPU quotas


@dataclass(slots=True)
class HeterogeneityResult:
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    cpu_share: bool = False  # whether the speeds were enforced as CPU quotas

    def _pct(self, config: str, baseline: str, key: str) -> float:
        if config not in self.outcomes or baseline not in self.outcomes:
            return math.nan
        a, b = getattr(self.outcomes[config], key), getattr(self.outcomes[baseline], key)
        return 100.0 * (a - b) / b

    def summary_line(self) -> str:
        """The one ``key=value`` line the benchmark ends with."""

        def get(name: str, key: str) -> float:
            return getattr(self.outcomes[name], key) if name in self.outcomes else math.nan

        parts = [f"idle_{s}={get(s, 'idle'):.4f}" for s in STRATEGIES]
        parts += [f"wall_{s}={get(s, 'wall_s'):.1f}" for s in STRATEGIES]
        parts += [f"ppl_{s}={get(s, 'ppl'):.4f}" for s in STRATEGIES]
        parts += [f"smha25_wall_pct={self._pct('smha25', 's1', 'wall_s'):.2f}",
                  f"smha25_ppl_pct={self._pct('smha25', 's1', 'ppl'):.2f}"]  # fmt: skip
        return " ".join(parts)

    def table(self) -> str:
        """One row per configuration, as the poster's table, with the owners' idle ratios."""
        from server.observe.tables import format_table

        rows = []
        for name, o in self.outcomes.items():
            owners = " ".join(f"{100 * v:.1f}" for _, v in sorted(o.idle_per_owner.items()))
            steps = " ".join(f"{sum(v)}" for _, v in sorted(o.steps.items()))
            rows.append(
                [
                    name,
                    f"{o.wall_s:.1f}",
                    f"{o.train_s:.1f}",
                    f"{100 * o.idle:.2f} %",
                    owners,
                    f"{o.ppl:.4f}",
                    steps,
                ]
            )
        return format_table(["config", "wall s", "training s", "idle", "idle % per owner", "val ppl", "steps per owner"],
                            rows)  # fmt: skip


# --------------------------------------------------------------------------- specs


def run_spec(
    config: str, settings: HeterogeneitySettings, tokenizer: str, owners: Sequence[str]
) -> dict[str, Any]:
    """The run file's sections for ``config``."""
    s = settings
    local_work: dict[str, Any] = {
        "s1": {"mode": "steps", "steps": s.steps, "batch": "device"},
        "s2a": {"mode": "samples", "samples": s.steps * s.batch_size, "accumulate": True},
        "s2b": {"mode": "samples", "samples": s.steps * s.batch_size, "accumulate": False},
        "s3": {"mode": "time", "steps": s.steps, "batch": "device"},
    }[_strategy(config)]
    spec: dict[str, Any] = {
        "rounds": s.rounds, "seed": s.seed, "tokenizer": tokenizer, "participation": {"mode": "parallel"},
        "local_work": local_work, "training": {"batch_size": s.batch_size, "seq_len": s.seq_len, "lr": s.lr},
        "evaluation": {"val_fraction": s.val_fraction, "eval_batch_size": 8},
    }  # fmt: skip
    if config in ("smha25", "smha50"):
        # The poster's 1/4 and 1/2 of the heads; the fastest owner trains every head, which heads mode
        # requires (at least one client must train all parameters for convergence).
        spec["finetune"] = {"mode": "heads", "head_fraction": 0.25 if config == "smha25" else 0.5, "head_choice": "random",
                            "adapter": "full", "head_fractions": {owners[-1]: 1.0}}  # fmt: skip
    elif config in ("s1_smha", "s3_smha"):
        spec["finetune"] = {"mode": "heads", "head_fraction": 1.0, "head_choice": "random", "adapter": "full",
                            "head_fractions": dict(zip(owners, SMHA_FRACTIONS, strict=True))}  # fmt: skip
    return spec


def _strategy(config: str) -> str:
    return {"homogeneous": "s1", "smha25": "s1", "smha50": "s1", "s1_smha": "s1", "s3_smha": "s3"}.get(
        config, config
    )


# --------------------------------------------------------------------------- measuring a run


def owner_idle(run: Mapping[str, Any], owners: Sequence[str]) -> dict[str, float]:
    """Each owner's idle ratio over the run: its bubble and waiting seconds over the rounds' training seconds."""
    out = {}
    for owner in owners:
        idle = wall = 0.0
        for r in run["per_round"]:
            figures = r["idle"].get(owner)
            if figures is not None:
                idle += figures["idle"] * figures["wall_s"]
                wall += figures["wall_s"]
        out[owner] = idle / wall if wall > 0 else math.nan
    return out


def training_seconds(run: Mapping[str, Any]) -> float:
    """The rounds' training time: each round's longest training wall time of any device."""
    return sum(max((f["wall_s"] for f in r["idle"].values()), default=0.0) for r in run["per_round"])


def final_ppl(
    checkpoint: Path, owner_data: Sequence[Path], settings: HeterogeneitySettings, base_model: str
) -> float:
    """The checkpoint's perplexity on every owner's validation split (token-weighted), as the owners split them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from autograd_bridge.partition import even_stage_specs, split_model
    from autograd_bridge.pipeline import Pipeline
    from autograd_bridge.runtime import EventLoopThread
    from client.data import DataSettings, OwnerDataset
    from client.training import evaluate

    if (checkpoint / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_model), checkpoint
        ).merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(base_model)
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    data = DataSettings(seq_len=settings.seq_len, val_fraction=settings.val_fraction, seed=settings.seed)
    whole = split_model(model, even_stage_specs(int(model.config.num_hidden_layers), 1))[0]
    loss = tokens = 0.0
    with EventLoopThread() as runtime:
        pipeline = Pipeline([whole], runtime)
        for path in owner_data:
            dataset = OwnerDataset.from_path(path, tokenizer, settings=data)
            mean, _ = evaluate(pipeline, dataset, 8)
            count = sum(b.num_targets for b in dataset.validation_batches(8))
            loss, tokens = loss + mean * count, tokens + count
        pipeline.close()
    return math.exp(loss / tokens)


# --------------------------------------------------------------------------- CPU shares


class CpuShares:
    """One cgroup per owner process with a CFS quota (v1 ``cpu`` or v2 ``cpu.max``); off when neither can be written."""

    PERIOD_US = 100_000
    WEIGHT = 8192  # cpu.shares (v1; the default is 1024), scaled for v2's cpu.weight (default 100)

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.made: list[Path] = []
        v1, v2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")
        if (v1 / "cpu.cfs_quota_us").exists():
            self.root: Path | None = v1
            self.v2 = False
        elif (v2 / "cgroup.subtree_control").exists() and "cpu" in (
            v2 / "cgroup.controllers"
        ).read_text().split():
            self.root, self.v2 = v2, True
        else:
            self.root, self.v2 = None, False

    def limit(self, name: str, pid: int, cores: float) -> bool:
        """Hold process ``pid`` (all its threads) to ``cores`` of one core; False when this machine does not let us."""
        if self.root is None:
            return False
        folder = self.root / f"titanic-bench-{self.tag}-{name}"
        quota = max(1000, int(cores * self.PERIOD_US))
        try:
            folder.mkdir(exist_ok=True)
            if folder not in self.made:
                self.made.append(folder)
            # The quota caps the process; the raised weight lets it reach its cap on a machine other jobs keep busy
            # (at the default weight a busy machine, not the quota, would set every owner's speed).
            if self.v2:
                (folder / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
                (folder / "cpu.weight").write_text(str(self.WEIGHT * 100 // 1024))
            else:
                (folder / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
                (folder / "cpu.cfs_quota_us").write_text(str(quota))
                (folder / "cpu.shares").write_text(str(self.WEIGHT))
            (folder / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            print(
                f"cpu shares are off: {exc} (run as root on a machine with the cgroup cpu controller)",
                flush=True,
            )
            self.root = None
            return False
        return True

    def close(self) -> None:
        """Remove the cgroups (their processes have ended)."""
        for folder in self.made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        self.made.clear()


# --------------------------------------------------------------------------- a federation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _admin(url: str, token: str, route: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + route, data=data, method="GET" if body is None else "POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@dataclass
class Federation:
    admin_url: str
    token: str
    owners: list[str]
    pids: dict[str, int]
    check: Callable[[], None]


@contextlib.contextmanager
def federation(work: Path, model: str, owner_data: Sequence[Path], devices: Sequence[tuple[float, int]],
               settings: HeterogeneitySettings, core_flops: float) -> Iterator[Federation]:  # fmt: skip
    """A server planning one stage per owner and one client per owner, with its declared speed and micro-batch."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    join, token, port = secrets.token_urlsafe(16), secrets.token_urlsafe(16), _free_port()
    children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(name: str, *args: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with (logs / f"{name}.log").open("wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", *args], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        children.append((name, popen))
        return popen

    def check() -> None:
        for name, popen in children:
            if popen.poll() is not None:
                raise RuntimeError(f"{name} exited with status {popen.returncode}; see {logs / name}.log")

    owners = [f"owner{k}" for k in range(len(devices))]
    try:
        common = ["--server", f"127.0.0.1:{port}", f"--token={join}", "--quick-profile", "--device", "cpu",
                  "--reconnect-max", "1", "--declare-upload-bytes-per-s", "1e9", "--declare-download-bytes-per-s", "1e9",
                  "--declare-rtt-s", "0.0005"]  # fmt: skip
        pids = {}
        for owner, data, (speed, micro) in zip(owners, owner_data, devices, strict=True):
            flops = speed * settings.cpu_unit * core_flops
            pids[owner] = spawn(owner, "client.cli", "run", "--name", owner, *common, "--cache-dir", str(work / owner),
                                "--data", str(data), "--declare-flops-per-s", f"{flops:.4g}",
                                "--declare-max-micro-batch", str(micro)).pid  # fmt: skip
        spawn("server", "server.cli", "run", "--port", str(port), "--admin-port", "0", "--state-dir", str(work / "state"),
              "--model", model, "--stages", "1", f"--join-token={join}", f"--admin-token={token}", "--settle", "1",
              # A device held to a tenth of a core on a busy machine can miss a heartbeat or two while it trains.
              "--heartbeat-interval", "2", "--heartbeat-timeout", "120")  # fmt: skip
        url = _wait(lambda: _ready_url(logs / "server.log"), 180, "the server", check)

        def planned() -> bool:
            plan = _admin(url, token, "/v1/plan")
            return plan["state"] == "connected" and set(plan["owners"]) == set(owners)

        _wait(planned, 300, "a plan over the four owners", check)
        yield Federation(admin_url=url, token=token, owners=owners, pids=pids, check=check)
    finally:
        for _, popen in reversed(children):
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)
        for _, popen in children:
            try:
                popen.wait(20)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(5)


def _ready_url(log: Path) -> str | None:
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("titanic-server ready"):
                return line.split("admin=")[1].strip()
    return None


def _wait(predicate: Callable[[], Any], timeout_s: float, what: str, check: Callable[[], None]) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        check()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.3)


# --------------------------------------------------------------------------- the benchmark


def prepare_model(settings: HeterogeneitySettings, folder: Path) -> str:
    """The model folder the server plans for: a tiny Llama saved with the GPT-2 tokenizer, or the one given."""
    if settings.model != "tiny":
        return str(Path(settings.model).expanduser().resolve())
    import torch
    from transformers import AutoModelForCausalLM

    from autograd_bridge.models import gpt2_tokenizer, save_pretrained_dir, tiny_config

    tokenizer = gpt2_tokenizer()
    torch.manual_seed(settings.seed)
    config = tiny_config("llama", vocab_size=len(tokenizer), hidden_size=settings.tiny_width,
                         intermediate_size=2 * settings.tiny_width, num_hidden_layers=settings.tiny_layers,
                         max_position_embeddings=max(128, settings.seq_len))  # fmt: skip
    save_pretrained_dir(AutoModelForCausalLM.from_config(config), tokenizer, folder)
    return str(folder.resolve())


def prepare_data(settings: HeterogeneitySettings, folder: Path) -> list[Path]:
    """Four owners' data: KJV books split by book, a folder's first four .txt files, or one .txt file cut in four."""
    from testbed.demo_data import write_owner_splits

    if settings.data is None:
        splits = write_owner_splits(
            folder, 4, max_chars_per_owner=settings.max_chars_per_owner, overwrite=True
        )
        return [s.path for s in splits]
    path = Path(settings.data).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
        if len(files) < 4:
            raise ValueError(f"{path} holds {len(files)} .txt file(s); the benchmark needs one per owner, 4")
        return files[:4]
    if path.suffix != ".txt" or not path.is_file():
        raise ValueError(f"--data must be a .txt file or a folder of them, got {path}")
    text = path.read_text(encoding="utf-8")
    folder.mkdir(parents=True, exist_ok=True)
    out, start = [], 0
    for k in range(1, 5):
        cut = text.find("\n", k * len(text) // 4)  # after a line's end
        end = len(text) if k == 4 or cut < 0 else max(cut + 1, start)
        (folder / f"owner-{k - 1}.txt").write_text(text[start:end], encoding="utf-8")
        out.append(folder / f"owner-{k - 1}.txt")
        start = end
    return out


def one_thread_flops(model: str, settings: HeterogeneitySettings) -> float:
    """The FLOP/s one thread of this machine achieves training ``model``: the profile's training FLOPs of a batch
    over the measured time of its forward and backward (the median of a few), which is what a device's
    declared FLOP/s stands for when the server guesses a first round's length."""
    import statistics

    import torch
    from transformers import AutoModelForCausalLM

    from autograd_bridge.profile import profile_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        profile = profile_model(net.config, seq_len=settings.seq_len)
        per_token = sum(p.flops_per_token for p in (profile.embedding, *profile.blocks, profile.head)) * 3
        ids = torch.randint(0, int(net.config.vocab_size), (settings.batch_size, settings.seq_len))
        times = []
        for _ in range(5):
            began = time.perf_counter()
            net(input_ids=ids, labels=ids).loss.backward()
            times.append(time.perf_counter() - began)
        return per_token * ids.numel() / statistics.median(times[1:])
    finally:
        torch.set_num_threads(threads)


def run_config(config: str, settings: HeterogeneitySettings, *, work: Path, model: str, owner_data: Sequence[Path],
               core_flops: float, say: Callable[[str], None]) -> tuple[Outcome, bool]:  # fmt: skip
    """Start a federation for ``config``, train its run, measure it; also whether the CPU shares were enforced."""
    devices = HOMOGENEOUS if config == "homogeneous" else HETEROGENEOUS
    shares = CpuShares(f"{os.getpid()}-{config}")
    try:
        with federation(work / config, model, owner_data, devices, settings, core_flops) as fed:
            enforced = all(shares.limit(o, fed.pids[o], speed * settings.cpu_unit)
                           for o, (speed, _) in zip(fed.owners, devices, strict=True))  # fmt: skip
            spec = run_spec(config, settings, model, fed.owners)
            began = time.monotonic()
            run_id = _admin(fed.admin_url, fed.token, "/v1/runs", {"spec": spec})["run_id"]
            run = _wait(lambda: (r := _admin(fed.admin_url, fed.token, f"/v1/runs/{run_id}"))["state"] in ENDED and r,
                        settings.timeout_s, f"the {config} run", fed.check)  # fmt: skip
            wall = time.monotonic() - began
            (work / config / "run.json").write_text(json.dumps(run, indent=1))
            if run["state"] != "done":
                raise RuntimeError(f"the {config} run {run['state']}: {run['error']}")
    finally:
        shares.close()
    idle = owner_idle(run, fed.owners)
    history = sorted(run["history"], key=lambda h: (h["owner"], h["round"]))
    outcome = Outcome(
        wall_s=wall, train_s=training_seconds(run), idle=sum(idle.values()) / len(idle), idle_per_owner=idle,
        ppl=final_ppl(Path(run["checkpoints"][-1]), owner_data, settings, model),
        steps={o: [len(h["losses"]) for h in history if h["owner"] == o] for o in fed.owners},
        samples={o: [h["samples"] for h in history if h["owner"] == o] for o in fed.owners}, cpu_share=enforced,
    )  # fmt: skip
    for r in run["per_round"]:
        owners = {o: f for o, f in r["idle"].items() if o in fed.owners}
        say(f"  round {r['round']}: " + ", ".join(f"{o} idle {100 * f['idle']:.1f} % of {f['wall_s']:.1f} s"
                                               for o, f in sorted(owners.items())))  # fmt: skip
    say(f"{config}: wall {outcome.wall_s:.1f} s, training {outcome.train_s:.1f} s, idle {100 * outcome.idle:.2f} %, "
        f"ppl {outcome.ppl:.4f}, steps {outcome.steps}, samples {outcome.samples}")  # fmt: skip
    return outcome, enforced


def run_heterogeneity(settings: HeterogeneitySettings, *, log: Callable[[str], None] | None = None,
                      work: Path | None = None) -> HeterogeneityResult:  # fmt: skip
    """Every configuration in ``settings.configs``, each on a fresh federation."""
    say = log or (lambda _line: None)
    result = HeterogeneityResult(cpu_share=True)
    with contextlib.ExitStack() as stack:
        root = work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="titanic-heterogeneity-")))
        model = prepare_model(settings, root / "model")
        owner_data = prepare_data(settings, root / "data")
        core_flops = one_thread_flops(model, settings)
        say(f"one thread trains this model at {core_flops / 1e9:.2f} GFLOP/s; owners (speed, micro-batch): {HETEROGENEOUS}, "
            f"homogeneous {HOMOGENEOUS[0]}; {settings.cpu_unit:g} core per unit of speed")  # fmt: skip
        for config in settings.configs:
            outcome, enforced = run_config(config, settings, work=root, model=model, owner_data=owner_data,
                                           core_flops=core_flops, say=say)  # fmt: skip
            result.outcomes[config] = outcome
            result.cpu_share = result.cpu_share and enforced
    return result


def merge_results(path: Path, result: HeterogeneityResult) -> HeterogeneityResult:
    """``result`` added to the outcomes saved in ``path`` (a configuration run again replaces its row), saved back."""
    saved = json.loads(path.read_text()) if path.exists() else {}
    outcomes = {name: Outcome(**values) for name, values in saved.items()}
    outcomes.update(result.outcomes)
    ordered = {name: outcomes[name] for name in CONFIGS if name in outcomes}
    path.write_text(json.dumps({name: asdict(o) for name, o in ordered.items()}, indent=1))
    return HeterogeneityResult(outcomes=ordered, cpu_share=all(o.cpu_share for o in ordered.values()))


def quick_settings() -> HeterogeneitySettings:
    return HeterogeneitySettings(rounds=2, steps=8, max_chars_per_owner=3_000)


def _parse(argv: Sequence[str] | None) -> tuple[HeterogeneitySettings, Path | None, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 8 steps, less text")
    parser.add_argument("--model", help="'tiny' (default) or a model folder the server can plan for")
    parser.add_argument("--data", help="a .txt file (cut in 4) or a folder of .txt files (one owner each)")
    parser.add_argument(
        "--configs", help=f"comma-separated, among {','.join(CONFIGS)} (default: {','.join(DEFAULT_CONFIGS)})"
    )
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--cpu-unit", type=float, dest="cpu_unit", help="share of one core per unit of speed")
    parser.add_argument(
        "--results",
        type=Path,
        help="a JSON file collecting configurations over several invocations "
        "(each under 10 minutes); the table and the last line cover all it holds",
    )
    parser.add_argument(
        "--work", type=Path, help="keep models, data, logs and checkpoints here (default: a temporary folder)"
    )
    args = parser.parse_args(argv)
    settings = quick_settings() if args.quick else HeterogeneitySettings()
    changes: dict[str, Any] = {k: v for k, v in vars(args).items() if k in ("model", "data", "rounds", "steps", "cpu_unit")
                               and v is not None}  # fmt: skip
    if args.configs:
        changes["configs"] = tuple(c.strip() for c in args.configs.split(",") if c.strip())
    return replace(settings, **changes), args.work, args.results


def main(argv: Sequence[str] | None = None) -> int:
    settings, work, results = _parse(argv)
    s = settings
    print(f"model={s.model} rounds={s.rounds} steps={s.steps} batch={s.batch_size}x{s.seq_len} lr={s.lr} "
          f"configs={','.join(s.configs)}", flush=True)  # fmt: skip
    began = time.monotonic()
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    result = run_heterogeneity(settings, log=lambda line: print(line, flush=True), work=work)
    if results is not None:
        result = merge_results(results, result)
    print(result.table())
    print(f"cpu shares {'enforced' if result.cpu_share else 'OFF (speeds were not enforced)'}; "
          f"total {time.monotonic() - began:.0f} s")  # fmt: skip
    print(result.summary_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
