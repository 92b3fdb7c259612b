"""The admin HTTP API (aiohttp): what the operator and ``titanic-server status|clients|plan|runs`` see.

Every route needs ``Authorization: Bearer <admin token>``; without it the answer is 401. The dashboard
(:mod:`server.observe.dashboard`: ``/``, its login and ``GET /v1/events``) trades the token for a
session cookie, which GET routes accept as well.

=================  ============================================================
GET /v1/status     version, uptime, addresses, clients by status, the plan's state
GET /v1/clients    every client with its profile (declared fields listed)
GET /v1/plan       the current plan, one row per partition with the reason;
                   ``?format=text`` answers the table ``titanic-server plan`` prints
GET /v1/runs       training runs, oldest first
POST /v1/runs      start a run: body ``{"spec": {...}}`` (the run file's settings), plus
                   ``"resume": "<run id>"`` to continue that run from its last checkpoint
GET /v1/runs/ID    one run: state, round, per-round losses and validation perplexity
POST /v1/runs/ID/stop  stop a run (it keeps its checkpoints)
GET /v1/events     the dashboard's live snapshots (server-sent events)
GET /metrics       the same facts for Prometheus (:mod:`server.observe.metrics`)
=================  ============================================================
"""

from __future__ import annotations

import hmac
import json
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from server import __version__
from server.control.state import ClientRecord, ControlState, Deployment
from server.observe.dashboard import Dashboard, dashboard_snapshot
from server.observe.metrics import metrics_handler, metrics_registry
from server.observe.tables import plan_table
from server.training.run_manager import RunManager, spec_and_resume

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_BODY_BYTES = 256 * 1024  # a run spec is a few hundred bytes; nothing the API takes is near this
MAX_JSON_DEPTH = 16  # a run spec nests three levels deep


def json_depth(text: str) -> int:
    """How deeply the arrays and objects of JSON ``text`` nest (brackets inside strings do not count)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is out of range; every number must be finite")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows; every number must be finite")


def parse_json_body(raw: bytes) -> Any:
    """A request body as JSON, refusing (ValueError) what is too deep or holds non-finite numbers."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError("the body is not UTF-8 text") from exc
    if json_depth(text) > MAX_JSON_DEPTH:
        raise ValueError(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the body is not JSON: {exc}") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminContext:
    """What the admin API reports on."""

    state: ControlState
    control_address: str  # host:port of the gRPC control plane
    tls: bool
    model: str  # the configured model, or "" when none
    started_at: float  # time.monotonic() at start
    clock: Callable[[], float] = time.monotonic  # the handler's clock (for "last seen")
    runs: RunManager | None = None  # training runs; None: this server cannot train


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
        "bridge_certs": {k: dict(v) for k, v in deployment.bridge_certs.items()},  # what owners are told to trust
        "connected": list(deployment.connected),
        "rows": rows,
    }


def _require_token(token: str, dashboard: Dashboard) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        presented = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(presented, expected) and not dashboard.admits(request):
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

    def status_json() -> dict[str, Any]:
        clients = context.state.list_clients()
        plan = deployment_json(context.state.get_deployment())
        return {
            "version": __version__,
            "uptime_s": time.monotonic() - context.started_at,
            "control_address": context.control_address,
            "tls": context.tls,
            "model": context.model,
            "clients": dict(Counter(str(c.status) for c in clients)),
            "plan": {k: plan[k] for k in ("generation", "plan_id", "state", "error")},
        }

    def snapshot(run_id: str | None) -> dict[str, Any]:
        now = context.clock()
        return dashboard_snapshot(
            status=status_json(),
            clients=[client_json(c, now) for c in context.state.list_clients()],
            plan=deployment_json(context.state.get_deployment()),
            runs=[r.to_json() for r in context.runs.list_runs()] if context.runs else [],
            run_id=run_id,
        )

    async def status(request: web.Request) -> web.Response:
        return web.json_response(status_json())

    async def clients(request: web.Request) -> web.Response:
        now = context.clock()
        return web.json_response([client_json(c, now) for c in context.state.list_clients()])

    async def plan(request: web.Request) -> web.Response:
        body = deployment_json(context.state.get_deployment())
        if request.query.get("format") == "text":
            return web.Response(text=plan_table(body) + "\n")
        return web.json_response(body)

    async def runs(request: web.Request) -> web.Response:
        if context.runs is None:
            return web.json_response([])
        return web.json_response([r.to_json() for r in context.runs.list_runs()])

    def no_runs() -> web.Response:
        return web.json_response({"error": "this server cannot train (no run manager)"}, status=404)

    async def start_run(request: web.Request) -> web.Response:
        if context.runs is None:
            return no_runs()
        try:
            body = parse_json_body(await request.read())
            if not isinstance(body, dict):
                raise ValueError('send a JSON body {"spec": {...}}')
            spec, resume = spec_and_resume(body)
            record = context.runs.start(spec, resume=resume)
        except (TypeError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(record.to_json(), status=201)

    async def show_run(request: web.Request) -> web.Response:
        record = context.runs.get(request.match_info["run_id"]) if context.runs else None
        if record is None:
            return web.json_response({"error": f"no run {request.match_info['run_id']!r}; see GET /v1/runs"}, status=404)
        return web.json_response(record.to_json())

    async def stop_run(request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        if context.runs is None or context.runs.get(run_id) is None:
            return web.json_response({"error": f"no run {run_id!r}; see GET /v1/runs"}, status=404)
        return web.json_response(context.runs.stop(run_id).to_json())

    dashboard = Dashboard(token=token, snapshot=snapshot, secure_cookie=context.tls)
    # Bodies over the limit answer 413 before a handler reads them.
    app = web.Application(middlewares=[_require_token(token, dashboard)], client_max_size=MAX_BODY_BYTES)
    dashboard.mount(app)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/clients", clients)
    app.router.add_get("/v1/plan", plan)
    app.router.add_get("/v1/runs", runs)
    app.router.add_post("/v1/runs", start_run)
    app.router.add_get("/v1/runs/{run_id}", show_run)
    app.router.add_post("/v1/runs/{run_id}/stop", stop_run)
    app.router.add_get("/metrics", metrics_handler(metrics_registry(context.state, context.runs, clock=context.clock)))
    return app
