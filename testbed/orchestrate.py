"""Running the emulated network: namespaces, shaped links, real daemons inside, and teardown.

The network commands come from :mod:`testbed.netns`; this module executes them, starts
``python -m server.cli run`` and ``python -m client.cli run`` inside the namespaces with
``ip netns exec``, and reads the server's admin API through ``python -m server.cli`` run in the
server's namespace (the admin API listens on that namespace's loopback only).

:class:`Testbed` is a context manager: leaving it, by return, exception, Ctrl-C or SIGTERM,
stops every daemon and deletes every namespace it made. :func:`cleanup` does the same for
what a killed process left behind, found by the namespace prefix.

After a run, :func:`run_timing` turns the owners' reported step and per-stage times into
seconds per step for each client's stages (through the plan's rows), and
:meth:`Testbed.unshape_links` lifts the shaping, so the same run can be timed again on the
same plan with the links at veth speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from . import netns

SUCCESSFUL_RUN_STATES = frozenset({"completed", "complete", "done", "finished"})
TERMINAL_RUN_STATES = SUCCESSFUL_RUN_STATES | {"failed", "stopped", "cancelled", "error"}


class TestbedError(RuntimeError):
    """The testbed could not be brought up, or a daemon in it failed."""

    __test__ = False  # a name starting with "Test" is not a pytest test class


def require_root() -> None:
    """Refuse early, with the reason, where namespaces cannot be made."""
    if os.geteuid() != 0:
        raise TestbedError("titanic-testbed needs root (network namespaces and tc): run it with sudo")
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise TestbedError(f"`ip netns` is not available here ({exc}); install iproute2") from exc


def run_commands(commands: Sequence[Sequence[str]], *, timeout_s: float = 30.0) -> None:
    """Run each command in order; the first failure raises with the command and its stderr."""
    for argv in commands:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s)
        if result.returncode != 0:
            raise TestbedError(f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}")


def list_namespaces(tag: str | None = None) -> list[str]:
    """This tool's namespaces that exist now (of testbed ``tag``, or of any testbed)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=True).stdout
    return netns.testbed_namespaces(out, tag)


def kill_namespace_processes(namespace: str, *, grace_s: float = 5.0) -> None:
    """SIGTERM every process inside ``namespace``, then SIGKILL what is still there after ``grace_s``."""

    def pids() -> list[int]:
        result = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=10)
        return [int(p) for p in result.stdout.split() if p.isdigit()]

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        alive = pids()
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):  # it exited on its own meanwhile
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = pids()
        if not alive:
            return


def cleanup(tag: str | None = None) -> list[str]:
    """Kill the processes in, and delete, every namespace of testbed ``tag`` (or of all); returns them."""
    names = list_namespaces(tag)
    for name in names:
        kill_namespace_processes(name)
    for argv in netns.teardown_commands(names):
        subprocess.run(argv, capture_output=True, timeout=30)  # one failing must not keep the others
    left = list_namespaces(tag)
    if left:
        raise TestbedError(f"could not delete namespaces {left}; check `ip netns pids` for each and retry")
    return names


@dataclass(frozen=True, slots=True, kw_only=True)
class TestbedSettings:
    """What ``titanic-testbed up`` brings up."""

    __test__ = False  # not a pytest test class

    rates_bits: tuple[int | None, ...]  # shaped rate of each client's link, both ways (None: unshaped); one per client
    work_dir: Path  # logs, model, data, client caches
    model: Path | None = None  # model directory for the server; None: a tiny Llama is built in work_dir
    stages: int | None = 4  # pipeline stages; None lets the planner choose
    owners: int = 1  # the first `owners` clients own data (c0, c1, ...)
    link_seconds: float = 2.0  # each client's bandwidth probe length, per direction
    cpus: tuple[str | None, ...] = ()  # per client: taskset CPU list (real compute limit); empty: none
    declare_flops: tuple[float | None, ...] = ()  # per client: declared FLOP/s (not measured); empty: none
    capacity: int | None = 1  # most partitions a client hosts; 1 spreads stages across clients
    tag: str = ""  # unique part of every namespace name; empty: a random one
    python: str = sys.executable  # the interpreter with titanic installed, run inside the namespaces
    server_config: str = ""  # TOML the server reads with --config (e.g. [planning] for the run's step); "": none
    control_port: int = 50051
    admin_port: int = 8750
    timeout_s: float = 120.0  # longest wait for the server, registration, and a connected plan

    def __post_init__(self) -> None:
        if not self.rates_bits:
            raise ValueError("the testbed needs at least one client")
        if not 1 <= self.owners <= len(self.rates_bits):
            raise ValueError(f"--owners must be between 1 and the number of clients ({len(self.rates_bits)})")
        for name in ("cpus", "declare_flops"):
            given = getattr(self, name)
            if given and len(given) != len(self.rates_bits):
                raise ValueError(f"--{name.replace('_', '-')} needs one value per client ({len(self.rates_bits)})")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientReport:
    """One client as the testbed saw it."""

    name: str
    address: str
    owner: bool  # holds data (drives a pipeline)
    shaped_bits: int | None  # the tc rate of its link; None: unshaped
    upload_bits: float  # what it measured (bits/s), from the admin API
    download_bits: float
    link_declared: bool  # the link figures were declared, not measured
    flops_per_s: float
    compute: str  # how its compute is limited: "taskset cpus N (real)", "declared", or "unlimited"
    partitions: tuple[int, ...]  # partitions it hosts in the plan (owners: their pinned ones too)
    # After a run: per partition above, the owner's mean wait per step for that stage (s); None: not reported
    stage_seconds: tuple[float | None, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RunTiming:
    """Where the steps of finished runs went, from what their data owners reported per round."""

    step_seconds: float | None  # mean whole step (forward, backward, optimizer) over every reported step
    steps: int  # training steps behind these means (every owner, every round)
    # client -> per plan row it holds, sorted by partition: mean seconds per step of that stage (None: unknown)
    stage_seconds: dict[str, tuple[float | None, ...]]


class Daemon:
    """A daemon running inside a namespace, its output going to a log file."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.log = log
        self._file: TextIO = log.open("w")
        self.process = subprocess.Popen(argv, stdout=self._file, stderr=subprocess.STDOUT, start_new_session=True)

    def check_alive(self) -> None:
        """Raise, with the tail of its log, when the daemon has exited."""
        code = self.process.poll()
        if code is not None:
            raise TestbedError(f"{self.name} exited with status {code}; last lines of {self.log}:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        """The last lines of its log."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._file.close()


class Testbed:
    """The network, the server and the clients of one testbed; a context manager that cleans up."""

    __test__ = False  # not a pytest test class

    def __init__(self, settings: TestbedSettings, *, log: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.tag = settings.tag or secrets.token_hex(3)
        self.topology = netns.plan_topology(self.tag, list(settings.rates_bits))
        self.admin_token = secrets.token_urlsafe(16)
        self.join_token = secrets.token_urlsafe(16)
        self.daemons: list[Daemon] = []
        self.server: Daemon | None = None
        self._log = log
        self._created = False
        # Whether any client's link is shaped now: not with `--bandwidth none`, nor after unshape_links().
        self.links_shaped = any(rate is not None for rate in settings.rates_bits)

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Testbed:
        require_root()
        # SIGTERM becomes an exception, so the `with` block unwinds and tears down like Ctrl-C.
        self._previous = signal.signal(signal.SIGTERM, _raise_system_exit)
        try:
            self.start()
        except BaseException:
            self.teardown()
            signal.signal(signal.SIGTERM, self._previous)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.teardown()
        finally:
            signal.signal(signal.SIGTERM, self._previous)

    def start(self) -> None:
        """Network up, then the server, then the clients."""
        s = self.settings
        s.work_dir.mkdir(parents=True, exist_ok=True)
        model = s.model or self._tiny_model()
        self._created = True
        self._log(f"network: {len(self.topology.namespaces)} namespaces {netns.namespace_name(self.tag, '*')}")
        run_commands(netns.setup_commands(self.topology))
        self._start_server(model)
        # One client at a time, each once the one before has measured its link: a probe that
        # shares the cores with other daemons importing torch measures the CPU, not the link
        # (a 200 Mbit/s client read 159 that way). Helpers first, so that no plan forms before
        # the data owners have come.
        for i, host in reversed(list(enumerate(self.topology.clients))):
            self._start_client(i, host)
            self._wait_measured(self.daemons[-1])

    def _wait_measured(self, daemon: Daemon) -> None:
        """Wait until ``daemon`` (a client) has reported its profile, link included (read from its log)."""

        def measured() -> bool:
            return "profile reported" in daemon.log.read_text(errors="replace")

        _wait(measured, self.settings.timeout_s, f"{daemon.name} to measure its link", self.check_alive)

    def teardown(self) -> None:
        """Stop every daemon and delete every namespace of this testbed; safe to call twice."""
        for daemon in reversed(self.daemons):
            daemon.stop()
        self.daemons.clear()
        if self._created:
            removed = cleanup(self.tag)
            self._log(f"teardown: removed {len(removed)} namespaces")
            self._created = False

    # -- daemons -----------------------------------------------------------------------------

    def _tiny_model(self) -> Path:
        path = self.settings.work_dir / "model"
        if not (path / "config.json").exists():
            self._log(f"model: building a tiny Llama in {path}")
            subprocess.run([self.settings.python, "-m", "testbed.tiny_model", str(path)], check=True, timeout=300)
        return path

    def _start_server(self, model: Path) -> None:
        s, host = self.settings, self.topology.server
        self.server = self._spawn("server", netns.netns_exec(host.namespace, self.server_argv(model)))
        _wait(lambda: self.server is not None and "titanic-server ready" in self.server.log.read_text(), s.timeout_s,
              "the server to print its ready line", self.check_alive)  # fmt: skip

    def server_argv(self, model: Path | str) -> list[str]:
        """``titanic-server run`` for the model at ``model``, as it runs inside the server's namespace.

        Tokens travel as ``--flag=value``: a random token may begin with ``-``, which argparse
        would otherwise read as the next option.
        """
        s = self.settings
        argv = [
            s.python, "-m", "server.cli", "run",
            "--host", "0.0.0.0", "--port", str(s.control_port),
            "--admin-host", "127.0.0.1", "--admin-port", str(s.admin_port),
            "--state-dir", str(s.work_dir / "server-state"),
            f"--join-token={self.join_token}", f"--admin-token={self.admin_token}",
            "--model", str(model), "--heartbeat-interval", "1", "--heartbeat-timeout", "10",
        ]  # fmt: skip
        if s.stages is not None:
            argv += ["--stages", str(s.stages)]
        if s.server_config:
            config = s.work_dir / "server.toml"
            config.write_text(s.server_config)
            argv += ["--config", str(config)]
        return argv

    def client_argv(self, index: int, host: netns.Host) -> list[str]:
        """``titanic-client run`` for client ``index``, as it runs inside its namespace."""
        s = self.settings
        argv = [
            s.python, "-m", "client.cli", "run",
            "--server", f"{self.topology.server.address}:{s.control_port}",
            "--name", host.name, f"--token={self.join_token}",
            "--cache-dir", str(s.work_dir / f"cache-{host.name}"),
            "--bridge-host", host.address, "--advertise", host.address,
            "--link-seconds", str(s.link_seconds),
        ]  # fmt: skip
        if index < s.owners:
            argv += ["--data", str(self._data_file(index))]
        if s.capacity is not None:
            argv += ["--capacity", str(s.capacity)]
        if s.declare_flops and s.declare_flops[index] is not None:
            argv += ["--declare-flops-per-s", str(s.declare_flops[index])]
        return argv

    def _start_client(self, index: int, host: netns.Host) -> None:
        cpus = self.settings.cpus[index] if self.settings.cpus else None
        self._spawn(host.name, netns.netns_exec(host.namespace, self.client_argv(index, host), cpus=cpus))

    def _data_file(self, index: int) -> Path:
        # Each owner its own text; what it says does not matter to the network, only that it is real text.
        path = self.settings.work_dir / f"data-c{index}.txt"
        if not path.exists():
            lines = [f"Owner {index} line {n}: the quick brown fox jumps over the lazy dog." for n in range(400)]
            path.write_text("\n".join(lines) + "\n")
        return path

    def _spawn(self, name: str, argv: list[str]) -> Daemon:
        daemon = Daemon(name, argv, self.settings.work_dir / f"{name}.log")
        self.daemons.append(daemon)
        return daemon

    def check_alive(self) -> None:
        """Raise when any daemon of this testbed has exited."""
        for daemon in self.daemons:
            daemon.check_alive()

    # -- the admin API, through the server's CLI ----------------------------------------------

    def server_cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``python -m server.cli ARGS --admin <url> --token <t>`` inside the server's namespace."""
        argv = [self.settings.python, "-m", "server.cli", *args,
                "--admin", f"http://127.0.0.1:{self.settings.admin_port}", f"--token={self.admin_token}"]  # fmt: skip
        result = subprocess.run(
            netns.netns_exec(self.topology.server.namespace, argv), capture_output=True, text=True, timeout=60
        )
        if check and result.returncode != 0:
            raise TestbedError(f"titanic-server {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def admin(self, view: str) -> Any:
        """The JSON of ``titanic-server <view> --json``."""
        return json.loads(self.server_cli(view, "--json").stdout)

    def wait_ready(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Wait until every client is ready and a connected plan covers them all; returns both."""
        names = {h.name for h in self.topology.clients}

        def ready() -> list[dict[str, Any]] | None:
            clients = self.admin("clients")
            ok = {c["client_id"] for c in clients if c["status"] == "ready"} >= names
            return clients if ok else None

        _wait(ready, self.settings.timeout_s, f"{len(names)} clients to be ready", self.check_alive)
        self._log(f"registered: {len(names)} clients ready")

        def planned() -> dict[str, Any] | None:
            plan = self.admin("plan")
            if plan["state"] == "failed":
                raise TestbedError(f"the plan failed: {plan['error']}")
            return plan if plan["state"] == "connected" and set(plan["clients"]) >= names else None

        plan = _wait(planned, self.settings.timeout_s, "a connected plan covering every client", self.check_alive)
        return self.admin("clients"), plan

    def reports(self, clients: list[dict[str, Any]], plan: dict[str, Any]) -> list[ClientReport]:
        """Per client: shaped rate, measured rates, compute, and the partitions it was given."""
        by_id = {c["client_id"]: c for c in clients}
        out = []
        for i, host in enumerate(self.topology.clients):
            profile = by_id[host.name]["profile"]
            declared = set(profile.get("declared", []))
            cpus = self.settings.cpus[i] if self.settings.cpus else None
            if "flops_per_s" in declared:
                compute = "declared"
            elif cpus:
                compute = f"taskset cpus {cpus} (real)"
            else:
                compute = "unlimited (real)"
            out.append(
                ClientReport(
                    name=host.name,
                    address=host.address,
                    owner=i < self.settings.owners,
                    shaped_bits=host.rate_bits if self.links_shaped else None,
                    upload_bits=8 * float(profile["upload_bytes_per_s"]),
                    download_bits=8 * float(profile["download_bytes_per_s"]),
                    link_declared=bool(declared & {"upload_bytes_per_s", "download_bytes_per_s"}),
                    flops_per_s=float(profile["flops_per_s"]),
                    compute=compute,
                    partitions=tuple(sorted(r["partition"] for r in plan["rows"] if r["client_id"] == host.name)),
                )
            )
        return out

    # -- runs ----------------------------------------------------------------------------------

    def runs_start_available(self) -> bool:
        """Whether this server's CLI has ``runs start`` (training runs, issue 4)."""
        return self.server_cli("runs", "start", "--help", check=False).returncode == 0

    def start_and_follow_run(self, run_file: Path, *, timeout_s: float = 600.0) -> list[dict[str, Any]]:
        """``titanic-server runs start FILE``, then print the runs' states until all are finished.

        Returns the runs this call started (the admin API's JSON of each), not earlier ones.
        """
        if not self.runs_start_available():
            raise TestbedError("this titanic-server has no `runs start` (training runs are not built yet)")
        earlier = {r.get("run_id") for r in self.admin("runs")}
        self._log(self.server_cli("runs", "start", str(run_file.resolve())).stdout.strip())
        seen = ""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            runs = self.admin("runs")
            line = "; ".join(f"{r.get('run_id', '?')}={r.get('state', '?')}" for r in runs)
            if line != seen:
                self._log(f"runs: {line}")
                seen = line
            if runs and all(str(r.get("state", "")).lower() in TERMINAL_RUN_STATES for r in runs):
                return [r for r in runs if r.get("run_id") not in earlier]
            if time.monotonic() > deadline:
                raise TestbedError(f"runs still going after {timeout_s:.0f} s: {line}")
            time.sleep(2.0)


    def run_timing(self, runs: Sequence[Mapping[str, Any]]) -> RunTiming:
        """:func:`run_timing` of ``runs`` on the plan now being served."""
        return run_timing(runs, self.admin("plan"))

    def unshape_links(self) -> None:
        """Remove every client's shaping (htb, ingress redirect, ifb): links run at veth speed from now on.

        The daemons keep running and the plan stays as it was made from the shaped links, so a
        run started next trains on the same assignment and only the links differ.
        """
        for host in self.topology.clients:
            if host.rate_bits is None:
                continue
            for argv in netns.unshaping_commands(namespace=host.namespace):
                subprocess.run(argv, capture_output=True, timeout=30)  # each removes one piece; check below
            shown = subprocess.run(["tc", "-n", host.namespace, "qdisc", "show"], capture_output=True, text=True,
                                   timeout=30, check=True).stdout  # fmt: skip
            if "htb" in shown or "tbf" in shown or "ingress" in shown:
                raise TestbedError(f"{host.name}'s link is still shaped after removing it:\n{shown.strip()}")
        self.links_shaped = False
        self._log("links: every client's shaping removed (veth speed)")


def run_timing(runs: Sequence[Mapping[str, Any]], plan: Mapping[str, Any]) -> RunTiming:
    """Per client, the mean time per step of each stage it holds; and the mean whole step.

    Each owner reports per round ``stage_seconds`` (one per stage of its pipeline: its wait for
    that stage per step, transfers both ways plus the holder's compute) and ``step_seconds``.
    Rounds are weighted by their steps (``len(losses)``). A stage is matched to its holder by
    the plan row of that owner's pipeline and partition (by owner, not bridge run: a run that ends
    retires its plan, so the plan served afterwards has new bridge runs); rows no owner reported
    on get None.
    """
    totals: dict[tuple[str, int], float] = {}  # (owner, partition) -> seconds, summed over steps
    counts: dict[tuple[str, int], int] = {}
    step_total, step_count = 0.0, 0
    for run in runs:
        for entry in run.get("history", []):
            steps = len(entry.get("losses", []))
            stages = entry.get("stage_seconds")
            if not steps or not isinstance(stages, list):
                continue  # an owner that sends no timing (an older client)
            for partition, seconds in enumerate(stages):
                key = (str(entry.get("owner", "")), partition)
                totals[key] = totals.get(key, 0.0) + float(seconds) * steps
                counts[key] = counts.get(key, 0) + steps
            if isinstance(entry.get("step_seconds"), int | float):
                step_total += float(entry["step_seconds"]) * steps
                step_count += steps
    per_client: dict[str, list[tuple[int, str, float | None]]] = {}
    for row in plan.get("rows", []):
        key = (str(row["owner_id"]), int(row["partition"]))
        mean = totals[key] / counts[key] if key in counts else None
        per_client.setdefault(str(row["client_id"]), []).append((key[1], key[0], mean))
    return RunTiming(
        step_seconds=step_total / step_count if step_count else None,
        steps=step_count,
        stage_seconds={c: tuple(mean for _, _, mean in sorted(rows, key=lambda r: r[:2])) for c, rows in per_client.items()},
    )


def with_stage_times(reports: Sequence[ClientReport], timing: RunTiming) -> list[ClientReport]:
    """``reports`` with each client's stage times filled in from ``timing``."""
    return [dataclasses.replace(r, stage_seconds=timing.stage_seconds.get(r.name, ())) for r in reports]


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _wait(predicate: Callable[[], Any], timeout_s: float, what: str, check: Callable[[], None]) -> Any:
    """Poll ``predicate`` until truthy; ``check`` raises when something it waits on died."""
    deadline = time.monotonic() + timeout_s
    while True:
        check()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TestbedError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


def report_table(reports: Sequence[ClientReport]) -> str:
    """The per-client figures as an aligned table, with what is real and what is declared.

    After a run (reports from :func:`with_stage_times`) a last column gives, per partition the
    client holds, the mean seconds per step the owner waited for that stage.
    """
    timed = any(r.stage_seconds for r in reports)
    headers = ["client", "address", "role", "shaped", "measured up", "measured down", "compute", "FLOP/s", "partitions"]
    headers += ["stage s/step"] if timed else []
    rows = [
        [
            r.name,
            r.address,
            "owner" if r.owner else "helper",
            netns.format_rate(r.shaped_bits) if r.shaped_bits is not None else "unshaped",
            netns.format_rate(r.upload_bits) + (" (declared)" if r.link_declared else ""),
            netns.format_rate(r.download_bits) + (" (declared)" if r.link_declared else ""),
            r.compute,
            f"{r.flops_per_s:.3g}",
            ",".join(map(str, r.partitions)) or "-",
            *([_stage_cell(r.stage_seconds)] if timed else []),
        ]
        for r in reports
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows]]
    links = "shaped with tc (real)" if any(r.shaped_bits for r in reports) else "unshaped (veth speed)"
    notes = (
        f"links: {links}; latency: not emulated (this kernel has no netem); "
        "compute: taskset is a real limit, declared FLOP/s are what the client reports instead of measuring"
    )
    return "\n".join([*lines, notes])


def _stage_cell(seconds: Sequence[float | None]) -> str:
    # One figure per partition the client holds, in the partitions column's order.
    return ",".join("?" if s is None else f"{s:.3f}" for s in seconds) or "-"


def reports_json(reports: Sequence[ClientReport]) -> str:
    """The per-client figures as JSON."""
    return json.dumps([dataclasses.asdict(r) for r in reports], indent=2)
