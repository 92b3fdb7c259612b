"""A real server and three real client processes on loopback, planning and hosting a tiny model."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .support import ADMIN_TOKEN, REPO_ROOT, admin, client_args, processes, spawn, start_server, wait_until

HEARTBEAT_TIMEOUT_S = 2.5
# Helpers declare their speed and link so the best host is known in advance; the owner measures.
HELPERS = {"fast": "5e10", "mid": "2e10"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (4 blocks) saved as a Hugging Face directory."""
    from transformers import AutoModelForCausalLM

    from autograd_bridge.models import save_pretrained_dir, tiny_config

    path = tmp_path_factory.mktemp("model")
    save_pretrained_dir(AutoModelForCausalLM.from_config(tiny_config("llama")), None, path)
    return path


def host_of(plan: dict[str, Any], partition: int) -> str:
    return next(r["client_id"] for r in plan["rows"] if r["partition"] == partition)


def connected_plan(
    admin_url: str, *, after: int = 0, clients: set[str] | None = None, timeout_s: float = 120.0
) -> dict[str, Any]:
    """The plan once every owner reached its hosts (a generation above ``after``), made with ``clients`` when given.

    On a loaded machine a helper may register after the settle window; the plan made without it
    connects first and is replaced once it joins, so a test about who hosts what waits for that one.
    """

    def ready() -> dict[str, Any] | None:
        p: dict[str, Any] = admin(admin_url, "/v1/plan")
        made_with = clients is None or clients <= set(p.get("clients", []))
        return p if p["state"] == "connected" and p["generation"] > after and made_with else None

    result: dict[str, Any] = wait_until(ready, timeout_s, "a delivered, connected plan")
    return result


def refusals(url: str, cert_pem: str) -> list[str]:
    """What the host at ``url`` (trusting ``cert_pem``) answers a peer with no token and one with a guessed one."""
    from autograd_bridge.errors import PeerLostError
    from autograd_bridge.websocket import connect_websocket
    from client.tls import pinned_context

    async def attempt(token: str | None) -> str:
        try:
            conn = await connect_websocket(url, token=token, ssl=pinned_context(cert_pem))
        except PeerLostError as exc:
            return str(exc)
        await conn.close()
        return "accepted"

    async def both() -> list[str]:
        return [await attempt(None), await attempt("guessed-token")]

    return asyncio.run(both())


def admin_cli(admin_url: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", *args, "--admin", admin_url, "--token", ADMIN_TOKEN],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True,
    )
    return result.stdout


@pytest.mark.slow
def test_plan_is_delivered_hosted_and_replanned_when_a_host_dies(tmp_path: Path, model_dir: Path) -> None:
    """Clients join, the fastest helper hosts the middle stage for the owner only, and losing it moves the stage."""
    data = tmp_path / "owner.txt"
    data.write_text("In the beginning was the word.\n" * 100)
    with processes() as started:
        server, control, admin_url = start_server(
            tmp_path / "state",
            "--model", str(model_dir), "--stages", "3",
            "--heartbeat-interval", "0.4", "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S), "--settle", "0.5",
        )
        started.append(server)
        started.append(spawn("owner", "client.cli", *client_args(control, "owner", tmp_path / "owner", "--data", str(data))))
        clients = {}
        for name, flops in HELPERS.items():
            declared = ["--device", "cpu", "--declare-flops-per-s", flops, "--declare-upload-bytes-per-s", "1e8",
                        "--declare-download-bytes-per-s", "1e8", "--declare-rtt-s", "0.001"]
            clients[name] = spawn(name, "client.cli", *client_args(control, name, tmp_path / name, *declared))
            started.append(clients[name])

        plan = connected_plan(admin_url, clients={"owner", *HELPERS})
        assert {r["client_id"] for r in plan["rows"] if r["local"]} == {"owner"}
        assert host_of(plan, 1) == "fast"
        run_id = plan["rows"][1]["run_id"]
        url = plan["bridge_urls"][run_id]["fast"]
        assert url.startswith("wss://")  # the host serves TLS with the certificate the server vouches for
        no_token, wrong_token = refusals(url, plan["bridge_certs"][run_id]["fast"])
        assert "401" in no_token and "403" in wrong_token

        table = admin_cli(admin_url, "plan")
        assert "why" in table.splitlines()[1] and "fast" in table
        listed = json.loads(admin_cli(admin_url, "clients", "--json"))
        assert {c["client_id"]: c["status"] for c in listed} == {"owner": "ready", "fast": "ready", "mid": "ready"}

        killed_at = time.monotonic()
        clients["fast"].popen.kill()
        wait_until(
            lambda: next(c for c in admin(admin_url, "/v1/clients") if c["client_id"] == "fast")["status"] == "lost",
            HEARTBEAT_TIMEOUT_S + 5, "fast marked lost", interval_s=0.05,
        )
        noticed_s = time.monotonic() - killed_at
        # The server checks liveness every 0.25 s; allow that plus polling slack.
        assert noticed_s <= HEARTBEAT_TIMEOUT_S + 1.0, f"noticed after {noticed_s:.2f} s"

        replanned = connected_plan(admin_url, after=plan["generation"])
        assert host_of(replanned, 1) == "mid"
        assert "fast" not in replanned["clients"]
