"""Helpers for tests that run a real server: in this process, or as processes on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.app import ServerApp
from server.config import (
    AuthSettings,
    ControlSettings,
    ListenSettings,
    PlanningSettings,
    ServerConfig,
    TlsSettings,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
JOIN_TOKEN = "join-token-for-tests"
ADMIN_TOKEN = "admin-token-for-tests"


def server_config(state_dir: Path, *, tls: TlsSettings | None = None, timeout_s: float = 1.5) -> ServerConfig:
    """A server on loopback with free ports, a known join token, and fast liveness."""
    return ServerConfig(
        server=ListenSettings(port=0, admin_port=0, state_dir=state_dir),
        auth=AuthSettings(join_tokens=(JOIN_TOKEN,), admin_token=ADMIN_TOKEN),
        tls=tls,
        control=ControlSettings(heartbeat_interval_s=timeout_s / 5, heartbeat_timeout_s=timeout_s),
        planning=PlanningSettings(settle_s=0.2),
    )


@contextlib.asynccontextmanager
async def running_app(config: ServerConfig, **kwargs: Any) -> AsyncIterator[ServerApp]:
    """A started ServerApp in this process, stopped afterwards."""
    app = ServerApp(config, **kwargs)
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace_s=0.1)


@dataclass
class Process:
    """A child process whose output lines are collected by a thread."""

    popen: subprocess.Popen[str]
    name: str
    lines: list[str] = field(default_factory=list)
    _queue: queue.Queue[str] = field(default_factory=queue.Queue)

    def wait_for_line(self, predicate: Callable[[str], bool], timeout_s: float) -> str:
        """The first output line (stdout and stderr) matching ``predicate``."""
        for line in self.lines:
            if predicate(line):
                return line
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: no matching line in {timeout_s} s; output:\n" + "".join(self.lines[-40:]))
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if predicate(line):
                return line

    def output(self) -> str:
        """Everything printed so far."""
        return "".join(self.lines)

    def terminate(self, timeout_s: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout_s)


def spawn(name: str, module: str, *args: str, env: dict[str, str] | None = None) -> Process:
    """Run ``python -m module args`` from the repository root, collecting its output."""
    popen = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    process = Process(popen=popen, name=name)

    def pump() -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            process.lines.append(line)
            process._queue.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return process


@contextlib.contextmanager
def processes() -> Iterator[list[Process]]:
    """A list to put spawned processes in; all are killed on exit."""
    started: list[Process] = []
    try:
        yield started
    finally:
        for p in started:
            if p.popen.poll() is None:
                p.popen.kill()
            p.popen.wait(10)


def start_server(
    state_dir: Path, *extra: str, timeout_s: float = 60.0, env: dict[str, str] | None = None
) -> tuple[Process, str, str]:
    """A ``titanic-server run`` process; returns it, its control address and its admin URL."""
    server = spawn(
        "server",
        "server.cli",
        "run",
        "--port", "0",
        "--admin-port", "0",
        "--state-dir", str(state_dir),
        "--join-token", JOIN_TOKEN,
        "--admin-token", ADMIN_TOKEN,
        *extra,
        env=env,
    )
    line = server.wait_for_line(lambda s: s.startswith("titanic-server ready"), timeout_s)
    fields = dict(part.split("=", 1) for part in line.split()[2:])
    return server, fields["control"], fields["admin"]


def client_args(server: str, name: str, cache: Path, *extra: str) -> list[str]:
    """Arguments of ``titanic-client run`` for a test client."""
    return [
        "run", "--server", server, "--name", name, "--token", JOIN_TOKEN, "--cache-dir", str(cache),
        "--quick-profile", "--reconnect-initial", "0.2", "--reconnect-max", "1", *extra,
    ]


def admin(url: str, route: str, token: str = ADMIN_TOKEN) -> Any:
    """GET from the admin API."""
    request = urllib.request.Request(url + route, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; returns that."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)
