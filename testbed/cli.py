"""``titanic-testbed``: an emulated heterogeneous network of real Titanic daemons, and container helpers.

::

    titanic-testbed up --clients 4 --bandwidth 10mbit,20mbit,50mbit,200mbit [--run FILE]   (root)
    titanic-testbed up ... --run FILE --compare-unshaped   the run shaped, then again with links unshaped
    titanic-testbed up ... --run FILE --compare-topology   the run chained (host to host), then relayed
    titanic-testbed up --clients 4 --bandwidth none         the same topology, links at veth speed
    titanic-testbed down [--tag TAG]                                        remove what a crash left
    titanic-testbed shape --upload 10mbit --download 20mbit [-- CMD ...]    shape this namespace's link
    titanic-testbed start-run --admin URL --clients N [--run FILE]          the compose one-shot
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import netns, topology
from .demo import add_demo_parser, demo_main
from .orchestrate import (
    SUCCESSFUL_RUN_STATES,
    ClientReport,
    RunTiming,
    Testbed,
    TestbedError,
    TestbedSettings,
    cleanup,
    report_table,
    reports_json,
    require_root,
    run_commands,
    with_stage_times,
)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``titanic-testbed``."""
    parser = argparse.ArgumentParser(prog="titanic-testbed", description="Titanic testbed: emulated network.")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="namespaces, shaped links, a server and clients (needs root)")
    up.add_argument("--clients", type=int, required=True, help="number of clients")
    up.add_argument("--bandwidth", required=True,
                    help="tc rate for every client, or one per client: 10mbit,50mbit; 'none': unshaped")  # fmt: skip
    up.add_argument("--owners", type=int, default=1, help="how many clients own data (the first ones)")
    up.add_argument("--model", type=Path, help="model directory for the server (default: a tiny Llama)")
    up.add_argument("--stages", type=int, default=4, help="pipeline stages (0: the planner chooses)")
    up.add_argument("--link-seconds", type=float, default=2.0, help="each client's bandwidth probe, per direction")
    up.add_argument("--cpus", help="per client taskset CPU list, ';'-separated (real limit): 0;1;0-1;1")
    up.add_argument("--declare-flops", help="per client declared FLOP/s, comma-separated ('-' measures): 5e10,-,..")
    up.add_argument("--capacity", type=int, default=1, help="most partitions one client hosts")
    up.add_argument("--run", type=Path, help="a run file to start with `titanic-server runs start` and follow")
    up.add_argument("--compare-unshaped", action="store_true",
                    help="with --run: run it again with every link unshaped (same plan) and compare step times")  # fmt: skip
    up.add_argument("--compare-topology", action="store_true",
                    help="with --run: run it on the chained path, then the relayed one (same plan), and compare")  # fmt: skip
    up.add_argument("--work-dir", type=Path, help="logs, model, data (default: a new temporary directory)")
    up.add_argument("--tag", default="", help="unique part of the namespace names (default: random)")
    up.add_argument("--timeout", type=float, default=120.0, help="longest wait for registration and the plan, s")
    up.add_argument("--hold", action="store_true", help="keep everything up until Ctrl-C or SIGTERM")
    up.add_argument("--json", action="store_true", help="print the per-client figures as JSON")

    down = commands.add_parser("down", help="kill the daemons and delete the namespaces of crashed testbeds")
    down.add_argument("--tag", help="only this testbed (default: every titanic-testbed namespace)")

    shape = commands.add_parser("shape", help="shape this namespace's link with tc, then run a command")
    shape.add_argument("--dev", default="eth0", help="the interface to shape")
    shape.add_argument("--upload", required=True, help="egress rate, e.g. 10mbit")
    shape.add_argument("--download", required=True, help="ingress rate (through an ifb), e.g. 50mbit")
    shape.add_argument("argv", nargs=argparse.REMAINDER, help="-- and the command to exec afterwards")

    add_demo_parser(commands)
    start = commands.add_parser("start-run", help="wait for N ready clients, then start a run if the server can")
    start.add_argument("--admin", required=True, help="the server's admin API URL")
    start.add_argument("--clients", type=int, required=True, help="ready clients to wait for")
    start.add_argument("--run", type=Path, help="run file for `titanic-server runs start`")
    start.add_argument("--timeout", type=float, default=600.0, help="longest wait for the clients, seconds")
    return parser


def _per_client(text: str | None, count: int, sep: str, flag: str) -> list[str]:
    if not text:
        return []
    parts = text.split(sep)
    if len(parts) != count:
        raise ValueError(f"{flag} lists {len(parts)} values for {count} clients: give one per client")
    return parts


def settings_from_args(args: argparse.Namespace) -> TestbedSettings:
    """``up``'s flags as settings, checked."""
    if args.clients < 1:
        raise ValueError("--clients must be at least 1")
    cpus = [c.strip() or None for c in _per_client(args.cpus, args.clients, ";", "--cpus")]
    flops: list[float | None] = []
    for text in _per_client(args.declare_flops, args.clients, ",", "--declare-flops"):
        try:
            flops.append(None if text.strip() in ("", "-") else float(text))
        except ValueError as exc:
            raise ValueError(f"--declare-flops: {text!r} is not a number (or '-' to measure)") from exc
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="titanic-testbed-"))
    # Comparing paths: the server plans for the run's step, so its estimate is of the step the run trains.
    server_config = topology.planning_config(topology.read_run_file(args.run)) if args.compare_topology and args.run else ""
    return TestbedSettings(
        rates_bits=tuple(netns.parse_rates(args.bandwidth, args.clients)),
        work_dir=work_dir,
        model=args.model,
        stages=args.stages or None,
        owners=args.owners,
        link_seconds=args.link_seconds,
        cpus=tuple(cpus),
        declare_flops=tuple(flops),
        capacity=args.capacity,
        tag=args.tag,
        timeout_s=args.timeout,
        server_config=server_config,
    )


def _up(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if args.run is not None and not args.run.is_file():
        raise ValueError(f"run file {args.run} does not exist")
    if args.compare_unshaped and args.run is None:
        raise ValueError("--compare-unshaped times a run: give it one with --run FILE")
    if args.compare_topology and args.run is None:
        raise ValueError("--compare-topology times a run: give it one with --run FILE")
    if args.compare_topology and args.compare_unshaped:
        raise ValueError("--compare-topology and --compare-unshaped each time the run twice: choose one")
    print(f"work dir: {settings.work_dir} (logs of every daemon)", flush=True)
    with Testbed(settings, log=lambda s: print(s, flush=True)) as bed:
        started = time.monotonic()
        clients, plan = bed.wait_ready()
        reports = bed.reports(clients, plan)
        print(f"ready after {time.monotonic() - started:.1f} s; plan {plan['plan_id']}")
        print(reports_json(reports) if args.json else report_table(reports), flush=True)
        if args.run is not None:
            if bed.runs_start_available() and args.compare_topology:
                print(compare_topology(bed, args.run, reports, plan, as_json=args.json), flush=True)
            elif bed.runs_start_available():
                shaped = _timed_run(bed, args.run, reports, as_json=args.json)
                if args.compare_unshaped:
                    bed.unshape_links()
                    unshaped = _timed_run(bed, args.run, bed.reports(clients, plan), as_json=args.json)
                    print(comparison_line(shaped, unshaped), flush=True)
            else:
                print("--run ignored: this titanic-server has no `runs start` yet (training runs not built)")
        if args.hold:
            print("holding; Ctrl-C tears everything down", flush=True)
            while True:
                time.sleep(1.0)
                bed.check_alive()
    return 0


def _timed_run(bed: Testbed, run_file: Path, reports: list[ClientReport], *, as_json: bool) -> RunTiming:
    """Start ``run_file``, follow it, and print the per-client table with stage times and the step time."""
    runs = bed.start_and_follow_run(run_file)
    failed = [f"{r.get('run_id')}: {r.get('error') or r.get('state')}" for r in runs
              if str(r.get("state", "")).lower() not in SUCCESSFUL_RUN_STATES]  # fmt: skip
    if failed:
        raise TestbedError(f"the run did not complete ({'; '.join(failed)}); the daemons' logs are in the work dir")
    timing = bed.run_timing(runs)
    timed = with_stage_times(reports, timing)
    links = "shaped" if bed.links_shaped else "unshaped"
    print(f"after the run ({links} links):", flush=True)
    print(reports_json(timed) if as_json else report_table(timed))
    if not as_json:
        from server.observe.tables import idle_table

        for run in runs:  # each device's busy, bubble and waiting share of every round (server/training/idle.py)
            if table := idle_table(run):
                print(f"idle per device and round ({run.get('run_id')}):\n{table}", flush=True)
    step = "?" if timing.step_seconds is None else f"{timing.step_seconds:.4f}"
    print(f"links={links} step_s={step} steps={timing.steps}", flush=True)
    return timing


def compare_topology(
    bed: Testbed, run_file: Path, reports: list[ClientReport], plan: dict[str, Any], *, as_json: bool
) -> str:
    """Time ``run_file`` on the chained path, then on the relayed one (same plan); the comparison line."""
    run = topology.read_run_file(run_file)
    timings = {}
    for path in ("chain", "relay"):
        variant = bed.settings.work_dir / f"run-{path}.toml"
        variant.write_text(topology.dump_toml(topology.with_path(run, path)))
        print(f"-- [training] path = {path!r}", flush=True)
        timings[path] = _timed_run(bed, variant, reports, as_json=as_json)
    estimates = {path: topology.estimated_step_s(plan, path) for path in ("chain", "relay")}
    print("estimated step s (plan): " + ", ".join(f"{p} {e}" for p, e in estimates.items()), flush=True)
    return topology.topology_line(timings["chain"].step_seconds, timings["relay"].step_seconds, estimates["chain"])


def comparison_line(shaped: RunTiming, unshaped: RunTiming) -> str:
    """``step_s_shaped=.. step_s_unshaped=.. ratio=..``: how much the shaped links slow a whole step."""
    if shaped.step_seconds is None or unshaped.step_seconds is None or unshaped.step_seconds <= 0:
        return "step_s_shaped=? step_s_unshaped=? ratio=? (the owners reported no step times)"
    ratio = shaped.step_seconds / unshaped.step_seconds
    return f"step_s_shaped={shaped.step_seconds:.4f} step_s_unshaped={unshaped.step_seconds:.4f} ratio={ratio:.2f}"


def _down(args: argparse.Namespace) -> int:
    require_root()
    removed = cleanup(args.tag)
    print(f"removed {len(removed)} namespaces" + (f": {' '.join(removed)}" if removed else ""))
    return 0


def _shape(args: argparse.Namespace) -> int:
    up, down = netns.parse_rate(args.upload), netns.parse_rate(args.download)
    # A restarted container may find its earlier shaping still there: start from a clean interface.
    for argv in netns.unshaping_commands(dev=args.dev):
        subprocess.run(argv, capture_output=True, timeout=30)
    try:
        run_commands(netns.shaping_commands(up, down, dev=args.dev))
    except TestbedError as exc:
        raise TestbedError(
            f"{exc}\n(shaping needs CAP_NET_ADMIN — `cap_add: [NET_ADMIN]` in compose — and the host's ifb "
            "module: `modprobe ifb` on the Docker host)"
        ) from exc
    print(f"shaped {args.dev}: upload {netns.format_rate(up)}, download {netns.format_rate(down)}", flush=True)
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if argv:
        os.execvp(argv[0], argv)
    return 0


def _server_cli(admin: str, *args: str) -> subprocess.CompletedProcess[str]:
    # The token comes from $TITANIC_ADMIN_TOKEN, as for any titanic-server admin command.
    return subprocess.run([sys.executable, "-m", "server.cli", *args, "--admin", admin],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def _start_run(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    while True:
        result = _server_cli(args.admin, "clients", "--json")
        clients = json.loads(result.stdout) if result.returncode == 0 else []  # not up yet: keep waiting
        ready = [c["client_id"] for c in clients if c["status"] == "ready"]
        print(f"{len(ready)}/{args.clients} clients ready", flush=True)
        if len(ready) >= args.clients:
            break
        if time.monotonic() > deadline:
            raise TestbedError(f"only {len(ready)} of {args.clients} clients ready after {args.timeout:.0f} s")
        time.sleep(3.0)
    if args.run is None:
        print("no --run given: clients are registered, nothing to start")
        return 0
    if _server_cli(args.admin, "runs", "start", "--help").returncode != 0:
        print("not starting a run: this titanic-server has no `runs start` yet (training runs not built)")
        return 0
    started = _server_cli(args.admin, "runs", "start", str(args.run))
    print(started.stdout + started.stderr, end="")
    return started.returncode


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``titanic-testbed``; returns the exit status."""
    args = build_parser().parse_args(argv)
    handlers = {"up": _up, "down": _down, "shape": _shape, "start-run": _start_run, "demo": demo_main}
    try:
        return handlers[args.command](args)
    except ValueError as exc:
        print(f"titanic-testbed: error: {exc}", file=sys.stderr)
        return 2
    except TestbedError as exc:
        print(f"titanic-testbed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("titanic-testbed: interrupted; torn down", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
