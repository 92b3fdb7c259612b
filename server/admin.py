"""The admin HTTP API (aiohttp): what the operator and ``titanic-server status|clients|plan|runs`` see.

Every route needs ``Authorization: Bearer <admin token>``; without it the answer is 401.

=================  ============================================================
GET /v1/status     version, uptime, addresses, clients by status, the plan's state
GET /v1/clients    every client with its profile (declared fields listed)
GET /v1/plan       the current plan, one row per partition with the reason;
                   ``?format=text`` answers the table ``titanic-server plan`` prints
GET /v1/runs       training runs (none until the training issue lands)
=================  ============================================================
"""

from __future__ import annotations

import hmac
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from . import __version__
from .state import ClientRecord, ControlState, Deployment
from .tables import plan_table

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminContext:
    """What the admin API reports on."""

    state: ControlState
    control_address: str  # host:port of the gRPC control plane
    tls: bool
    model: str  # the configured model, or "" when none
    started_at: float  # time.monotonic() at start
    clock: Callable[[], float] = time.monotonic  # the handler's clock (for "last seen")


def client_json(record: ClientRecord, now: float) -> dict[str, Any]:
    """A client as the admin API shows it."""
    profile = asdict(record.profile)
    profile["declared"] = sorted(record.profile.declared)
    profile["training_memory_bytes"] = record.profile.training_memory_bytes
    return {
        "client_id": record.client_id,
        "status": str(record.status),
        "status_reason": record.status_reason,
        "address": record.address,
        "registered_at": record.registered_at,
        "seen_s_ago": max(0.0, now - record.last_seen),
        "info": asdict(record.info),
        "profile": profile,
        "free_memory_bytes": record.free_memory_bytes,
        "runs": [{**asdict(r), "state": str(r.state), "partitions": list(r.partitions)} for r in record.runs],
    }


def deployment_json(deployment: Deployment | None) -> dict[str, Any]:
    """The plan as the admin API shows it."""
    if deployment is None:
        return {"generation": 0, "plan_id": "", "state": "none", "error": "no plan made yet", "rows": []}
    rows = [{**asdict(r), "blocks": r.blocks, "local": r.local} for r in deployment.rows]
    return {
        "generation": deployment.generation,
        "plan_id": deployment.plan_id,
        "state": deployment.state,
        "error": deployment.error,
        "created_at": deployment.created_at,
        "owners": list(deployment.owners),
        "clients": list(deployment.clients),
        "summary": deployment.summary,
        "bridge_urls": {k: dict(v) for k, v in deployment.bridge_urls.items()},
        "connected": list(deployment.connected),
        "rows": rows,
    }


def _require_token(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        presented = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(presented, expected):
            return web.json_response(
                {"error": "missing or wrong admin token; send 'Authorization: Bearer <token>'"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="titanic"'},
            )
        return await handler(request)

    return middleware


def admin_app(context: AdminContext, *, token: str) -> web.Application:
    """The admin API over ``context``, guarded by ``token``."""
    if not token:
        raise ValueError("the admin API needs a token")

    async def status(request: web.Request) -> web.Response:
        clients = context.state.list_clients()
        deployment = context.state.get_deployment()
        plan = deployment_json(deployment)
        return web.json_response(
            {
                "version": __version__,
                "uptime_s": time.monotonic() - context.started_at,
                "control_address": context.control_address,
                "tls": context.tls,
                "model": context.model,
                "clients": dict(Counter(str(c.status) for c in clients)),
                "plan": {k: plan[k] for k in ("generation", "plan_id", "state", "error")},
            }
        )

    async def clients(request: web.Request) -> web.Response:
        now = context.clock()
        return web.json_response([client_json(c, now) for c in context.state.list_clients()])

    async def plan(request: web.Request) -> web.Response:
        body = deployment_json(context.state.get_deployment())
        if request.query.get("format") == "text":
            return web.Response(text=plan_table(body) + "\n")
        return web.json_response(body)

    async def runs(request: web.Request) -> web.Response:
        return web.json_response([])

    app = web.Application(middlewares=[_require_token(token)])
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/clients", clients)
    app.router.add_get("/v1/plan", plan)
    app.router.add_get("/v1/runs", runs)
    return app
