"""The admin HTTP API over a real loopback socket."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from client.channel import ControlChannel
from proto.messages import ClientInfo, DeviceProfile

from .support import ADMIN_TOKEN, JOIN_TOKEN, running_app, server_config

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.mark.parametrize("route", ["/v1/status", "/v1/clients", "/v1/plan", "/v1/runs"])
async def test_routes_need_the_admin_token(tmp_path: Path, route: str) -> None:
    """Without the token (or with a wrong one) every route answers 401."""
    async with running_app(server_config(tmp_path)) as app, aiohttp.ClientSession() as http:
        async with http.get(app.admin_url + route) as response:
            assert response.status == 401
            assert "admin token" in (await response.json())["error"]
        async with http.get(app.admin_url + route, headers={"Authorization": "Bearer nope"}) as response:
            assert response.status == 401
        async with http.get(app.admin_url + route, headers=AUTH) as response:
            assert response.status == 200


async def test_clients_show_registered_profiles(tmp_path: Path) -> None:
    """A registered client appears with its status, owner flag and declared fields."""
    info = ClientInfo(version="t", hostname="h", platform="p", has_data=True, data_bytes=5, bridge_host="127.0.0.1")
    profile = DeviceProfile(flops_per_s=3e9, memory_bytes=1 << 30, declared=frozenset({"flops_per_s"}))
    async with (
        running_app(server_config(tmp_path)) as app,
        aiohttp.ClientSession(headers=AUTH) as http,
        ControlChannel(app.control_address) as channel,
    ):
        await channel.register(name="c1", join_token=JOIN_TOKEN, client_key=None, info=info, profile=profile)
        async with http.get(app.admin_url + "/v1/clients") as response:
            (client,) = await response.json()
        async with http.get(app.admin_url + "/v1/status") as response:
            status = await response.json()
    assert client["client_id"] == "c1" and client["status"] == "measuring"
    assert client["info"]["has_data"] is True
    assert client["profile"]["flops_per_s"] == 3e9 and client["profile"]["declared"] == ["flops_per_s"]
    assert status["clients"] == {"measuring": 1} and status["control_address"] == app.control_address


async def test_plan_without_model_explains_itself(tmp_path: Path) -> None:
    """With no model configured, the plan says so as JSON and as text."""
    async with running_app(server_config(tmp_path)) as app, aiohttp.ClientSession(headers=AUTH) as http:
        for _ in range(50):  # the first plan comes after settle_s
            async with http.get(app.admin_url + "/v1/plan") as response:
                plan = await response.json()
            if plan["generation"]:
                break
            await asyncio.sleep(0.1)
        async with http.get(app.admin_url + "/v1/plan?format=text") as response:
            text = await response.text()
    assert plan["plan_id"] == "" and "no model" in plan["error"]
    assert text.startswith("no plan: no model")


async def test_runs_is_an_empty_list(tmp_path: Path) -> None:
    """Until training runs exist, /v1/runs is an empty list."""
    async with (
        running_app(server_config(tmp_path)) as app,
        aiohttp.ClientSession(headers=AUTH) as http,
        http.get(app.admin_url + "/v1/runs") as response,
    ):
        assert await response.json() == []


async def test_runs_cannot_start_without_a_model(tmp_path: Path) -> None:
    """POST /v1/runs on a server without a model answers 400 with the fix, and nothing is listed."""
    async with running_app(server_config(tmp_path)) as app, aiohttp.ClientSession(headers=AUTH) as http:
        async with http.post(app.admin_url + "/v1/runs", json={"spec": {"rounds": 1}}) as response:
            assert response.status == 400
            assert "--model" in (await response.json())["error"]
        async with http.post(app.admin_url + "/v1/runs", json={"spec": {"rounds": 0}}) as response:
            assert response.status == 400 and "rounds" in (await response.json())["error"]
        async with http.get(app.admin_url + "/v1/runs") as response:
            assert await response.json() == []


async def test_unknown_runs_are_404(tmp_path: Path) -> None:
    """Showing or stopping a run that does not exist answers 404."""
    async with running_app(server_config(tmp_path)) as app, aiohttp.ClientSession(headers=AUTH) as http:
        async with http.get(app.admin_url + "/v1/runs/run-9") as response:
            assert response.status == 404
        async with http.post(app.admin_url + "/v1/runs/run-9/stop") as response:
            assert response.status == 404
