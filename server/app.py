"""The running server: gRPC control plane, admin API, liveness checks and the coordinator.

``titanic-server run`` calls :func:`serve`, which prints one line once both endpoints accept
connections (ports chosen by the system when configured as 0)::

    titanic-server ready control=127.0.0.1:50051 admin=http://127.0.0.1:8750

and runs until SIGTERM or SIGINT, then stops both endpoints and exits with status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import signal
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from aiohttp import web

from proto.messages import StatusReport
from server.config import MIB, AuthSettings, ServerConfig
from server.control.handler import ControlHandler, ControlListener
from server.control.servicer import ControlServicer, add_to_server
from server.control.sqlite_state import SqliteState
from server.control.state import ControlState
from server.control.weights import WeightStore
from server.database import DATABASE_FILE, Database
from server.observe.admin import AdminContext, admin_app
from server.planning.coordinator import Coordinator, ModelSource, PlanFunction
from server.training.checkpoints import CheckpointStore
from server.training.run_manager import RunManager
from server.training.sqlite_store import SqliteRunStore
from server.training.store import InMemoryRunStore, RunStore

log = logging.getLogger(__name__)

# Chunks are at most 3 MiB (config check); the limit leaves room for framing.
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 4 * MIB),
    ("grpc.max_receive_message_length", 4 * MIB),
]


def read_or_create_secret(path: Path) -> str:
    """The secret stored at ``path``, created (random, mode 0600) when missing."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


class _Listeners:
    """Passes the handler's notifications to several listeners, in order."""

    def __init__(self, *listeners: ControlListener) -> None:
        self.listeners = listeners

    def membership_changed(self) -> None:
        for listener in self.listeners:
            listener.membership_changed()

    def status_reported(self, client_id: str, report: StatusReport) -> None:
        for listener in self.listeners:
            listener.status_reported(client_id, report)


class ServerApp:
    """All parts of a server, started and stopped together."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        model: ModelSource | None = None,
        plan: PlanFunction | None = None,
        state: ControlState | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.plan = plan
        # Given a state (tests), runs live in memory next to it; else both persist in the state dir.
        self.database: Database | None = None
        self.run_store: RunStore
        if state is None:
            self.database = Database(Path(config.server.state_dir) / DATABASE_FILE)
            state, self.run_store = SqliteState(self.database), SqliteRunStore(self.database)
        else:
            self.run_store = InMemoryRunStore()
        self.state = state
        self.control_port = 0
        self.admin_port = 0
        self.admin_token = ""
        self._grpc: grpc.aio.Server | None = None
        self._admin: web.AppRunner | None = None
        self._coordinator: Coordinator | None = None
        self.runs: RunManager | None = None
        self._liveness: asyncio.Task[None] | None = None
        self._warm_up: asyncio.Task[None] | None = None
        self.handler: ControlHandler | None = None
        self.failed = asyncio.Event()  # set when the server cannot go on (its model does not load)
        self.fatal = ""  # why

    @property
    def control_address(self) -> str:
        """host:port of the control plane (valid after start)."""
        return f"{self.config.server.host}:{self.control_port}"

    @property
    def admin_url(self) -> str:
        """Base URL of the admin API (valid after start)."""
        scheme = "https" if self.config.tls else "http"
        return f"{scheme}://{self.config.server.admin_host}:{self.admin_port}"

    async def _prepare_model(self, prepare: Callable[[int], None]) -> None:
        try:
            await asyncio.to_thread(prepare, self.config.planning.seq_len)
        except Exception as exc:  # whatever the loader raises, nothing can be planned: stop with the reason
            name = self.config.model.path if self.config.model else "?"
            self.fatal = f"the model {name} cannot be loaded: {type(exc).__name__}: {exc}"
            log.error("%s", self.fatal)
            self.failed.set()

    def _auth(self, state_dir: Path) -> AuthSettings:
        auth = self.config.auth
        if not auth.join_tokens and not auth.client_keys:
            token = read_or_create_secret(state_dir / "join_token")
            log.warning("no join token configured; clients join with the one in %s", state_dir / "join_token")
            auth = AuthSettings(join_tokens=(token,), client_keys=auth.client_keys, admin_token=auth.admin_token)
        return auth

    async def start(self) -> None:
        """Bind both endpoints and start the background tasks."""
        cfg = self.config
        check = getattr(self.model, "check", None)
        if callable(check):
            check()  # ValueError with the reason, before anything listens
        state_dir = Path(cfg.server.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.admin_token = cfg.auth.admin_token or read_or_create_secret(state_dir / "admin_token")
        weights = WeightStore(state_dir / "weights", chunk_bytes=cfg.control.max_chunk_bytes)
        handler = ControlHandler(self.state, settings=cfg.control, auth=self._auth(state_dir), weights=weights)
        self.handler = handler
        self._coordinator = Coordinator(
            handler, model=self.model, plan=self.plan, settings=cfg.planning, scratch_dir=state_dir / "scratch"
        )
        self.runs = RunManager(
            handler,
            model=self.model,
            model_name=cfg.model.path if cfg.model else "",
            stages=cfg.model.stages if cfg.model else None,
            checkpoints=CheckpointStore(state_dir / "checkpoints"),
            store=self.run_store,
        )
        handler.listener = _Listeners(self._coordinator, self.runs)

        server = grpc.aio.server(options=GRPC_OPTIONS)
        add_to_server(ControlServicer(handler), server)
        address = f"{cfg.server.host}:{cfg.server.port}"
        if cfg.tls is not None:
            credentials = grpc.ssl_server_credentials([(cfg.tls.key.read_bytes(), cfg.tls.cert.read_bytes())])
            self.control_port = server.add_secure_port(address, credentials)
        else:
            self.control_port = server.add_insecure_port(address)
        if self.control_port == 0:
            raise OSError(f"could not listen on {address}; is the port in use?")
        await server.start()
        self._grpc = server

        context = AdminContext(
            state=self.state,
            control_address=self.control_address,
            tls=cfg.tls is not None,
            model=cfg.model.path if cfg.model else "",
            started_at=time.monotonic(),
            clock=handler.clock,
            runs=self.runs,
        )
        runner = web.AppRunner(admin_app(context, token=self.admin_token), access_log=None)
        await runner.setup()
        ssl_context = None
        if cfg.tls is not None:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(cfg.tls.cert, cfg.tls.key)
        site = web.TCPSite(runner, cfg.server.admin_host, cfg.server.admin_port, ssl_context=ssl_context)
        await site.start()
        self._admin = runner
        self.admin_port = runner.addresses[0][1]

        self._liveness = asyncio.get_running_loop().create_task(self._check_liveness(handler))
        prepare = getattr(self.model, "prepare", None)
        if callable(prepare):
            # While the clients start and measure themselves, not when the first plan is due.
            self._warm_up = asyncio.get_running_loop().create_task(self._prepare_model(prepare))
        self._coordinator.start()
        for run_id in self.runs.continue_interrupted():
            log.info("%s was interrupted by the server's restart; it continues once its clients are back", run_id)

    async def _check_liveness(self, handler: ControlHandler) -> None:
        period = min(0.25, handler.settings.heartbeat_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            handler.expire()

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop accepting calls, end the streams, and stop the background tasks."""
        if self._liveness is not None:
            self._liveness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._liveness
        if self._warm_up is not None:
            self._warm_up.cancel()  # a conversion in its thread finishes on its own; nothing waits for it
        if self._coordinator is not None:
            await self._coordinator.close()
        if self.runs is not None:
            await self.runs.close()
        if self._grpc is not None:
            await self._grpc.stop(grace_s)
        if self._admin is not None:
            await self._admin.cleanup()
        if self.database is not None:
            self.database.close()


def _settle_heap() -> None:
    """Put what is alive now (imports, the model, the planner's tables) out of the collector's way.

    A full collection walks every tracked object, and with torch, transformers and cvxpy loaded
    that is millions: ``bench/load.py`` measured 335-382 ms pauses of the event loop at 1,000
    clients, every heartbeat of that moment waiting behind one. Frozen objects are still freed
    when their last reference goes; only cycles among them are never collected. Called by
    :func:`serve` (a server's own process), not by :meth:`ServerApp.start`, which tests run many
    times in one process.
    """
    gc.collect()
    gc.freeze()


async def serve(app: ServerApp) -> None:
    """Run ``app`` until SIGTERM or SIGINT; ValueError with the reason when it cannot go on (its model does not load)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    _settle_heap()
    if app._warm_up is not None:  # the model's tables are built in a thread after start
        app._warm_up.add_done_callback(lambda _task: _settle_heap())
    print(f"titanic-server ready control={app.control_address} admin={app.admin_url}", flush=True)
    waits = [loop.create_task(stop.wait()), loop.create_task(app.failed.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
        log.info("stopping")
        await app.stop()
    if app.fatal:
        raise ValueError(app.fatal)
