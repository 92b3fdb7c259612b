"""``titanic-server``: run the server, or ask a running one how it is doing.

::

    titanic-server run [--config server.toml] [flags]     serve until SIGTERM
                   [--log-format json]                    logs as JSON lines (default: text)
    titanic-server status  [--json]                       the server at a glance
    titanic-server clients [--json]                       clients and their measured profiles
    titanic-server plan    [--json]                       the plan: partition, blocks, client, why
    titanic-server runs    [--json]                       training runs
    titanic-server runs start FILE [--rounds N ...]       start a run described by a TOML file
                   [--resume RUN_ID]                      ... or continue RUN_ID from its last checkpoint
    titanic-server runs show ID | stop ID                 one run's progress per round; stop it
                   [--follow]                             show: its rounds and steps live until it ends
    titanic-server demo [--tiny]                          a server + 4 clients on loopback, parallel, LoRA

The admin commands talk to the admin API at ``--admin`` (default ``http://127.0.0.1:8750``)
with the bearer token from ``--token``, ``$TITANIC_ADMIN_TOKEN``, or the file
``<state dir>/admin_token`` the server writes when no token is configured.
``runs show ID --follow`` exits with status 0 when the run is done, and 1 when it failed or was stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from autograd_bridge.logs import configure_logging
from server.config import (
    AuthSettings,
    ControlSettings,
    ListenSettings,
    ModelSettings,
    PlanningSettings,
    ServerConfig,
    TlsSettings,
    load_config,
)
from server.observe.tables import clients_table, follow_run, plan_table, run_table, runs_table, status_table

DEFAULT_ADMIN = f"http://127.0.0.1:{ListenSettings().admin_port}"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``titanic-server``."""
    parser = argparse.ArgumentParser(prog="titanic-server", description="Titanic control-plane server.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the server until SIGTERM")
    run.add_argument("--config", type=Path, help="TOML config file (flags override it)")
    run.add_argument("--host", help="address of the gRPC control plane")
    run.add_argument("--port", type=int, help="its port (0: any free port)")
    run.add_argument("--admin-host", help="address of the admin API")
    run.add_argument("--admin-port", type=int, help="its port (0: any free port)")
    run.add_argument("--state-dir", type=Path, help="where weights, uploads and generated tokens live")
    run.add_argument("--join-token", action="append", help="a token clients join with (repeatable)")
    run.add_argument("--admin-token", help="bearer token of the admin API")
    run.add_argument("--tls-cert", type=Path, help="PEM certificate chain; with --tls-key serves TLS")
    run.add_argument("--tls-key", type=Path, help="PEM private key")
    run.add_argument("--model", help="model directory (or hub name) to plan for")
    run.add_argument("--stages", type=int, help="partitions per pipeline (default: the planner chooses)")
    run.add_argument("--init", choices=("pretrained", "random"),
                     help="random: pre-train from scratch (the model's config, weights drawn from --init-seed)")
    run.add_argument("--init-seed", type=int, help="seed of a random initialisation (default 0)")
    run.add_argument("--heartbeat-interval", type=float, help="seconds between client heartbeats")
    run.add_argument("--heartbeat-timeout", type=float, help="seconds of silence before a client is lost")
    run.add_argument("--settle", type=float, help="seconds without client changes before replanning")
    run.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    run.add_argument("--log-format", choices=("text", "json"), default="text",
                     help="json: one JSON object per line (time, level, logger, message, exception)")

    for name, text in (
        ("status", "the server at a glance"),
        ("clients", "registered clients and their profiles"),
        ("plan", "the current plan, one row per partition"),
        ("runs", "training runs"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--admin", default=os.environ.get("TITANIC_ADMIN_URL", DEFAULT_ADMIN), help="admin API URL")
        sub.add_argument("--token", help="admin token (default: $TITANIC_ADMIN_TOKEN or <state dir>/admin_token)")
        sub.add_argument("--state-dir", type=Path, default=ListenSettings().state_dir, help="server state dir")
        sub.add_argument("--ca", type=Path, help="CA file to verify an https admin API")
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
        if name == "runs":
            sub.add_argument("action", nargs="?", default="list", choices=("list", "start", "show", "stop"))
            sub.add_argument("target", nargs="?", help="start: the run's TOML file; show, stop: the run id")
            sub.add_argument("--resume", metavar="RUN_ID", help="start: continue this run from its last checkpoint")
            sub.add_argument("--follow", action="store_true",
                             help="show: its rounds and each owner's steps live (polls twice a second) until it ends")
            for flag, kind in RUN_FLAGS.items():
                sub.add_argument(f"--{flag.replace('_', '-')}", dest=f"run_{flag}", type=kind, help=f"override {flag}")
    demo = commands.add_parser("demo", help="the training demo (titanic-testbed demo): server + 4 clients here")
    demo.add_argument("demo_args", nargs=argparse.REMAINDER, help="passed on to titanic-testbed demo")
    return parser


# Run settings a flag of ``runs start`` overrides (the file holds the rest): top-level keys of a
# run file or the flat keys of older ones, which name a key of a section (server.training.spec).
RUN_FLAGS: dict[str, type] = {
    "case": int,
    "rounds": int,
    "steps_per_round": int,
    "batch_size": int,
    "seq_len": int,
    "lr": float,
    "seed": int,
    "finetune": str,
    "tokenizer": str,
    "aggregator": str,
    "server_lr": float,
}


# The tokens docker-compose.yml falls back to: public, so fine for a demo on one's own machine only.
DEMO_TOKENS = frozenset({"demo-join", "demo-admin"})
DEMO_ENV = "TITANIC_DEMO"  # "1": this is a demo, the public demo tokens may be used


def check_not_demo_tokens(auth: AuthSettings) -> None:
    """Refuse the public demo tokens unless ``TITANIC_DEMO=1`` says this server is a demo."""
    used = DEMO_TOKENS & {*auth.join_tokens, auth.admin_token}
    if used and os.environ.get(DEMO_ENV) != "1":
        raise ValueError(
            f"the token(s) {', '.join(sorted(used))} are the public demo tokens; set TITANIC_JOIN_TOKEN and "
            f"TITANIC_ADMIN_TOKEN to secrets of your own, or {DEMO_ENV}=1 if this is a demo on your own machine"
        )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The config file (if any) with the flags applied on top."""
    config = load_config(args.config) if args.config else ServerConfig()

    def override(section: Any, **values: Any) -> Any:
        given = {k: v for k, v in values.items() if v is not None}
        return dataclasses.replace(section, **given) if given else section

    server = override(
        config.server,
        host=args.host,
        port=args.port,
        admin_host=args.admin_host,
        admin_port=args.admin_port,
        state_dir=args.state_dir,
    )
    auth: AuthSettings = override(
        config.auth,
        join_tokens=tuple(args.join_token) if args.join_token else None,
        admin_token=args.admin_token or os.environ.get("TITANIC_ADMIN_TOKEN") or None,
    )
    check_not_demo_tokens(auth)
    tls = config.tls
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_cert is not None:
        tls = TlsSettings(cert=args.tls_cert, key=args.tls_key)
    control: ControlSettings = override(
        config.control, heartbeat_interval_s=args.heartbeat_interval, heartbeat_timeout_s=args.heartbeat_timeout
    )
    model = config.model
    if args.model is not None:
        model = dataclasses.replace(model, path=args.model) if model else ModelSettings(path=args.model)
    changes = {k: v for k, v in (("stages", args.stages), ("init", args.init), ("init_seed", args.init_seed)) if v is not None}
    if changes:
        if model is None:
            raise ValueError(f"--{next(iter(changes)).replace('_', '-')} needs a model: pass --model or set [model] path")
        model = dataclasses.replace(model, **changes)
    planning: PlanningSettings = override(config.planning, settle_s=args.settle)
    return ServerConfig(server=server, auth=auth, tls=tls, control=control, model=model, planning=planning)


# client/cli.py has the same two: the server and the client import nothing from each other.
def _run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    config = config_from_args(args)
    model = plan = None
    if config.model is not None:
        from server.planning.model_source import hf_model_source, planner_for

        model = hf_model_source(config.model, work_dir=Path(config.server.state_dir) / "model")
        model.check()  # a missing model stops the server before it loads the rest
        plan = planner_for(model, config.model, config.planning)
    from server.app import ServerApp, serve

    app = ServerApp(config, model=model, plan=plan)
    asyncio.run(serve(app))
    return 0


def admin_token(args: argparse.Namespace) -> str:
    """The admin token from the flag, the environment, or the server's state dir."""
    if args.token:
        return str(args.token)
    if os.environ.get("TITANIC_ADMIN_TOKEN"):
        return os.environ["TITANIC_ADMIN_TOKEN"]
    path = Path(args.state_dir) / "admin_token"
    if path.exists():
        return path.read_text().strip()
    raise ValueError(f"no admin token: pass --token, set TITANIC_ADMIN_TOKEN, or point --state-dir at the server's ({path})")


def admin_get(base: str, route: str, token: str, *, ca: Path | None = None, timeout_s: float = 10.0) -> Any:
    """GET ``route`` from the admin API and return the decoded JSON."""
    request = urllib.request.Request(base.rstrip("/") + route, headers={"Authorization": f"Bearer {token}"})
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise ValueError("the admin API refused the token; pass the server's admin token with --token") from exc
        raise ValueError(f"the admin API answered {exc.code} for {route}") from exc
    except urllib.error.URLError as exc:
        raise ValueError(f"cannot reach the admin API at {base} ({exc.reason}); is titanic-server running?") from exc


_VIEWS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "status": ("/v1/status", status_table),
    "clients": ("/v1/clients", clients_table),
    "plan": ("/v1/plan", plan_table),
    "runs": ("/v1/runs", runs_table),
}


def admin_post(base: str, route: str, token: str, body: Any, *, ca: Path | None = None, timeout_s: float = 30.0) -> Any:
    """POST JSON ``body`` to ``route`` of the admin API and return the decoded answer."""
    request = urllib.request.Request(
        base.rstrip("/") + route,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            detail = json.load(exc).get("error", "")
        except ValueError:
            detail = ""
        raise ValueError(f"the admin API answered {exc.code} for {route}: {detail}") from exc
    except urllib.error.URLError as exc:
        raise ValueError(f"cannot reach the admin API at {base} ({exc.reason}); is titanic-server running?") from exc


def _runs(args: argparse.Namespace) -> int:
    from server.training.spec import load_run_spec

    token = admin_token(args)
    if args.action in ("show", "stop", "start") and not args.target:
        what = "the run's TOML file" if args.action == "start" else "the run id"
        raise ValueError(f"runs {args.action} needs {what}")
    if args.follow and args.action != "show":
        raise ValueError("--follow goes with runs show ID")
    if args.action == "start":
        overrides = {flag: getattr(args, f"run_{flag}") for flag in RUN_FLAGS}
        spec = load_run_spec(args.target, overrides)
        request: dict[str, Any] = {"spec": spec.to_json()}
        if args.resume:
            request["resume"] = args.resume
        body = admin_post(args.admin, "/v1/runs", token, request, ca=args.ca)
    elif args.action == "stop":
        body = admin_post(args.admin, f"/v1/runs/{args.target}/stop", token, {}, ca=args.ca)
    elif args.action == "show" and args.follow:
        try:  # the progress goes to stderr when stdout is for JSON
            body = follow_run(lambda: admin_get(args.admin, f"/v1/runs/{args.target}", token, ca=args.ca),
                              sys.stderr if args.json else sys.stdout)
        except KeyboardInterrupt:
            return 130
    elif args.action == "show":
        body = admin_get(args.admin, f"/v1/runs/{args.target}", token, ca=args.ca)
    else:
        body = admin_get(args.admin, "/v1/runs", token, ca=args.ca)
    if args.json:
        print(json.dumps(body, indent=2, sort_keys=True))
    else:
        print(runs_table(body) if args.action == "list" else run_table(body))
    return 1 if args.follow and body["state"] != "done" else 0


def _admin(args: argparse.Namespace) -> int:
    if args.command == "runs":
        return _runs(args)
    route, render = _VIEWS[args.command]
    body = admin_get(args.admin, route, admin_token(args), ca=args.ca)
    print(json.dumps(body, indent=2, sort_keys=True) if args.json else render(body))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``titanic-server``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            # The demo lives in the testbed, which builds on the server: hand over to it as a
            # program (the server never imports the testbed).
            os.execv(sys.executable, [sys.executable, "-m", "testbed.cli", "demo", *args.demo_args])
        return _run(args) if args.command == "run" else _admin(args)
    except ValueError as exc:
        print(f"titanic-server: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
