"""``GET /metrics``: parsed with prometheus_client's own parser, its values are the admin API's."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proto.messages import RoundProgress
from server.control.handler import ControlHandler
from server.control.state import ClientRecord, ClientStatus, Deployment
from server.observe.admin import AdminContext, admin_app
from server.planning.coordinator import Coordinator
from server.training.checkpoints import CheckpointStore
from server.training.rounds import Phase, RoundMachine
from server.training.run_manager import RunManager
from server.training.seams import seams_for
from server.training.spec import RunSpec
from server.training.store import RunRecord

from .conftest import FakeClock
from .support import ADMIN_TOKEN, REPO_ROOT, admin, wait_until
from .test_coordinator import join, make_coordinator
from .test_training_system import cluster, model_dir, owner_data, write_run  # noqa: F401  (two fixtures)

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def history(round: int, owner: str, losses: list[float], sent: dict[str, int], received: dict[str, int]) -> dict[str, Any]:
    """A history entry as the round machine keeps it (what the metrics read of it)."""
    return {"round": round, "owner": owner, "bridge_run": f"p-{owner}", "losses": losses, "bytes_sent": sent,
            "bytes_received": received, "val_loss": 2.0, "ppl": 7.39, "val_tokens": 10, "samples": 4}  # fmt: skip


def filled_run() -> RunRecord:
    """Run 1 in round 2 of 3: both owners reported round 1, owner a is 2 steps into round 2, b's round 2 has not begun."""
    spec = RunSpec(rounds=3)
    record = RunRecord(run_id="run-1", spec=spec, machine=RoundMachine(rounds=3), seams=seams_for(spec), created_at=1.0)
    record.machine.round, record.machine.phase = 2, Phase.TRAINING
    record.machine.history = [
        history(1, "a", [3.0, 2.9, 2.8], {"1": 100, "2": 50}, {"1": 90, "2": 40}),
        history(1, "b", [3.1, 3.0, 2.7], {"1": 7}, {"1": 8}),
    ]
    record.checkpoints = ["round-1"]
    record.follow_progress("a", RoundProgress(round=2, first_step=0, losses=(2.6, 2.5), steps=3, tokens=256, seconds=0.5))
    # b's finished round 1 is still its live round: it must count once.
    record.follow_progress("b", RoundProgress(round=1, first_step=0, losses=(3.1, 3.0, 2.7), steps=3, tokens=384, seconds=2.0))
    for client, direction, size in (("a", "uploaded", 1000), ("a", "downloaded", 2000), ("h", "uploaded", 300)):
        record.count_bytes(1, client, direction, size)
    record.count_bytes(2, "a", "downloaded", 500)
    return record


@pytest.fixture
async def admin_url(handler: ControlHandler, clock: FakeClock, tmp_path: Path) -> AsyncIterator[str]:
    """The admin API on loopback over a state with clients in every status, a plan and run-1."""
    state = handler.state
    for name, status, seen in (("a", ClientStatus.READY, 990.0), ("b", ClientStatus.READY, 999.5),
                               ("h", ClientStatus.MEASURING, 1000.0), ("gone", ClientStatus.LOST, 900.0)):  # fmt: skip
        state.put_client(ClientRecord(client_id=name, status=status, session_digest=f"d-{name}", last_seen=seen))
    state.set_deployment(Deployment(generation=4, plan_id="plan-4", created_at=0.0, summary={"plan_s": 0.25, "solve_ms": 12.5}))
    runs = RunManager(handler, model=None, model_name="", stages=None, checkpoints=CheckpointStore(tmp_path / "checkpoints"))
    runs.store.put(filled_run())
    context = AdminContext(state=state, control_address="127.0.0.1:1", tls=False, model="", started_at=0.0, clock=clock,
                           runs=runs)  # fmt: skip
    runner = web.AppRunner(admin_app(context, token=ADMIN_TOKEN))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def scrape(url: str) -> tuple[Samples, dict[str, Any]]:
    """/metrics parsed, and the admin API's JSON of the same state."""
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.get(url + "/metrics") as response:
            assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
            samples = parse(await response.text())
        answers = {}
        for route in ("/v1/status", "/v1/clients", "/v1/plan", "/v1/runs"):
            async with http.get(url + route) as response:
                answers[route] = await response.json()
    return samples, answers


async def test_metrics_need_the_admin_token(admin_url: str) -> None:
    """Without the bearer token /metrics answers 401, like every admin route."""
    async with aiohttp.ClientSession() as http, http.get(admin_url + "/metrics") as response:
        assert response.status == 401


async def test_clients_by_state_and_heartbeat_age_match_the_admin_api(admin_url: str) -> None:
    """Clients per state are /v1/status's counts (0 for the others); each heartbeat age is /v1/clients' seen_s_ago."""
    samples, answers = await scrape(admin_url)
    for status in ClientStatus:
        assert value(samples, "titanic_clients", state=str(status)) == answers["/v1/status"]["clients"].get(str(status), 0)
    ages = {c["client_id"]: c["seen_s_ago"] for c in answers["/v1/clients"]}
    assert ages == {"a": 10.0, "b": 0.5, "h": 0.0, "gone": 100.0}
    for client, age in ages.items():
        assert value(samples, "titanic_client_heartbeat_age_seconds", client=client) == age


async def test_rounds_and_steps_match_the_run(admin_url: str) -> None:
    """Rounds done are the run's checkpoints; steps are its reported steps plus the live ones of rounds not yet reported."""
    samples, answers = await scrape(admin_url)
    (run,) = answers["/v1/runs"]
    assert value(samples, "titanic_run_rounds_done_total", run="run-1") == len(run["checkpoints"]) == 1
    assert value(samples, "titanic_run_rounds", run="run-1") == run["rounds"] == 3
    assert value(samples, "titanic_run_steps_done_total", run="run-1") == 3 + 3 + 2  # b's live round 1 counts once
    for phase in Phase:
        assert value(samples, "titanic_run_state", run="run-1", state=str(phase)) == (phase == Phase.TRAINING)


async def test_owner_progress_matches_the_live_rounds(admin_url: str) -> None:
    """Per owner: steps of its round, done, last loss, tokens per second and time left are the run's ``live``."""
    samples, answers = await scrape(admin_url)
    (run,) = answers["/v1/runs"]
    for owner, now in run["live"].items():
        labels = {"run": "run-1", "owner": owner}
        assert value(samples, "titanic_owner_round_steps", **labels) == now["steps"]
        assert value(samples, "titanic_owner_round_steps_done", **labels) == now["done"]
        assert value(samples, "titanic_owner_loss", **labels) == now["losses"][-1]
        assert value(samples, "titanic_owner_tokens_per_second", **labels) == now["tokens_per_s"]
        assert value(samples, "titanic_owner_eta_seconds", **labels) == now["eta_s"]
    assert run["live"]["a"]["tokens_per_s"] == 512.0 and run["live"]["a"]["eta_s"] == 0.25


async def test_bytes_per_client_and_bridge_stage_match_the_run(admin_url: str) -> None:
    """Client bytes are the run's traffic summed over rounds; bridge bytes its history's per owner and stage."""
    samples, answers = await scrape(admin_url)
    (run,) = answers["/v1/runs"]
    for client in ("a", "h"):
        for direction in ("uploaded", "downloaded"):
            want = sum(t[direction] for t in run["traffic"] if t["client"] == client)
            assert value(samples, "titanic_client_bytes_total", run="run-1", client=client, direction=direction) == want
    assert value(samples, "titanic_client_bytes_total", run="run-1", client="a", direction="downloaded") == 2500
    for h in run["history"]:
        for stage, size in h["bytes_sent"].items():
            labels = {"run": "run-1", "owner": h["owner"], "stage": stage}
            assert value(samples, "titanic_bridge_bytes_total", **labels, direction="sent") == size
            assert value(samples, "titanic_bridge_bytes_total", **labels, direction="received") == h["bytes_received"][stage]


async def test_planner_time_matches_the_plan(admin_url: str) -> None:
    """Plan generation and the planning and solver seconds are the plan's facts."""
    samples, answers = await scrape(admin_url)
    plan = answers["/v1/plan"]
    assert value(samples, "titanic_plan_generation") == plan["generation"] == 4
    assert value(samples, "titanic_plan_seconds") == plan["summary"]["plan_s"]
    assert value(samples, "titanic_plan_solve_seconds") == plan["summary"]["solve_ms"] / 1e3


async def test_the_coordinator_times_each_plan(handler: ControlHandler, model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """A plan's facts hold how long the whole plan function took, at least the solver's part."""
    coordinator: Coordinator = make_coordinator(handler, model_dir, tmp_path, stages=3)
    join(handler, "owner", 1e10, owner=True)
    join(handler, "helper", 5e10)
    deployment = await coordinator.replan()
    assert deployment.plan_id and deployment.summary["plan_s"] >= deployment.summary["solve_ms"] / 1e3 > 0


@pytest.mark.slow
def test_a_real_run_is_followed_to_its_end_and_its_metrics_match(
    tmp_path: Path,
    model_dir: Path,  # noqa: F811
    owner_data: list[Path],  # noqa: F811
) -> None:
    """A server and two client processes train one round: ``runs show --follow`` ends with the table, and /metrics agrees."""
    run_file = write_run(tmp_path / "run.toml", model_dir, case=1, rounds=1)
    with cluster(tmp_path, model_dir, {"owner": owner_data[0]}, helpers=1) as c:
        wait_until(lambda: admin(c.admin_url, "/v1/plan")["state"] == "connected", 120, "a connected plan")
        run_id = json.loads(c.cli("runs", "start", str(run_file), "--json"))["run_id"]
        follow = subprocess.run(
            [sys.executable, "-m", "server.cli", "runs", "show", run_id, "--follow", "--admin", c.admin_url,
             "--token", ADMIN_TOKEN], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        request = urllib.request.Request(c.admin_url + "/metrics", headers=AUTH)
        with urllib.request.urlopen(request, timeout=10) as response:
            samples = parse(response.read().decode())
        run, plan = admin(c.admin_url, f"/v1/runs/{run_id}"), admin(c.admin_url, "/v1/plan")
    assert follow.returncode == 0, follow.stdout + follow.stderr
    assert f"{run_id} done" in follow.stdout and "owner round 1/1" in follow.stdout and "3/3 steps" in follow.stdout
    assert "val ppl" in follow.stdout  # the run table after the progress
    assert run["state"] == "done" and value(samples, "titanic_run_rounds_done_total", run=run_id) == 1
    assert value(samples, "titanic_run_steps_done_total", run=run_id) == len(run["history"][0]["losses"]) == 3
    (entry,) = run["history"]
    for stage, size in entry["bytes_sent"].items():
        assert value(samples, "titanic_bridge_bytes_total", run=run_id, owner="owner", stage=stage, direction="sent") == size
    assert entry["bytes_sent"]  # the helper holds a stage, so bytes crossed the bridge
    for client in {t["client"] for t in run["traffic"]}:
        for direction in ("uploaded", "downloaded"):
            want = sum(t[direction] for t in run["traffic"] if t["client"] == client)
            assert value(samples, "titanic_client_bytes_total", run=run_id, client=client, direction=direction) == want
    assert value(samples, "titanic_plan_seconds") == plan["summary"]["plan_s"] > 0
    assert value(samples, "titanic_clients", state="ready") == 2
