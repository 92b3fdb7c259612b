"""Automatic recovery over real processes: a helper killed or frozen mid-round, and a server killed mid-run.

One federation serves the whole module: a server, two data owners and three helpers on
loopback, planning three stages per owner's pipeline (a helper may host both middle
stages). The planner takes the fastest helper left; each test that loses one leaves the
next. Alice's runs (case 1) are compared with one undisturbed run of the same run file: a
replayed round trains the same batches from the same starting state, so the final
adapters agree (1e-4). The last tests lose bob, the second owner of a case-3 run.
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
OWNER_ROUNDS = 3
TIMEOUT_S = 5.0  # the heartbeat timeout: a frozen helper is lost after this long (shorter ones lose starved clients on a loaded machine)


@dataclass
class Federation:
    cluster: Cluster
    run_file: Path
    model_dir: Path
    helpers: dict[str, Process]
    root: Path
    bob_data: Path
    control: str

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
        for name, data in (("alice", owner_data[0]), ("bob", owner_data[1])):
            started.append(
                spawn(name, "client.cli", *client_args(control, name, root / name, "--data", str(data)))
            )
        helpers = {}
        for i in range(HELPERS):
            name = f"helper{i}"
            extra = [*flags, "--declare-flops-per-s", f"{5e10 / (i + 1):g}", "--capacity", "2"]
            helpers[name] = spawn(name, "client.cli", *client_args(control, name, root / name, *extra))
            started.append(helpers[name])
        cluster = Cluster(
            server=server, admin_url=admin_url, state_dir=root / "state", port=port, started=started
        )
        run_file = write_run(root / "run.toml", model_dir, case=1, rounds=2, steps_per_round=8, batch_size=2,
                             finetune="lora", lora_r=4, lr=1e-2, owners=["alice"])  # fmt: skip
        yield Federation(cluster=cluster, run_file=run_file, model_dir=model_dir, helpers=helpers, root=root,
                         bob_data=owner_data[1], control=control)  # fmt: skip


def final_adapters(run: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(Path(run["checkpoints"][-1]) / "adapter_model.safetensors")


def max_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert set(a) == set(b) and a
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def start_run(f: Federation, run_file: Path | None = None) -> str:
    wait_until(lambda: admin(f.admin_url, "/v1/plan")["state"] == "connected", 120, "a connected plan")
    return str(json.loads(f.cluster.cli("runs", "start", str(run_file or f.run_file), "--json"))["run_id"])


def wait_done(f: Federation, run_id: str, timeout_s: float = 240) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        run = admin(f.admin_url, f"/v1/runs/{run_id}")
        assert run["state"] not in ("failed", "stopped"), (
            run["error"] + "\n" + f.cluster.server.output()[-3000:]
        )
        return run if run["state"] == "done" else None

    result: dict[str, Any] = wait_until(finished, timeout_s, f"{run_id} to finish", interval_s=0.3)
    return result


def wait_mid_round(f: Federation, run_id: str, round_: int, steps: int = 2, owner: str = "alice") -> None:
    """Until ``owner`` has trained ``steps`` steps of ``round_`` (or is further)."""

    def there() -> bool:
        live = admin(f.admin_url, f"/v1/runs/{run_id}")["live"].get(owner)
        return bool(live) and (live["round"], live["done"]) >= (round_, steps)

    try:
        wait_until(there, 120, f"round {round_} of {run_id} under way", interval_s=0.05)
    except TimeoutError as exc:
        run = admin(f.admin_url, f"/v1/runs/{run_id}")
        shown = {k: run[k] for k in ("state", "round", "error", "recoveries", "live")}
        raise AssertionError(f"{exc}: {shown}\n{f.cluster.server.output()[-4000:]}") from exc


def middle_holder(f: Federation) -> str:
    """The helper serving alice's middle stage."""
    plan = admin(f.admin_url, "/v1/plan")
    (name,) = {r["client_id"] for r in plan["rows"] if not r["local"] and r["owner_id"] == "alice"}
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
    # Clients come back one by one: a plan made before all are back may be replaced, and replayed on again.
    assert run["recoveries"][0]["kind"] == "server restart" and run["resumed_from"] == 1
    assert [h["round"] for h in run["history"]] == [1, 2]
    assert max_difference(final_adapters(run), reference) <= 1e-4


def owners_run(f: Federation, name: str, **recovery: object) -> Path:
    """A case-3 run of alice and bob (OWNER_ROUNDS rounds: an owner lost early is missed before the end), with these [recovery] keys."""
    path = f.root / f"{name}.toml"
    write_run(
        path,
        f.model_dir,
        case=3,
        rounds=OWNER_ROUNDS,
        steps_per_round=8,
        batch_size=2,
        finetune="lora",
        lora_r=4,
        lr=1e-2,
    )
    path.write_text(path.read_text() + "[recovery]\n" + "".join(f"{k} = {v}\n" for k, v in recovery.items()))
    return path


def kill_bob(f: Federation) -> None:
    bob = next(p for p in f.cluster.started if p.name == "bob" and p.popen.poll() is None)
    bob.popen.kill()
    bob.popen.wait(10)


@pytest.mark.slow
def test_a_lost_owner_is_waited_for_and_without_a_quorum_the_run_fails_saying_why(
    federation: Federation,
) -> None:
    """SIGKILL of a data owner of a case-3 run without owner_quorum: the round waits owner_wait_s for it, then fails."""
    f = federation
    run_id = start_run(f, owners_run(f, "no-quorum", owner_wait_s=3))
    wait_mid_round(f, run_id, 1, owner="bob")
    kill_bob(f)

    def ended() -> dict[str, Any] | None:
        run = admin(f.admin_url, f"/v1/runs/{run_id}")
        return run if run["state"] in ("failed", "done") else None

    run = wait_until(ended, 60, "the run to give up on bob", interval_s=0.3)
    assert run["state"] == "failed" and run["recoveries"][0]["lost"] == "bob"
    assert (
        "['alice', 'bob']" in run["error"]
        and "owner_wait_s" in run["error"]
        and f"--resume {run_id}" in run["error"]
    )
    # bob comes back for the next test
    f.cluster.started.append(
        spawn("bob", "client.cli", *client_args(f.control, "bob", f.root / "bob", "--data", str(f.bob_data)))
    )


@pytest.mark.slow
def test_a_lost_owner_within_the_quorum_lets_the_round_finish_without_it(federation: Federation) -> None:
    """With owner_quorum = 0.5 the round is replayed with alice alone once bob is lost, and the run completes."""
    f = federation
    wait_until(lambda: "bob" in admin(f.admin_url, "/v1/plan")["owners"], 120, "bob back in the plan")
    run_id = start_run(f, owners_run(f, "quorum", owner_quorum=0.5))
    wait_mid_round(f, run_id, 1, owner="bob")
    kill_bob(f)
    run = wait_done(f, run_id)
    (entry,) = run["recoveries"]
    assert (
        entry["lost"] == "bob"
        and entry["without_owners"] == ["bob"]
        and len(run["checkpoints"]) == OWNER_ROUNDS
    )
    # The replayed round and those after it are alice's alone; rounds before it kept both owners.
    assert [h["owner"] for h in run["history"] if h["round"] >= entry["round"]] == ["alice"] * (
        OWNER_ROUNDS + 1 - entry["round"]
    )
    assert sorted(h["owner"] for h in run["history"] if h["round"] < entry["round"]) == ["alice", "bob"] * (
        entry["round"] - 1
    )
