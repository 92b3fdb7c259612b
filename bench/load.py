"""Load benchmark: many lightweight clients against one ``titanic-server run`` process on this machine.

    python bench/load.py                 # 1,000 clients, 30 s of heartbeats
    python bench/load.py --clients 200 --seconds 10
    python bench/load.py --quick         # 50 clients, 8 s

The server is a real process (``python -m server.cli run``) planning for a tiny Llama drawn at
random from a config (``--init random``, so no weights need to exist). The clients are not the
real daemon: each is a few coroutines in this process speaking the control protocol through the
generated stubs in ``proto/`` (no torch) — what a daemon does before it trains:

1. ``Register`` with a join token and a compute profile (two clients in a hundred own data);
2. ``ReportProfile`` with a measured link, which makes it ready for planning;
3. open its ``Commands`` stream and read what comes (HostRun and ConnectPeers are ignored: no
   stage is ever served, so the plan stays in delivery);
4. ``Heartbeat`` every ``heartbeat_interval_s`` the server gave it, from joining until ``--seconds``
   after the last client joined.

Clients join in waves of ``--join-rate`` a second (a fleet does not start in one millisecond).
Every client has its own gRPC channel (its own TCP connection), as real ones do. Latencies are
measured around each call in this process, so they include this process's own scheduling on the
same 2 cores: an upper bound of what the server adds.

Figures: p50/p99 of Register and of every Heartbeat after all clients joined; ``plan_ms`` is the
planning time of the first plan made with every client ready (the server's own ``plan_s``, read
from the admin API); ``server_rss_mib`` the server's resident memory at the end. Last line:
``clients=<n> heartbeat_p99_ms=<x> register_p99_ms=<x> plan_ms=<x> server_rss_mib=<x>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from proto import control_pb2 as pb  # noqa: E402
from proto import control_pb2_grpc as pb_grpc  # noqa: E402
from proto.messages import PROTOCOL_VERSION  # noqa: E402

SESSION_KEY = (
    "x-titanic-session"  # server.control.servicer.SESSION_METADATA_KEY (bench stays torch- and server-free)
)

# A tiny Llama's config: the server draws its weights (init = "random"); nothing is ever trained.
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


@dataclass
class Measurements:
    """What the clients saw."""

    register_s: list[float] = field(default_factory=list)
    heartbeat_s: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    commands: int = 0

    def fail(self, what: str) -> None:
        self.failures[what] = self.failures.get(what, 0) + 1


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def start_server(
    state_dir: Path, model_dir: Path, token: str, admin_token: str
) -> tuple[subprocess.Popen[str], str, str]:
    """``titanic-server run`` on free loopback ports; returns it, its control address and admin URL."""
    server = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "run", "--port", "0", "--admin-port", "0",
         "--state-dir", str(state_dir), f"--join-token={token}", f"--admin-token={admin_token}",
         "--model", str(model_dir), "--init", "random", "--log-level", "WARNING"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert server.stdout is not None
    for line in server.stdout:
        if line.startswith("titanic-server ready"):
            fields = dict(part.split("=", 1) for part in line.split()[2:])
            # Keep reading its log: a full pipe would block the server's event loop on its next line.
            threading.Thread(target=_drain, args=(server.stdout,), daemon=True).start()
            return server, fields["control"], fields["admin"]
    raise RuntimeError(f"the server exited ({server.wait()}) before it was ready")


SERVER_LOG: deque[str] = deque(maxlen=20)  # the server's last log lines, shown at the end


def _drain(stream: IO[str]) -> None:
    for line in stream:
        SERVER_LOG.append(line.rstrip())


def admin_get(url: str, route: str, token: str) -> Any:
    request = urllib.request.Request(url + route, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class LightClient:
    """One client: register, report a profile, read commands, beat until told to stop."""

    def __init__(self, index: int, address: str, token: str, measured: Measurements) -> None:
        self.name = f"load-{index:05d}"
        self.owner = index % 50 == 0  # two in a hundred own data
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.ControlStub(self.channel)
        self.token = token
        self.measured = measured
        self.metadata: tuple[tuple[str, str], ...] = ()
        self.interval = 2.0

    async def join(self) -> bool:
        info = pb.ClientInfo(version="load", hostname=self.name, platform="bench", has_data=self.owner,
                             data_bytes=1 << 20 if self.owner else 0, bridge_host="127.0.0.1")  # fmt: skip
        profile = pb.DeviceProfile(flops_per_s=1e10, memory_bytes=8 << 30, device="cpu", capacity=1)
        began = time.perf_counter()
        try:
            reply = await self.stub.Register(pb.RegisterRequest(
                name=self.name, join_token=self.token, info=info, profile=profile, protocol_version=PROTOCOL_VERSION,
            ), timeout=60)  # fmt: skip
        except grpc.aio.AioRpcError as exc:
            self.measured.fail(f"register {exc.code().name}")
            return False
        self.measured.register_s.append(time.perf_counter() - began)
        self.metadata = ((SESSION_KEY, reply.session_token),)
        self.interval = reply.heartbeat_interval_s
        profile.upload_bytes_per_s = profile.download_bytes_per_s = 1e8
        profile.rtt_s = 0.001
        try:
            await self.stub.ReportProfile(
                pb.ProfileReport(profile=profile), metadata=self.metadata, timeout=60
            )
        except grpc.aio.AioRpcError as exc:
            self.measured.fail(f"profile {exc.code().name}")
            return False
        return True

    async def read_commands(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for _ in self.stub.Commands(pb.CommandsRequest(), metadata=self.metadata):
                self.measured.commands += 1

    async def beat(self, window: Window) -> None:
        """Beat from joining until the window closes; times are kept while it records."""
        # Spread the first beats over one interval, as clients that joined at different times do.
        await asyncio.sleep(secrets.randbelow(1000) / 1000 * self.interval)
        while not window.closed.is_set():
            began = time.perf_counter()
            try:
                await self.stub.Heartbeat(pb.HeartbeatRequest(free_memory_bytes=1 << 30),
                                          metadata=self.metadata, timeout=30)  # fmt: skip
                if window.recording:
                    self.measured.heartbeat_s.append(time.perf_counter() - began)
            except grpc.aio.AioRpcError as exc:
                self.measured.fail(f"heartbeat {exc.code().name}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, self.interval - (time.perf_counter() - began))):
                    await window.closed.wait()

    async def close(self) -> None:
        await self.channel.close()


@dataclass
class Window:
    """When heartbeats count: from shortly after the last client joined until the end."""

    recording: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)


async def drive(
    clients: int, seconds: float, join_rate: float, address: str, token: str
) -> tuple[Measurements, float]:
    """Join ``clients`` at ``join_rate`` a second, then beat for ``seconds``; returns the measurements and join time.

    A client reads its commands and beats from the moment it joined, as a daemon does (a
    fleet that joins over ten seconds must not go silent for longer than the heartbeat
    timeout); only the beats after every client joined are counted.
    """
    measured = Measurements()
    fleet = [LightClient(i, address, token, measured) for i in range(clients)]
    tasks: list[asyncio.Task[None]] = []
    window = Window()
    began = time.monotonic()

    async def join_one(client: LightClient, at: float) -> bool:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        if not await client.join():
            return False
        tasks.append(asyncio.ensure_future(client.read_commands()))
        tasks.append(asyncio.ensure_future(client.beat(window)))
        return True

    await asyncio.gather(*(join_one(c, began + i / join_rate) for i, c in enumerate(fleet)))
    join_s = time.monotonic() - began
    await asyncio.sleep(min(2.0, seconds / 4))  # every client beats once more before the count starts
    window.recording = True
    await asyncio.sleep(seconds)
    window.closed.set()
    await asyncio.gather(*tasks[1::2])  # the beats end on their own
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(c.close() for c in fleet))
    return measured, join_s


def first_full_plan(admin: str, token: str, clients: int, timeout_s: float) -> float:
    """plan_s (ms) of the first plan whose planner saw every client; NaN if none came in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            plan = admin_get(admin, "/v1/plan", token)
        except OSError as exc:  # a server too busy to answer within the request's timeout
            print(f"GET /v1/plan failed: {exc!r}")
            continue
        if len(plan.get("clients", ())) >= clients and "plan_s" in plan.get("summary", {}):
            return float(plan["summary"]["plan_s"]) * 1e3
        time.sleep(0.5)
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument(
        "--seconds", type=float, default=30.0, help="seconds of heartbeats once every client joined"
    )
    parser.add_argument("--join-rate", type=float, default=100.0, help="registrations started per second")
    parser.add_argument("--quick", action="store_true", help="50 clients, 8 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.seconds = min(args.clients, 50), 8.0
    token, admin_token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="titanic-load-") as tmp:
        model = Path(tmp) / "model"
        model.mkdir()
        (model / "config.json").write_text(json.dumps(TINY_LLAMA))
        server, address, admin = start_server(Path(tmp) / "state", model, token, admin_token)
        try:
            print(
                f"server pid {server.pid} at {address}; {args.clients} clients joining at {args.join_rate:g}/s"
            )
            measured, join_s = asyncio.run(drive(args.clients, args.seconds, args.join_rate, address, token))
            rss = rss_mib(server.pid)
            plan_ms = first_full_plan(admin, admin_token, args.clients, timeout_s=60)
            try:
                by_status = admin_get(admin, "/v1/status", admin_token)["clients"]
            except OSError as exc:
                by_status = f"unknown ({exc!r})"
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                print("the server did not stop within 30 s of SIGTERM; killed")
                server.kill()
                server.wait()
    ms = 1e3
    print(f"joined in {join_s:.1f} s; clients by status at the end: {by_status}")
    print(f"register  n={len(measured.register_s)} p50={percentile(measured.register_s, 50) * ms:.1f} ms "
          f"p99={percentile(measured.register_s, 99) * ms:.1f} ms")  # fmt: skip
    print(f"heartbeat n={len(measured.heartbeat_s)} p50={percentile(measured.heartbeat_s, 50) * ms:.1f} ms "
          f"p99={percentile(measured.heartbeat_s, 99) * ms:.1f} ms "
          f"mean={statistics.fmean(measured.heartbeat_s or [float('nan')]) * ms:.1f} ms")  # fmt: skip
    print(f"commands received {measured.commands}; failures {measured.failures or 'none'}")
    print("the server's last log lines:", *SERVER_LOG, sep="\n  ")
    print(f"plan with every client: {plan_ms:.1f} ms; server RSS {rss:.0f} MiB")
    print(
        f"clients={args.clients} heartbeat_p99_ms={percentile(measured.heartbeat_s, 99) * ms:.1f} "
        f"register_p99_ms={percentile(measured.register_s, 99) * ms:.1f} plan_ms={plan_ms:.1f} server_rss_mib={rss:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
