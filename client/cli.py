"""``titanic-client``: the daemon an edge device runs, and a look at what it would report.

::

    titanic-client run --server HOST:PORT --token TOKEN [--data PATH] [--config client.toml] ...
                       [--log-format json]     logs as JSON lines (default: text)
    titanic-client profile [--quick] [--json]

``run`` exits with status 0 after SIGTERM or SIGINT (it tells the server it leaves, and stops
serving its stages), and with status 2 when the server refuses it (wrong token or key, a name
taken by a keyed client) or its certificate does not verify, with the reason on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autograd_bridge.logs import configure_logging

from .config import ClientConfig, DeclaredProfile, load_config

EXIT_USAGE = 2  # bad flags or config
EXIT_REFUSED = 2  # the server refused this client, or its certificate did not verify
EXIT_FAILED = 1  # the server refused a later call (e.g. the profile), with the reason on stderr


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``titanic-client``."""
    parser = argparse.ArgumentParser(prog="titanic-client", description="Titanic client daemon.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="join a server and work for it until SIGTERM")
    run.add_argument("--config", type=Path, help="TOML config file (flags override it)")
    run.add_argument("--server", help="HOST:PORT of the server's control plane")
    run.add_argument("--name", help="this client's unique name (default: the host name)")
    run.add_argument("--token", help="the server's join token (or $TITANIC_TOKEN)")
    run.add_argument("--token-file", type=Path, help="read the join token from this file")
    run.add_argument("--key", help="this client's own key, if the operator gave it one")
    run.add_argument("--data", type=Path, help="training data this client owns (never leaves it)")
    run.add_argument("--cache-dir", type=Path, help="where partition weights are cached")
    run.add_argument("--capacity", type=int, help="most partitions to host at once")
    run.add_argument("--ca", type=Path, help="CA certificate to verify the server (turns TLS on)")
    run.add_argument("--tls", action="store_true", help="use TLS with the system's CAs")
    run.add_argument("--server-name", help="TLS name to verify instead of the host in --server")
    run.add_argument("--bridge-host", help="address the stage host binds (default 127.0.0.1)")
    run.add_argument("--bridge-port", type=int, help="port of the stage host (default: any free)")
    run.add_argument("--advertise", help="address peers use to reach the stage host")
    run.add_argument("--quick-profile", action="store_true", help="tiny, fast measurements (tests, demos)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where training runs")
    run.add_argument("--link-seconds", type=float, help="length of each bandwidth probe")
    for name in DeclaredProfile.__dataclass_fields__:
        run.add_argument(f"--declare-{name.replace('_', '-')}", type=float, help=f"declare {name} (emulation)")
    run.add_argument("--reconnect-initial", type=float, help="first wait before reconnecting, seconds")
    run.add_argument("--reconnect-max", type=float, help="longest wait before reconnecting, seconds")
    run.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    run.add_argument("--log-format", choices=("text", "json"), default="text",
                     help="json: one JSON object per line (time, level, logger, message, exception)")

    profile = commands.add_parser("profile", help="measure this device's compute and memory, and print them")
    profile.add_argument("--quick", action="store_true", help="tiny, fast measurement")
    profile.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    profile.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _replace(section: Any, **values: Any) -> Any:
    given = {k: v for k, v in values.items() if v is not None}
    return dataclasses.replace(section, **given) if given else section


def config_from_args(args: argparse.Namespace) -> ClientConfig:
    """The config file (if any) with the flags applied on top; checked as a whole."""
    config = load_config(args.config) if args.config else ClientConfig()
    token = args.token
    if token is None and args.token_file is not None:
        token = args.token_file.read_text().strip()
    if token is None and config.client.token is None:
        token = os.environ.get("TITANIC_TOKEN")
    client = _replace(
        config.client,
        server=args.server,
        name=args.name,
        token=token,
        key=args.key,
        data=args.data,
        cache_dir=args.cache_dir,
        capacity=args.capacity,
    )
    tls = _replace(config.tls, ca=args.ca, server_name=args.server_name, enabled=True if args.tls else None)
    bridge = _replace(config.bridge, host=args.bridge_host, port=args.bridge_port, advertise=args.advertise)
    profile = _replace(
        config.profile, quick=True if args.quick_profile else None, device=args.device, link_seconds=args.link_seconds
    )
    declared = {name: getattr(args, f"declare_{name}") for name in DeclaredProfile.__dataclass_fields__}
    for name in ("memory_bytes", "gpu_memory_bytes", "max_micro_batch"):
        if declared[name] is not None:
            declared[name] = int(declared[name])
    declare = _replace(config.declare, **declared)
    reconnect = _replace(config.reconnect, initial_s=args.reconnect_initial, max_s=args.reconnect_max)
    if reconnect.max_s < reconnect.initial_s:
        reconnect = dataclasses.replace(reconnect, max_s=reconnect.initial_s)
    merged = ClientConfig(
        client=client, tls=tls, bridge=bridge, profile=profile, declare=declare, reconnect=reconnect
    )
    merged.client.check()
    if merged.tls.ca is not None and not merged.tls.ca.is_file():
        raise ValueError(f"CA file {merged.tls.ca} does not exist")
    return merged


async def _run_until_signalled(config: ClientConfig) -> int:
    from .daemon import ClientDaemon
    from .errors import ClientError, RegistrationRefusedError, TlsVerificationError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await ClientDaemon(config).run(stop)
    except ClientError as exc:
        # Reconnecting is the daemon's business; what reaches here cannot be fixed by retrying.
        print(f"titanic-client: error: {exc}", file=sys.stderr)
        return EXIT_REFUSED if isinstance(exc, RegistrationRefusedError | TlsVerificationError) else EXIT_FAILED
    return 0


def _import_training_stack() -> None:
    """Import transformers, peft and the stage code once, here, before any worker thread does.

    The daemon builds stages and trains in worker threads (asyncio.to_thread). Two threads that
    import transformers for the first time at once can deadlock on import locks, which Python
    breaks by handing one of them a half-initialised module: "cannot import name 'AutoConfig'
    from 'transformers'" (seen in CI, case 3: one owner building its stages while another
    command's thread trained).
    """
    import peft  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import autograd_bridge.lora
    import autograd_bridge.models
    import autograd_bridge.partition
    import autograd_bridge.pipeline  # noqa: F401

    from . import data, hosting, trainer, training  # noqa: F401


def _run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    config = config_from_args(args)
    _import_training_stack()
    return asyncio.run(_run_until_signalled(config))


def _profile(args: argparse.Namespace) -> int:
    from .config import ProfileSettings
    from .profiling import compute_profile, measure_compute

    settings = ProfileSettings(quick=args.quick, device=args.device)
    profile = compute_profile(measure_compute(settings), DeclaredProfile(), capacity=1)
    if args.json:
        data = dataclasses.asdict(profile)
        data["declared"] = sorted(profile.declared)
        print(json.dumps(data, indent=2))
    else:
        print(f"compute  {profile.flops_per_s / 1e9:.2f} GFLOP/s ({profile.flops_method})")
        print(f"memory   {profile.memory_bytes / 2**30:.2f} GiB available")
        if profile.device == "cuda":
            print(f"gpu      {profile.accelerator}: {profile.gpu_memory_bytes / 2**30:.2f} GiB free")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``titanic-client``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args) if args.command == "run" else _profile(args)
    except ValueError as exc:
        print(f"titanic-client: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
