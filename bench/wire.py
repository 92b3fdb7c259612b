"""Wire benchmark: frames over the bridge's WebSocket transport vs a plain TCP socket.

    python bench/wire.py                      # 16 MiB messages, 5 rounds of 20 echoes each
    python bench/wire.py --size-mib 64 --rounds 3 --loop asyncio

An echo between two processes on loopback: this process sends a message, the peer process sends
it back; GB/s = bytes moved in both directions / seconds for the round trip.

(a) raw: blocking TCP sockets; ``sendall`` of the bytes, ``recv_into`` a preallocated buffer.
    The best a Python process can do on this machine, with no framing at all.
(b) wire: the bridge's transport. This process (the data owner) encodes
    ``Frame(kind=FORWARD, tensors={"hidden": t})`` and sends it over
    :func:`~autograd_bridge.websocket.connect_websocket`; the peer (a stage host, serving with
    :func:`~autograd_bridge.websocket.serve_websocket`) decodes it, re-encodes the tensor as a
    FORWARD_RESULT and sends that back, which this process decodes.

(a) and (b) alternate round by round so machine noise hits both; the figures are medians over
all timed echoes. Both peers stay connected for the whole run and block while the other mode
runs. The last line is ``wire_gbps=<x> raw_gbps=<y> wire_ratio=<x/y>``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from autograd_bridge.frames import Frame, MessageKind, decode_frame, encode_frame, encoded_nbytes  # noqa: E402
from autograd_bridge.transport import Connection  # noqa: E402
from autograd_bridge.websocket import (  # noqa: E402
    WebSocketSettings,
    connect_websocket,
    new_event_loop,
    serve_websocket,
)

MiB = 1 << 20
_HIDDEN = 1024  # width of the benchmark's hidden states (C)


# -- the peer process ------------------------------------------------------------------------


def _raw_peer(size: int) -> None:
    """Echo ``size``-byte messages on a TCP socket until the other side hangs up."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        print(listener.getsockname()[1], flush=True)
        sock, _ = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray(size)
    with sock, memoryview(buffer) as view:
        while _recv_exactly(sock, view):
            sock.sendall(view)


def _wire_peer(loop_name: str, settings_json: str) -> None:
    """Serve one stage-host-like echo: FORWARD in, the same tensor back as FORWARD_RESULT."""

    async def echo(conn: Connection) -> None:
        while True:
            request = decode_frame(await conn.recv())
            reply = Frame(
                kind=MessageKind.FORWARD_RESULT,
                request_id=request.request_id,
                micro_batch=request.micro_batch,
                tensors={"hidden": request.tensors["hidden"]},
            )
            await conn.send(encode_frame(reply))

    async def serve() -> None:
        settings = WebSocketSettings(**json.loads(settings_json))
        server = await serve_websocket(echo, "127.0.0.1", 0, settings=settings)
        print(server.url, flush=True)
        # Serve until the parent closes our stdin (or dies).
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.close()

    _run(serve(), loop_name)


def _settings(**overrides: Any) -> WebSocketSettings:
    # Keepalive pings would only add noise to a benchmark.
    return WebSocketSettings(**{"ping_interval": None, **overrides})


# -- the measuring process -------------------------------------------------------------------


def _recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from ``sock``; False on a clean end of stream before the first byte."""
    got = 0
    while got < view.nbytes:
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return False
            raise ConnectionError(f"peer closed after {got} of {view.nbytes} bytes")
        got += n
    return True


def _start_peer(*args: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``bench/wire.py --peer ...``; return it and the first line it prints."""
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--peer", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None  # we asked for a pipe
    line = process.stdout.readline().strip()
    if not line:
        process.kill()
        raise RuntimeError(f"benchmark peer {args} exited before it was ready (code {process.wait()})")
    return process, line


def _stop_peer(process: subprocess.Popen[str]) -> None:
    stdin: IO[str] | None = process.stdin
    if stdin is not None:
        stdin.close()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _hidden_states(size_bytes: int) -> torch.Tensor:
    """A float32 activation of ``size_bytes`` bytes, (1, T, C) when it divides evenly."""
    numel = size_bytes // 4
    generator = torch.Generator().manual_seed(0)
    if numel % _HIDDEN == 0 and numel > 0:
        return torch.randn(1, numel // _HIDDEN, _HIDDEN, generator=generator)  # (B, T, C)
    return torch.randn(numel, generator=generator)


def _time_raw(sock: socket.socket, data: memoryview, inbox: memoryview, repeats: int) -> list[float]:
    """Seconds per echo of ``data``, after one untimed echo; checks the first echo's bytes."""
    times = []
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        sock.sendall(data)
        if not _recv_exactly(sock, inbox):
            raise ConnectionError("raw peer hung up")
        elapsed = time.perf_counter() - start
        if repeat == 0:
            if inbox != data:
                raise RuntimeError("raw echo came back different")
        else:
            times.append(elapsed)
    return times


async def _time_wire(conn: Connection, hidden: torch.Tensor, repeats: int) -> list[float]:
    """Seconds per FORWARD / FORWARD_RESULT echo, after one untimed echo that is checked."""
    times = []
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        await conn.send(encode_frame(Frame(kind=MessageKind.FORWARD, request_id=repeat, tensors={"hidden": hidden})))
        reply = decode_frame(await conn.recv())
        elapsed = time.perf_counter() - start
        if repeat == 0:
            if reply.kind != MessageKind.FORWARD_RESULT or not torch.equal(reply.tensors["hidden"], hidden):
                raise RuntimeError("wire echo came back different")
        else:
            times.append(elapsed)
    return times


def measure_wire(
    size_bytes: int = 16 * MiB,
    repeats: int = 20,
    rounds: int = 5,
    *,
    loop: str = "auto",
    settings: WebSocketSettings | None = None,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Echo ``size_bytes`` messages over raw TCP and over the WebSocket transport, alternating.

    ``loop`` is the event loop of both WebSocket ends: "auto" (uvloop when installed),
    "uvloop" or "asyncio". Returns medians in GB/s (``raw_gbps``, ``wire_gbps``), their
    ratio ``wire_ratio``, per-round medians, and the sizes moved.
    """
    if size_bytes < 4 or repeats < 1 or rounds < 1:
        raise ValueError("size_bytes must be >= 4, repeats and rounds >= 1")
    loop_name = _loop_name(loop)
    settings = settings or _settings()
    hidden = _hidden_states(size_bytes)
    frame_bytes = encoded_nbytes(encode_frame(Frame(kind=MessageKind.FORWARD, tensors={"hidden": hidden})))
    raw_bytes = hidden.numel() * hidden.element_size()
    log(
        f"wire benchmark: {raw_bytes / MiB:.1f} MiB tensor ({frame_bytes} bytes as a frame), "
        f"{rounds} rounds x {repeats} echoes, event loop {loop_name}, fragments of "
        f"{settings.fragment_bytes >> 10} KiB, write_limit {settings.write_limit >> 10} KiB"
    )

    raw_peer, port = _start_peer("raw", str(raw_bytes))
    wire_peer, url = _start_peer("wire", loop_name, json.dumps(dataclasses.asdict(settings)))
    event_loop = _make_loop(loop_name)
    raw_times: list[float] = []
    wire_times: list[float] = []
    per_round: list[tuple[float, float]] = []
    try:
        sock = socket.create_connection(("127.0.0.1", int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = event_loop.run_until_complete(connect_websocket(url, settings=settings))
        data = memoryview(hidden.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]  # numpy stubs: Buffer only on 3.12+
        inbox = memoryview(bytearray(raw_bytes))
        for index in range(rounds):
            raw = _time_raw(sock, data, inbox, repeats)
            wire = event_loop.run_until_complete(_time_wire(conn, hidden, repeats))
            raw_times += raw
            wire_times += wire
            round_raw = 2 * raw_bytes / statistics.median(raw) / 1e9
            round_wire = 2 * frame_bytes / statistics.median(wire) / 1e9
            per_round.append((round_wire, round_raw))
            log(
                f"  round {index + 1}: wire {round_wire:.3f} GB/s  raw {round_raw:.3f} GB/s  "
                f"ratio {round_wire / round_raw:.3f}"
            )
        event_loop.run_until_complete(conn.close())
        sock.close()
    finally:
        _stop_peer(raw_peer)
        _stop_peer(wire_peer)
        event_loop.close()
    raw_gbps = 2 * raw_bytes / statistics.median(raw_times) / 1e9
    wire_gbps = 2 * frame_bytes / statistics.median(wire_times) / 1e9
    return {
        "wire_gbps": wire_gbps,
        "raw_gbps": raw_gbps,
        "wire_ratio": wire_gbps / raw_gbps,
        "rounds": per_round,  # (wire_gbps, raw_gbps) per round
        "size_bytes": raw_bytes,
        "frame_bytes": frame_bytes,
        "event_loop": loop_name,
    }


def _loop_name(loop: str) -> str:
    if loop not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f"loop must be auto, uvloop or asyncio, got {loop!r}")
    if loop != "auto":
        return loop
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _make_loop(loop_name: str) -> asyncio.AbstractEventLoop:
    if loop_name == "asyncio":
        return asyncio.new_event_loop()
    if loop_name == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return new_event_loop()


def _run(coro: Any, loop_name: str) -> None:
    event_loop = _make_loop(loop_name)
    try:
        event_loop.run_until_complete(coro)
    finally:
        event_loop.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=float, default=16.0, help="message size in MiB (default 16)")
    parser.add_argument("--repeats", type=int, default=20, help="timed echoes per round and mode")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, alternating raw and wire")
    parser.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto")
    parser.add_argument("--fragment-kib", type=int, default=None, help="WebSocketSettings.fragment_bytes in KiB")
    parser.add_argument("--write-limit-kib", type=int, default=None, help="WebSocketSettings.write_limit in KiB")
    parser.add_argument("--max-queue", type=int, default=None, help="WebSocketSettings.max_queue")
    parser.add_argument("--peer", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer is not None:
        mode, *peer_args = args.peer
        if mode == "raw":
            _raw_peer(int(peer_args[0]))
        else:
            _wire_peer(*peer_args)
        return 0
    overrides: dict[str, int] = {}
    if args.fragment_kib is not None:
        overrides["fragment_bytes"] = args.fragment_kib << 10
    if args.write_limit_kib is not None:
        overrides["write_limit"] = args.write_limit_kib << 10
    if args.max_queue is not None:
        overrides["max_queue"] = args.max_queue
    result = measure_wire(
        int(args.size_mib * MiB), args.repeats, args.rounds, loop=args.loop, settings=_settings(**overrides)
    )
    print(
        f"median: wire {result['wire_gbps']:.3f} GB/s, raw {result['raw_gbps']:.3f} GB/s, "
        f"ratio {result['wire_ratio']:.3f} (target >= 0.5)"
    )
    print(
        f"wire_gbps={result['wire_gbps']:.3f} raw_gbps={result['raw_gbps']:.3f} "
        f"wire_ratio={result['wire_ratio']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
