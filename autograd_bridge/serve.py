"""Host pipeline stages in this process: ``python -m autograd_bridge.serve``.

A researcher can run the bridge with no Titanic server: save a model's config and per-stage
weights (``save_stage_weights``), start one of these per host, and point a data owner's
:class:`~autograd_bridge.remote.StageClient` at the printed URL. The process prints one line
``listening <url>`` once it accepts connections, and serves until SIGTERM, SIGINT, or (with
``--exit-with-stdin``) until its standard input closes, so a parent that dies takes it along.

For the chained path (:mod:`autograd_bridge.chain`) the parent, which alone knows where every
stage is hosted, writes one line ``route <json>`` to standard input (``--exit-with-stdin``):
``{"next": {"<stage>": "<url>"}, "prev": {...}, "token": "<this host's token>"}``. The
neighbours present their own tokens, which this host accepts by ``--peer-token``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .chain import ChainRoute, PeerAddress
from .host import HostSettings, StageHost, serve_stage_host
from .partition import StageSpec
from .websocket import WebSocketSettings


def _stage_arg(text: str) -> tuple[int, int, int, int]:
    """``INDEX/NUM_STAGES:START-END``, e.g. ``1/4:2-4`` (stage 1 of 4 holds blocks 2 and 3)."""
    try:
        head, blocks = text.split(":")
        index, total = (int(v) for v in head.split("/"))
        start, end = (int(v) for v in blocks.split("-"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected INDEX/NUM_STAGES:START-END, got {text!r}") from exc
    return index, total, start, end


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m autograd_bridge.serve", description=__doc__)
    p.add_argument("--config", required=True, type=Path, help="directory with the model's config.json")
    p.add_argument("--weights", required=True, type=Path, nargs="+", help="safetensors file(s) to read from")
    p.add_argument(
        "--stage", required=True, type=_stage_arg, action="append", help="INDEX/NUM_STAGES:START-END (repeatable)"
    )
    p.add_argument("--run-id", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--token", help="peers must present this bearer token")
    p.add_argument(
        "--peer-token",
        action="append",
        default=[],
        help="also accept this token (a chain neighbour's; repeatable)",
    )
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve wss:// (needs --tls-key)")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.add_argument("--attn-implementation", default=None, help="eager, sdpa, ...")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--compression", choices=["none", "fp16", "int8"], default="none")
    p.add_argument("--exit-with-stdin", action="store_true", help="exit when standard input closes")
    defaults = WebSocketSettings()
    p.add_argument(
        "--receive-budget-mib",
        type=int,
        default=defaults.receive_budget_bytes >> 20,
        help="MiB that messages being received may hold at once, over all peers (default %(default)s)",
    )
    p.add_argument(
        "--receive-budget-per-peer-mib",
        type=int,
        default=None,
        help="... and per peer IP address (default: the largest message allowed, "
        f"{defaults.receive_budget_per_peer >> 20})",
    )
    p.add_argument(
        "--receive-wait-s",
        type=float,
        default=defaults.receive_budget_wait_s,
        help="seconds a message may wait for room in that budget before it is refused (default %(default)s)",
    )
    return p


def websocket_settings(args: argparse.Namespace) -> WebSocketSettings:
    """The transport settings the flags ask for; exits with the reason when they make no sense."""
    per_peer = args.receive_budget_per_peer_mib
    try:
        return WebSocketSettings(
            receive_budget_bytes=args.receive_budget_mib << 20,
            receive_budget_per_peer_bytes=None if per_peer is None else per_peer << 20,
            receive_budget_wait_s=args.receive_wait_s,
        )
    except ValueError as error:
        raise SystemExit(f"bad receive budget flags: {error}") from error


async def _serve(args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    from .partition import load_stage

    transport = websocket_settings(args)  # checked before the slow model load

    config = AutoConfig.from_pretrained(args.config)
    stages = {}
    for index, total, start, end in args.stage:
        spec = StageSpec(index=index, num_stages=total, layer_start=start, layer_end=end)
        stages[index] = load_stage(
            config, spec, [str(w) for w in args.weights], attn_implementation=args.attn_implementation
        )
    settings = HostSettings(lr=args.lr, optimizer=args.optimizer, compression=args.compression)
    host = StageHost(stages, run_id=args.run_id, settings=settings)
    accepted = {t for t in [args.token, *args.peer_token] if t}
    authenticate = (lambda presented: presented in accepted) if accepted else None
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise SystemExit("--tls-cert and --tls-key go together")
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    server = await serve_stage_host(
        host, args.host, args.port, ssl=tls, authenticate=authenticate, websocket=transport
    )
    print(f"listening {server.url}", flush=True)  # type: ignore[attr-defined]

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.exit_with_stdin:

        async def set_route(route: ChainRoute) -> None:
            host.chain.set_route(route)

        def read_commands() -> None:
            for line in sys.stdin:
                if line.startswith("route "):
                    route = parse_route(line.removeprefix("route "))
                    asyncio.run_coroutine_threadsafe(set_route(route), loop).result()
                    print("routed", flush=True)
            loop.call_soon_threadsafe(stop.set)

        # A daemon thread, not the loop's executor: at exit asyncio.run waits for its executor's
        # threads, and this one blocks until stdin closes, so SIGTERM would never end the process.
        threading.Thread(target=read_commands, daemon=True).start()
    await stop.wait()
    await server.close()  # type: ignore[attr-defined]
    await host.aclose()


def parse_route(text: str) -> ChainRoute:
    """The ChainRoute of a ``route`` line's JSON (from the parent process, not from a peer)."""
    raw = json.loads(text)
    token = raw.get("token")
    return ChainRoute(
        next={int(k): PeerAddress(url=v, token=token) for k, v in raw.get("next", {}).items()},
        prev={int(k): PeerAddress(url=v, token=token) for k, v in raw.get("prev", {}).items()},
    )


class StageHostProcess:
    """A stage host in a child process running this module; ``url`` waits until it listens.

    The child exits when this object is closed or when the parent dies (its stdin closes).
    """

    def __init__(
        self,
        config_dir: str | Path,
        weights: Sequence[str | Path],
        specs: Sequence[StageSpec],
        *,
        run_id: str,
        attn_implementation: str | None = None,
        token: str | None = None,
        peer_tokens: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        start_timeout_s: float = 180.0,
    ) -> None:
        cmd = [sys.executable, "-m", "autograd_bridge.serve", "--config", str(config_dir), "--run-id", run_id,
               "--exit-with-stdin", "--weights", *(str(w) for w in weights)]  # fmt: skip
        for spec in specs:
            cmd += ["--stage", f"{spec.index}/{spec.num_stages}:{spec.layer_start}-{spec.layer_end}"]
        if attn_implementation:
            cmd += ["--attn-implementation", attn_implementation]
        if token:
            cmd += [f"--token={token}"]  # "=": a token may begin with "-"
        cmd += [f"--peer-token={t}" for t in peer_tokens]
        cmd += list(extra_args)
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(env or os.environ)
        )
        self._start_timeout_s = start_timeout_s
        self._url: str | None = None

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def url(self) -> str:
        """The ws:// URL the host listens on (blocks until it does)."""
        if self._url is None:
            self._url = self._wait_listening()
        return self._url

    def _wait_listening(self) -> str:
        return self._wait_for_line("listening ").split(" ", 1)[1].strip()

    def _wait_for_line(self, prefix: str) -> str:
        stdout = self._proc.stdout
        if stdout is None:
            raise RuntimeError("stage host process has no stdout pipe")
        deadline = time.monotonic() + self._start_timeout_s
        while time.monotonic() < deadline:
            line = stdout.readline()
            if line.startswith(prefix):
                return line
            if not line and self._proc.poll() is not None:
                raise RuntimeError(
                    f"stage host exited with status {self._proc.returncode} before {prefix.strip()!r}"
                )
        raise RuntimeError(f"stage host did not print {prefix.strip()!r} within {self._start_timeout_s:g} s")

    def set_route(self, next: Mapping[int, str], prev: Mapping[int, str], token: str | None = None) -> None:
        """Tell the host where its stages' neighbours are (the chained path); ``token`` is its own."""
        if self._proc.stdin is None:
            raise RuntimeError("stage host process has no stdin pipe")
        route: dict[str, object] = {
            "next": {str(k): v for k, v in next.items()},
            "prev": {str(k): v for k, v in prev.items()},
        }
        if token:
            route["token"] = token
        self.url  # noqa: B018 - the "listening" line comes first
        self._proc.stdin.write("route " + json.dumps(route) + "\n")
        self._proc.stdin.flush()
        self._wait_for_line("routed")

    def kill(self) -> None:
        """Kill the host abruptly (to test peers that vanish)."""
        self._proc.kill()
        self._proc.wait()

    def close(self) -> None:
        """Ask the host to exit (stdin closes), then make sure it is gone."""
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
