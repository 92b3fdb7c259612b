"""The dashboard's login, session cookie and event stream over a real loopback socket (no browser)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from server.control.state import InMemoryState
from server.observe.admin import AdminContext, admin_app
from server.observe.dashboard import (
    DASHBOARD,
    SESSION_COOKIE,
    Dashboard,
    Sessions,
    dashboard_snapshot,
)

from .conftest import FakeClock
from .support import ADMIN_TOKEN


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[tuple[str, web.AppRunner]]:
    """``app`` on a free loopback port: its base URL and runner (cleaned up afterwards unless already)."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", runner
    finally:
        await runner.cleanup()


def browser(**kwargs: Any) -> aiohttp.ClientSession:
    """An HTTP client that keeps cookies from an IP address (aiohttp's default jar ignores them)."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), **kwargs)


def admin() -> web.Application:
    """The admin API over an empty control state, with its dashboard."""
    context = AdminContext(state=InMemoryState(), control_address="127.0.0.1:1", tls=False, model="", started_at=0.0)
    return admin_app(context, token=ADMIN_TOKEN)


async def logged_in(http: aiohttp.ClientSession, url: str) -> str:
    """Log in with the admin token; returns the session cookie's value."""
    async with http.post(url + "/login", data={"token": ADMIN_TOKEN}, allow_redirects=False) as response:
        assert response.status == 303 and response.headers["Location"] == "/"
        return response.cookies[SESSION_COOKIE].value


async def next_event(response: aiohttp.ClientResponse, timeout_s: float = 5.0) -> dict[str, Any]:
    """The next ``data:`` event of a server-sent event stream, parsed as JSON."""
    async with asyncio.timeout(timeout_s):
        while True:
            line = await response.content.readline()
            assert line, "the stream ended"
            if line.startswith(b"data: "):
                event: dict[str, Any] = json.loads(line[len(b"data: ") :])
                return event


async def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def test_sessions_open_expire_and_close() -> None:
    """A session is valid until it expires or is closed; a forged or empty value never is."""
    clock = FakeClock()
    sessions = Sessions(lifetime_s=10, clock=clock)
    first, second = sessions.open(), sessions.open()
    assert first != second and sessions.valid(first) and sessions.valid(second)
    assert not sessions.valid("") and not sessions.valid(first + "x")
    sessions.close(first)
    assert not sessions.valid(first) and sessions.valid(second)
    clock.advance(10)
    assert not sessions.valid(second)


def test_sessions_keep_only_digests_and_end_the_oldest_beyond_the_limit() -> None:
    """The server never stores a session id itself, and the (limit+1)-th login ends the oldest session."""
    sessions = Sessions(limit=2)
    ids = [sessions.open() for _ in range(3)]
    assert len(sessions) == 2 and [sessions.valid(s) for s in ids] == [False, True, True]
    assert not any(s.encode() in d for s in ids for d in sessions._expiry)


def test_snapshot_shows_the_chosen_run_with_the_history_the_page_draws() -> None:
    """The snapshot holds the chosen (or newest) run, its history trimmed to what the page draws, idle ratio included."""
    entry = {"round": 1, "owner": "a", "bridge_run": "p0", "losses": [2.0], "lrs": [0.1], "ppl": 5.0, "idle_ratio": 0.25}
    runs = [{"run_id": f"run-{i}", "state": "done", "round": 1, "rounds": 1, "history": [entry]} for i in (1, 2)]
    newest = dashboard_snapshot(status={}, clients=[], plan={}, runs=runs, run_id=None)
    chosen = dashboard_snapshot(status={}, clients=[], plan={}, runs=runs, run_id="run-1")
    assert newest["run"]["run_id"] == "run-2" and chosen["run"]["run_id"] == "run-1"
    assert chosen["run"]["history"] == [{k: v for k, v in entry.items() if k != "lrs"}]
    assert [r["run_id"] for r in newest["runs"]] == ["run-1", "run-2"] and "history" not in newest["runs"][0]
    assert dashboard_snapshot(status={}, clients=[], plan={}, runs=[], run_id=None)["run"] is None


async def test_without_a_session_the_page_is_the_login_form() -> None:
    """GET / without a cookie answers 401 with the login form and none of the dashboard."""
    async with serving(admin()) as (url, _), browser() as http, http.get(url + "/") as response:
        page = await response.text()
    assert response.status == 401 and 'name="token"' in page and "clients-panel" not in page
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]


async def test_a_wrong_token_gets_401_and_no_cookie() -> None:
    """Logging in with a wrong token answers 401 with the form and an error, and sets no cookie."""
    async with (
        serving(admin()) as (url, _),
        browser() as http,
        http.post(url + "/login", data={"token": "nope"}, allow_redirects=False) as response,
    ):
        page = await response.text()
        assert response.status == 401 and "not the admin token" in page and 'name="token"' in page
        assert SESSION_COOKIE not in response.cookies and len(http.cookie_jar) == 0


async def test_login_sets_an_http_only_strict_cookie_that_the_api_accepts() -> None:
    """The right token sets an HttpOnly SameSite=Strict cookie; with it / is the dashboard and GET routes answer."""
    async with serving(admin()) as (url, _), browser() as http:
        async with http.post(url + "/login", data={"token": ADMIN_TOKEN}, allow_redirects=False) as response:
            header = response.headers["Set-Cookie"]
        assert response.status == 303 and "HttpOnly" in header and "SameSite=Strict" in header and "Path=/" in header
        async with http.get(url + "/") as page:
            assert page.status == 200 and "clients-panel" in await page.text()
        for route in ("/v1/runs", "/v1/clients", "/v1/status", "/v1/plan"):
            async with http.get(url + route) as answer:
                assert answer.status == 200, route
        async with http.get(url + "/v1/runs") as answer:
            assert await answer.json() == []


async def test_a_bad_cookie_is_refused() -> None:
    """A forged session cookie gets 401 from the API and the login form from /."""
    cookies = {SESSION_COOKIE: "forged"}
    async with serving(admin()) as (url, _), browser(cookies=cookies) as http:
        async with http.get(url + "/v1/runs") as answer:
            assert answer.status == 401 and "admin token" in (await answer.json())["error"]
        async with http.get(url + "/") as page:
            assert page.status == 401 and 'name="token"' in await page.text()
        async with http.get(url + "/v1/events") as events:
            assert events.status == 401


async def test_the_cookie_admits_reads_only() -> None:
    """POST routes of the API still need the bearer header: a session cookie cannot start a run."""
    async with serving(admin()) as (url, _), browser() as http:
        await logged_in(http, url)
        async with http.post(url + "/v1/runs", json={"spec": {"rounds": 1}}) as answer:
            assert answer.status == 401


async def test_logout_ends_the_session() -> None:
    """After logout the cookie is cleared, and the old session id no longer opens anything."""
    async with serving(admin()) as (url, _), browser() as http:
        session = await logged_in(http, url)
        async with http.post(url + "/logout", allow_redirects=False) as response:
            assert response.status == 303 and response.cookies[SESSION_COOKIE].value == ""
        async with browser(cookies={SESSION_COOKIE: session}) as old, old.get(url + "/v1/runs") as answer:
            assert answer.status == 401


async def test_the_event_stream_sends_a_snapshot_and_ends_when_the_browser_goes() -> None:
    """GET /v1/events streams a JSON snapshot of the admin API; when the client disconnects the server closes its side."""
    app = admin()
    async with serving(app) as (url, _), browser() as http:
        await logged_in(http, url)
        async with http.get(url + "/v1/events") as response:
            assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
            snapshot = await next_event(response)
            assert app[DASHBOARD].streams == 1
        assert set(snapshot) == {"status", "clients", "plan", "runs", "run"}
        assert snapshot["clients"] == [] and snapshot["run"] is None and snapshot["plan"]["state"] == "none"
        await wait_for(lambda: app[DASHBOARD].streams == 0, 5, "the server to close the stream")


async def test_the_event_stream_ends_cleanly_when_the_server_stops() -> None:
    """Stopping the server ends an open stream at once (it does not wait for the shutdown timeout)."""
    app = admin()
    async with serving(app) as (url, runner), browser() as http:
        await logged_in(http, url)
        async with http.get(url + "/v1/events") as response:
            await next_event(response)
            started = time.monotonic()
            await runner.cleanup()
            assert time.monotonic() - started < 3
            async with asyncio.timeout(5):
                await response.content.read()  # the stream ends: no hang
        assert app[DASHBOARD].streams == 0


async def test_event_streams_are_bounded() -> None:
    """Past the limit of open streams, another one is refused with 503 and a Retry-After."""
    app = admin()
    limit = app[DASHBOARD].max_streams
    async with serving(app) as (url, _), browser() as http, contextlib.AsyncExitStack() as stack:
        await logged_in(http, url)
        for _ in range(limit):
            response = await stack.enter_async_context(http.get(url + "/v1/events"))
            await next_event(response)
        async with http.get(url + "/v1/events") as refused:
            assert refused.status == 503 and refused.headers["Retry-After"]


async def test_the_stream_sends_again_only_when_something_changed() -> None:
    """Heartbeat ages and uptime alone send nothing new; another change is sent within an interval."""
    state: dict[str, Any] = {"status": {"uptime_s": 1.0}, "clients": [{"client_id": "a", "seen_s_ago": 0.1}]}

    def snapshot(run_id: str | None) -> dict[str, Any]:
        return {**json.loads(json.dumps(state)), "plan": {}, "runs": [], "run": None}

    dashboard = Dashboard(token="t", snapshot=snapshot, secure_cookie=False, interval_s=0.05, keepalive_s=60)
    app = web.Application()
    dashboard.mount(app)
    session = dashboard.sessions.open()
    async with (
        serving(app) as (url, _),
        browser(cookies={SESSION_COOKIE: session}) as http,
        http.get(url + "/v1/events") as response,
    ):
        assert (await next_event(response))["clients"][0]["seen_s_ago"] == 0.1
        state["status"]["uptime_s"], state["clients"][0]["seen_s_ago"] = 2.0, 0.9
        with pytest.raises(TimeoutError):
            await next_event(response, timeout_s=0.4)
        state["clients"][0]["status"] = "lost"
        assert (await next_event(response))["clients"][0] == {"client_id": "a", "seen_s_ago": 0.9, "status": "lost"}
