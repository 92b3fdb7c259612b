"""Automatic recovery over real processes: a helper killed or frozen mid-round, and a server killed mid-run.

One federation serves the whole module: a server, a data owner and three helpers on
loopback, planning three stages, so each run needs one helper for its middle stage. The
planner takes the fastest helper left; each test that loses one leaves the next. Every run
is compared with one undisturbed run of the same run file: a replayed round trains the same
batches from the same starting state, so the final adapters agree (1e-4).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .support import Process, admin, client_args, processes, spawn, start_server, wait_until
from .test_training_system import Cluster, free_port, model_dir, owner_data, write_run

__all__ = ["model_dir", "owner_data"]  # fixtures, shared with the training system tests

HELPERS = 3
TIMEOUT_S = 3.0  # the heartbeat timeout: a frozen helper is lost after this long


@dataclass
class Federation:
    cluster: Cluster
    run_file: Path
    model_dir: Path
    helpers: dict[str, Process]

    @property
    def admin_url(self) -> str:
        return self.cluster.admin_url


def restartable_server(state_dir: Path, model_dir: Path, port: int) -> tuple[Process, str]:
    """A server on a fixed control port (clients find it again after a restart), with a short heartbeat timeout."""
    server, _, admin_url = start_server(
        state_dir, "--model", str(model_dir), "--stages", "3", "--port", str(port),
        "--heartbeat-interval", "0.3", "--heartbeat-timeout", f"{TIMEOUT_S:g}", "--settle", "0.5",
    )  # fmt: skip
    return server, admin_url


@pytest.fixture(scope="module")
def federation(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path, owner_data: list[Path]
) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("recovery")
    port = free_port()
    flags = ["--device", "cpu", "--declare-upload-bytes-per-s", "1e8", "--declare-download-bytes-per-s", "1e8",
             "--declare-rtt-s", "0.001"]  # fmt: skip
    with processes() as started:
        server, admin_url = restartable_server(root / "state", model_dir, port)
        started.append(server)
        control = f"127.0.0.1:{port}"
        started.append(
            spawn(
                "alice",
                "client.cli",
                *client_args(control, "alice", root / "alice", "--data", str(owner_data[0])),
            )
        )
        helpers = {}
        for i in range(HELPERS):
            name = f"helper{i}"
            extra = [*flags, "--declare-flops-per-s", f"{5e10 / (i + 1):g}"]
            helpers[name] = spawn(name, "client.cli", *client_args(control, name, root / name, *extra))
            started.append(helpers[name])
        cluster = Cluster(
            server=server, admin_url=admin_url, state_dir=root / "state", port=port, started=started
        )
        run_file = write_run(root / "run.toml", model_dir, case=1, rounds=2, steps_per_round=8, batch_size=2,
                             finetune="lora", lora_r=4, lr=1e-2)  # fmt: skip
        yield Federation(cluster=cluster, run_file=run_file, model_dir=model_dir, helpers=helpers)


def final_adapters(run: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(Path(run["checkpoints"][-1]) / "adapter_model.safetensors")


def max_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert set(a) == set(b) and a
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def start_run(f: Federation) -> str:
    wait_until(lambda: admin(f.admin_url, "/v1/plan")["state"] == "connected", 120, "a connected plan")
    return str(json.loads(f.cluster.cli("runs", "start", str(f.run_file), "--json"))["run_id"])


def wait_done(f: Federation, run_id: str, timeout_s: float = 240) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        run = admin(f.admin_url, f"/v1/runs/{run_id}")
        assert run["state"] not in ("failed", "stopped"), (
            run["error"] + "\n" + f.cluster.server.output()[-3000:]
        )
        return run if run["state"] == "done" else None

    result: dict[str, Any] = wait_until(finished, timeout_s, f"{run_id} to finish", interval_s=0.3)
    return result


def wait_mid_round(f: Federation, run_id: str, round_: int, steps: int = 2) -> None:
    """Until the owner has trained ``steps`` steps of ``round_`` (and not finished it)."""

    def there() -> bool:
        live = admin(f.admin_url, f"/v1/runs/{run_id}")["live"].get("alice")
        return bool(live) and live["round"] == round_ and live["done"] >= steps

    wait_until(there, 120, f"round {round_} of {run_id} under way", interval_s=0.05)


def middle_holder(f: Federation) -> str:
    plan = admin(f.admin_url, "/v1/plan")
    (name,) = {r["client_id"] for r in plan["rows"] if not r["local"]}
    return str(name)


@pytest.fixture(scope="module")
def reference(federation: Federation) -> dict[str, Any]:
    """The final adapters of the run file trained undisturbed."""
    run = wait_done(federation, start_run(federation))
    assert run["recoveries"] == []
    return final_adapters(run)


@pytest.mark.slow
def test_a_killed_helper_is_replaced_and_the_round_replayed(
    federation: Federation, reference: dict[str, Any]
) -> None:
    """SIGKILL of the middle stage's host in round 2: the server names it, replans and replays round 2 exactly."""
    run_id = start_run(federation)
    wait_mid_round(federation, run_id, 2)
    victim = middle_holder(federation)
    killed_at = time.time()
    os.kill(federation.helpers[victim].popen.pid, signal.SIGKILL)
    run = wait_done(federation, run_id)
    (entry,) = run["recoveries"]
    assert entry["kind"] == "lost client" and entry["lost"] == victim and entry["round"] == 2
    assert (
        entry["detected_at"] - killed_at < TIMEOUT_S and entry["steps_redone"] >= 2 and entry["recover_s"] > 0
    )
    assert [h["round"] for h in run["history"]] == [1, 2] and len(run["checkpoints"]) == 2
    assert max_difference(final_adapters(run), reference) <= 1e-4
    # The owner reports the lost peer as an expected failure: one clean line, no traceback.
    owner = next(p for p in federation.cluster.started if p.name == "alice").output()
    assert f"{victim} (stage 1) went away" in owner and "failed unexpectedly" not in owner


@pytest.mark.slow
def test_a_frozen_helper_is_replaced_after_the_heartbeat_timeout(
    federation: Federation, reference: dict[str, Any]
) -> None:
    """SIGSTOP of the middle stage's host in round 1: lost after the heartbeat timeout, and round 1 replayed exactly."""
    run_id = start_run(federation)
    wait_mid_round(federation, run_id, 1)
    victim = middle_holder(federation)
    frozen = federation.helpers[victim].popen
    stopped_at = time.time()
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        run = wait_done(federation, run_id)
    finally:
        frozen.kill()  # never thawed: it must not rejoin the federation
    (entry,) = run["recoveries"]
    assert entry["lost"] == victim and entry["round"] == 1 and "heartbeat" in entry["reason"]
    assert entry["detected_at"] - stopped_at < TIMEOUT_S + 1.5
    assert max_difference(final_adapters(run), reference) <= 1e-4


@pytest.mark.slow
def test_a_run_survives_a_killed_server_and_continues_by_itself(
    federation: Federation, reference: dict[str, Any]
) -> None:
    """SIGKILL of the server in round 2 and a restart on the same state dir: the run is listed, continues, and ends equal."""
    c = federation.cluster
    run_id = start_run(federation)
    wait_mid_round(federation, run_id, 2)
    c.server.popen.kill()
    c.server.popen.wait(10)
    c.server, c.admin_url = restartable_server(c.state_dir, federation.model_dir, c.port)
    c.started.append(c.server)
    listed = c.cli("runs")
    assert run_id in listed
    run = wait_done(federation, run_id)
    assert run["recoveries"][-1]["kind"] == "server restart" and run["resumed_from"] == 1
    assert [h["round"] for h in run["history"]] == [1, 2]
    assert max_difference(final_adapters(run), reference) <= 1e-4
