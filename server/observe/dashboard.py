"""The operator's dashboard: a page on the admin API's port, a login that sets a session cookie, live snapshots.

==================  =========================================================================
GET /               the dashboard with a valid session cookie; otherwise the login form (401)
POST /login         form field ``token`` (the admin token): a session cookie and 303 to ``/``;
                    a wrong token gets 401 and the form again
POST /logout        ends the session, clears the cookie, 303 to ``/``
GET /static/...     the page's HTML, CSS and JavaScript (uPlot vendored in static/vendor/uplot); no data
GET /v1/events      server-sent events: a JSON snapshot (status, clients, plan, run list, one run)
                    each second something changed, and every ``keepalive_s`` regardless;
                    ``?run=ID`` picks the run (default: the newest)
==================  =========================================================================

The operator pastes the admin token once. The cookie holds a random session id and the server
keeps only its SHA-256 digest (in memory: a restart logs everyone out); the cookie is HttpOnly,
SameSite=Strict, and Secure when the admin API serves TLS. A session cookie admits GET requests
only: the API's POST routes (start, stop a run) still need ``Authorization: Bearer``, so a page
on another port of the same host (same site, so it would carry the cookie) cannot act for the
operator. The page itself holds no data; it draws what ``/v1/events`` sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
SESSION_COOKIE = "titanic_session"
ERROR_MARK = "<!-- login-error -->"
WRONG_TOKEN = '<p class="error" role="alert">That is not the admin token.</p>'
# Routes anyone may load: the login form, the page's code, and the session's start and end.
PUBLIC_ROUTES = frozenset({"dashboard-page", "dashboard-login", "dashboard-logout", "dashboard-static"})
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# What the page draws of a run's history; the rest (per-step tokens, lrs, norms) stays in /v1/runs/ID.
HISTORY_FIELDS = (
    "round", "owner", "bridge_run", "losses", "val_loss", "ppl", "samples", "seconds", "stage_seconds",
    "step_seconds", "bytes_sent", "bytes_received", "idle_ratio",
)  # fmt: skip
RUN_FIELDS = (
    "run_id", "name", "participation", "state", "round", "rounds", "error", "owners", "pipelines", "plan_id",
    "resumed_from", "per_round", "traffic", "live", "created_at",
)  # fmt: skip
RUN_SUMMARY_FIELDS = ("run_id", "name", "state", "round", "rounds", "created_at")

Snapshot = Callable[[str | None], dict[str, Any]]


def _digest(session: str) -> bytes:
    return hashlib.sha256(session.encode()).digest()


class Sessions:
    """Dashboard sessions: random ids handed to browsers, of which only digests are kept.

    At most ``limit`` are open; opening one more ends the oldest.
    """

    def __init__(
        self, *, lifetime_s: float = 12 * 3600, limit: int = 64, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if lifetime_s <= 0 or limit < 1:
            raise ValueError("sessions need a positive lifetime and room for at least one")
        self.lifetime_s = lifetime_s
        self.limit = limit
        self.clock = clock
        self._expiry: dict[bytes, float] = {}  # digest -> deadline; insertion order is expiry order

    def open(self) -> str:
        """A new session id, for the cookie."""
        now = self.clock()
        for digest in [d for d, deadline in self._expiry.items() if deadline <= now]:
            del self._expiry[digest]
        while len(self._expiry) >= self.limit:
            del self._expiry[next(iter(self._expiry))]
        session = secrets.token_urlsafe(32)
        self._expiry[_digest(session)] = now + self.lifetime_s
        return session

    def valid(self, session: str) -> bool:
        """Whether ``session`` (a cookie's value, possibly forged or empty) is open and unexpired."""
        deadline = self._expiry.get(_digest(session))
        return deadline is not None and deadline > self.clock()

    def close(self, session: str) -> None:
        """End ``session`` (nothing happens if it is not open)."""
        self._expiry.pop(_digest(session), None)

    def __len__(self) -> int:
        return len(self._expiry)


def dashboard_snapshot(
    *,
    status: Mapping[str, Any],
    clients: Sequence[Mapping[str, Any]],
    plan: Mapping[str, Any],
    runs: Sequence[Mapping[str, Any]],
    run_id: str | None,
) -> dict[str, Any]:
    """What one event of ``/v1/events`` carries: the admin API's JSON, with one run (``run_id`` or the newest) in full."""
    chosen = next((r for r in runs if r["run_id"] == run_id), runs[-1] if runs else None)
    run = None
    if chosen is not None:
        run = {k: chosen[k] for k in RUN_FIELDS if k in chosen}
        run["history"] = [{k: h[k] for k in HISTORY_FIELDS if k in h} for h in chosen.get("history", [])]
    return {
        "status": dict(status),
        "clients": [dict(c) for c in clients],
        "plan": dict(plan),
        "runs": [{k: r[k] for k in RUN_SUMMARY_FIELDS if k in r} for r in runs],
        "run": run,
    }


def _without_clocks(snapshot: Mapping[str, Any]) -> str:
    """The snapshot less what changes by itself (uptime, heartbeat ages): if this is unchanged, nothing happened."""
    status = {k: v for k, v in snapshot["status"].items() if k != "uptime_s"}
    clients = [{k: v for k, v in c.items() if k != "seen_s_ago"} for c in snapshot["clients"]]
    return json.dumps({**snapshot, "status": status, "clients": clients}, sort_keys=True)


def sse_event(snapshot: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying ``snapshot`` as JSON (one line: JSON escapes newlines)."""
    return b"data: " + json.dumps(snapshot, separators=(",", ":")).encode() + b"\n\n"


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


class Dashboard:
    """The dashboard's routes and state: sessions, open event streams, and the switch that ends them."""

    def __init__(
        self,
        *,
        token: str,
        snapshot: Snapshot,
        secure_cookie: bool,
        sessions: Sessions | None = None,
        max_streams: int = 8,
        interval_s: float = 1.0,
        keepalive_s: float = 10.0,
    ) -> None:
        self._token = token.encode()
        self._snapshot = snapshot
        self.secure_cookie = secure_cookie
        self.sessions = sessions or Sessions()
        self.max_streams = max_streams
        self.interval_s = interval_s
        self.keepalive_s = keepalive_s
        self.streams = 0  # event streams open now
        self._closing = asyncio.Event()

    def admits(self, request: web.Request) -> bool:
        """Whether ``request`` may pass without the bearer header: a public route, or a read with a valid session."""
        resource = request.match_info.route.resource
        if resource is not None and resource.name in PUBLIC_ROUTES:
            return True
        return request.method in ("GET", "HEAD") and self._has_session(request)

    def mount(self, app: web.Application) -> None:
        """Add the dashboard's routes to ``app``, and end its event streams when ``app`` shuts down."""
        app.router.add_get("/", self.page, name="dashboard-page")
        app.router.add_post("/login", self.login, name="dashboard-login")
        app.router.add_post("/logout", self.logout, name="dashboard-logout")
        app.router.add_static("/static/", STATIC_DIR, name="dashboard-static")
        app.router.add_get("/v1/events", self.events)
        app.on_shutdown.append(self._shut_down)
        app[DASHBOARD] = self

    def _has_session(self, request: web.Request) -> bool:
        return self.sessions.valid(request.cookies.get(SESSION_COOKIE, ""))

    def _login_form(self, *, wrong: bool) -> web.Response:
        html = (STATIC_DIR / "login.html").read_text()
        if wrong:
            html = html.replace(ERROR_MARK, WRONG_TOKEN)
        headers = {**PAGE_HEADERS, "WWW-Authenticate": 'Bearer realm="titanic"'}
        return web.Response(text=html, content_type="text/html", status=401, headers=headers)

    async def page(self, request: web.Request) -> web.Response:
        if not self._has_session(request):
            return self._login_form(wrong=False)
        html = (STATIC_DIR / "dashboard.html").read_text()
        return web.Response(text=html, content_type="text/html", headers=PAGE_HEADERS)

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        presented = form.get("token", "")
        if not isinstance(presented, str) or not hmac.compare_digest(presented.strip().encode(), self._token):
            log.warning("dashboard login with a wrong token from %s", request.remote)
            return self._login_form(wrong=True)
        response = _see_other("/")
        response.set_cookie(
            SESSION_COOKIE, self.sessions.open(), max_age=int(self.sessions.lifetime_s), path="/",
            httponly=True, samesite="Strict", secure=self.secure_cookie,
        )  # fmt: skip
        return response

    async def logout(self, request: web.Request) -> web.Response:
        self.sessions.close(request.cookies.get(SESSION_COOKIE, ""))
        response = _see_other("/")
        response.del_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="Strict", secure=self.secure_cookie)
        return response

    async def events(self, request: web.Request) -> web.StreamResponse:
        if self.streams >= self.max_streams:
            return web.json_response(
                {"error": f"{self.max_streams} event streams are open already; close a dashboard tab and retry"},
                status=503, headers={"Retry-After": "5"},
            )  # fmt: skip
        run_id = request.query.get("run") or None
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )
        self.streams += 1
        try:
            await response.prepare(request)
            await response.write(b"retry: 2000\n\n")  # the browser reconnects 2 s after a drop
            await self._pump(request, response, run_id)
            if self._closing.is_set():
                await response.write_eof()
        except ConnectionResetError:  # the browser went away (aiohttp's ClientConnectionResetError included)
            pass
        finally:
            self.streams -= 1
        return response

    async def _pump(self, request: web.Request, response: web.StreamResponse, run_id: str | None) -> None:
        """Send a snapshot whenever it changed (checked every ``interval_s``), until the browser or the server goes."""
        last, sent_at = "", -float("inf")
        while not self._closing.is_set():
            if request.transport is None or request.transport.is_closing():
                return
            snapshot = self._snapshot(run_id)
            key = _without_clocks(snapshot)
            if key != last or time.monotonic() - sent_at >= self.keepalive_s:
                await response.write(sse_event(snapshot))
                last, sent_at = key, time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.interval_s)

    async def _shut_down(self, app: web.Application) -> None:
        self._closing.set()


DASHBOARD = web.AppKey("dashboard", Dashboard)  # app[DASHBOARD]: the mounted dashboard (its sessions, open streams)
