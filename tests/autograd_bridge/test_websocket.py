"""What only the WebSocket transport has: TLS, tokens, lying or vanishing peers, other processes.

Every test runs on both the fast path and the public path (see the ``path`` fixture). The
Connection contract itself is tested for every implementation in test_transport.py; the switch
between the paths and the fast path's own parts in test_websocket_paths.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trustme
from websockets.asyncio.client import ClientConnection, connect

from autograd_bridge.errors import (
    BridgeError,
    BridgeTimeoutError,
    FrameError,
    FrameTooLargeError,
    PeerLostError,
)
from autograd_bridge.transport import Connection
from autograd_bridge.websocket import (
    PUBLIC_PATH_ENV,
    WebSocketServer,
    WebSocketSettings,
    _fast_path_problem,
    connect_websocket,
    new_event_loop,
    serve_websocket,
)
from tests.autograd_bridge.test_transport import PROMPTLY, websocket_pair

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True, params=["fast", "public"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The path every connection of the test takes, peer processes included (they inherit the
    environment): "fast", or "public" forced by TITANIC_WS_PUBLIC_PATH=1."""
    return take_path(str(request.param), monkeypatch)


def take_path(path: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Make every connection from here on take ``path`` ("fast" or "public"); skip if "fast" is unavailable."""
    if path == "public":
        monkeypatch.setenv(PUBLIC_PATH_ENV, "1")
    else:
        monkeypatch.delenv(PUBLIC_PATH_ENV, raising=False)
        problem = _fast_path_problem()
        if problem is not None:
            pytest.skip(f"the installed websockets has no fast path: {problem}")
    return path


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting the server) from a throwaway CA."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


async def echo(conn: Connection) -> None:
    """Send every message back until the peer leaves."""
    while True:
        await conn.send([await conn.recv()])


@asynccontextmanager
async def serving(
    handler: Callable[[Connection], Awaitable[None]] = echo, **options: object
) -> AsyncIterator[WebSocketServer]:
    server = await serve_websocket(handler, "127.0.0.1", 0, **options)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        await server.close()


@asynccontextmanager
async def first_error(**options: object) -> AsyncIterator[tuple[WebSocketServer, asyncio.Future[BaseException]]]:
    """A server whose handler receives one message and records the error it raised."""
    error: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    async def handler(conn: Connection) -> None:
        try:
            await conn.recv()
        except BridgeError as raised:
            error.set_result(raised)
            return
        error.set_exception(AssertionError("recv() accepted the message"))

    async with serving(handler, **options) as server:
        yield server, error


async def raw_client(url: str) -> ClientConnection:
    """A plain websockets client that can break the bridge's message format on purpose."""
    return await connect(url, compression=None, max_size=None, proxy=None)


def length(total: int) -> bytes:
    return total.to_bytes(8, "little")


# -- TLS -------------------------------------------------------------------------------------


async def test_tls_round_trip(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """Over wss:// with a client that trusts the CA, messages arrive intact."""
    server_context, client_context = tls
    data = os.urandom(3 * MiB + 1)
    async with serving(ssl=server_context) as server:
        assert server.url.startswith("wss://127.0.0.1:")
        client = await connect_websocket(server.url, ssl=client_context)
        await client.send([data])
        assert await client.recv() == data
        await client.close()


async def test_tls_refused_without_the_ca(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """A client that does not trust the server's CA fails with PeerLostError naming the certificate."""
    server_context, _ = tls
    async with serving(ssl=server_context) as server:
        with pytest.raises(PeerLostError, match="certificate"):
            await connect_websocket(server.url)


async def test_ssl_context_needs_wss_url(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """An ssl context with a ws:// url is a ValueError telling to use wss://."""
    with pytest.raises(ValueError, match="wss://"):
        await connect_websocket("ws://127.0.0.1:1", ssl=tls[1])


# -- tokens ----------------------------------------------------------------------------------


async def test_valid_token_is_accepted() -> None:
    """A client with the right bearer token is let in and the server sees that token."""
    seen: list[str | None] = []

    def authenticate(token: str | None) -> bool:
        seen.append(token)
        return token == "s3cret"

    async with serving(authenticate=authenticate) as server:
        client = await connect_websocket(server.url, token="s3cret")
        await client.send([b"hello"])
        assert await client.recv() == b"hello"
        await client.close()
    assert seen == ["s3cret"]


async def test_missing_token_is_refused_with_401() -> None:
    """Without a token the handshake fails with HTTP 401 and the handler never runs."""
    handled: list[Connection] = []

    async def handler(conn: Connection) -> None:
        handled.append(conn)

    async with serving(handler, authenticate=lambda token: token == "s3cret") as server:
        with pytest.raises(PeerLostError, match="401"):
            await connect_websocket(server.url)
    assert handled == []


async def test_wrong_token_is_refused_with_403() -> None:
    """A wrong token fails the handshake with HTTP 403."""
    async with serving(authenticate=lambda token: token == "s3cret") as server:
        with pytest.raises(PeerLostError, match="403"):
            await connect_websocket(server.url, token="guess")


def test_token_with_spaces_is_a_value_error() -> None:
    """A token that cannot be a header value is refused before connecting."""
    with pytest.raises(ValueError, match="token"):
        asyncio.run(connect_websocket("ws://127.0.0.1:1", token="two words"))


# -- connecting ------------------------------------------------------------------------------


async def test_nothing_listening_is_peer_lost() -> None:
    """Connecting to a port where nothing listens raises PeerLostError."""
    async with serving() as server:
        url = server.url
    with pytest.raises(PeerLostError, match="could not open"):
        await connect_websocket(url)


async def test_silent_server_times_out() -> None:
    """A server that accepts TCP but never answers the upgrade raises BridgeTimeoutError."""
    silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(BridgeTimeoutError, match="open_timeout"):
            await connect_websocket(f"ws://127.0.0.1:{port}", settings=WebSocketSettings(open_timeout=0.3))
        assert time.monotonic() - started < PROMPTLY
    finally:
        silent.close()


async def test_server_and_client_name_each_other() -> None:
    """The server reports its port and url; the client's peer is that url."""
    async with serving() as server:
        assert server.url == f"ws://127.0.0.1:{server.port}"
        client = await connect_websocket(server.url)
        assert client.peer == server.url
        await client.close()


@pytest.mark.parametrize(
    "field, value",
    [("max_message_bytes", -1), ("fragment_bytes", 10), ("max_queue", 0), ("close_timeout", 0.0)],
)
def test_settings_refuse_nonsense(field: str, value: float) -> None:
    """WebSocketSettings raises ValueError naming a field with an impossible value."""
    with pytest.raises(ValueError, match=field):
        WebSocketSettings(**{field: value})  # type: ignore[arg-type]


# -- peers that lie --------------------------------------------------------------------------


async def test_declared_oversize_is_refused_without_allocating() -> None:
    """A message declaring 1 TiB is refused from its length alone, with close code 1009."""
    async with first_error(settings=WebSocketSettings(max_message_bytes=1 * MiB)) as (server, error):
        liar = await raw_client(server.url)
        tracemalloc.start()
        try:
            await liar.send(iter([length(1 << 40) + bytes(100), bytes(1000)]))
            raised = await asyncio.wait_for(error, PROMPTLY)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        await asyncio.wait_for(liar.wait_closed(), PROMPTLY)
    assert isinstance(raised, FrameTooLargeError)
    assert peak < 1 * MiB  # nothing near the declared size was allocated
    assert liar.close_code == 1009
    assert "max_message_bytes" in (liar.close_reason or "")


async def test_oversize_from_a_peer_with_a_larger_limit_closes_with_1009() -> None:
    """A peer allowed larger messages gets its oversize message refused and PeerLostError after."""
    small, large = WebSocketSettings(max_message_bytes=1 * MiB), WebSocketSettings(max_message_bytes=8 * MiB)
    async with websocket_pair(small, client_settings=large) as (client, server_end):
        await client.send([bytes(2 * MiB)])
        with pytest.raises(FrameTooLargeError):
            await asyncio.wait_for(server_end.recv(), PROMPTLY)
        with pytest.raises(PeerLostError, match="1009"):
            await asyncio.wait_for(client.recv(), PROMPTLY)


@pytest.mark.parametrize(
    "fragments, message",
    [
        ([length(100) + bytes(200)], "past its declared length"),
        ([length(100) + bytes(50), bytes(100)], "past its declared length"),
        ([length(1000) + bytes(10)], "ended after 10 of its declared 1000"),
        ([length(600_000) + bytes(10), bytes(20)], "ended after 30 of its declared 600000"),
        ([b"abc"], "8-byte length"),
    ],
)
async def test_lying_length_closes_with_1002(fragments: list[bytes], message: str) -> None:
    """Fragments that disagree with the declared length raise FrameError and close with code 1002."""
    async with first_error() as (server, error):
        liar = await raw_client(server.url)
        await liar.send(iter(fragments) if len(fragments) > 1 else fragments[0])
        raised = await asyncio.wait_for(error, PROMPTLY)
        await asyncio.wait_for(liar.wait_closed(), PROMPTLY)
    assert type(raised) is FrameError
    assert message in str(raised)
    assert liar.close_code == 1002
    assert message in (liar.close_reason or "")


# -- cancellation ----------------------------------------------------------------------------


async def test_recv_cancelled_mid_message_closes_connection() -> None:
    """Cancelling recv() in the middle of a message closes the connection instead of wedging it."""
    received: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()
    release = asyncio.Event()

    async def handler(conn: Connection) -> None:
        received.set_result(conn)
        await release.wait()

    async def slow_message() -> AsyncIterator[bytes]:
        yield length(1 * MiB) + bytes(1000)
        await release.wait()
        yield bytes(1 * MiB - 1000)

    async with serving(handler) as server:
        sender = await raw_client(server.url)
        server_end = await received
        sending = asyncio.ensure_future(sender.send(slow_message()))
        reading = asyncio.ensure_future(server_end.recv())
        await asyncio.sleep(0.2)  # the first fragment is in
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        assert server_end.closed
        with pytest.raises(PeerLostError):
            await server_end.recv()
        await asyncio.wait_for(sender.wait_closed(), PROMPTLY)
        assert sender.close_code == 1011
        release.set()
        await asyncio.gather(sending, return_exceptions=True)


async def test_send_cancelled_mid_message_closes_connection() -> None:
    """Cancelling a send() stuck in the middle of a message closes the connection; the peer sees PeerLostError."""
    async with websocket_pair(WebSocketSettings(write_limit=1 * MiB, max_queue=4)) as (client, server_end):
        sending = asyncio.ensure_future(client.send([bytes(96 * MiB)]))
        await asyncio.sleep(0.3)  # buffers are full: the sender waits
        assert not sending.done()
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        assert client.closed
        with pytest.raises(PeerLostError):
            await asyncio.wait_for(server_end.recv(), PROMPTLY)


# -- a peer process that dies ----------------------------------------------------------------

PEER_SCRIPT = """
import asyncio, sys
from autograd_bridge.websocket import serve_websocket

async def stream(conn):
    message = bytes(16 << 20)
    while True:
        await conn.send([message])

async def stall(conn):
    await asyncio.Event().wait()

async def main():
    server = await serve_websocket(stream if sys.argv[1] == "stream" else stall, "127.0.0.1", 0)
    print(server.url, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@asynccontextmanager
async def peer_process(mode: str) -> AsyncIterator[tuple[subprocess.Popen[str], str]]:
    """A separate Python process serving WebSockets: "stream" sends 16 MiB messages forever,
    "stall" never reads."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", PEER_SCRIPT, mode], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )
    try:
        assert process.stdout is not None
        url = (await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 30)).strip()
        assert url.startswith("ws://"), f"peer process printed {url!r}"
        yield process, url
    finally:
        process.kill()
        process.wait()


async def test_killed_peer_fails_pending_recv_promptly() -> None:
    """When the peer process is killed mid-transfer, recv() raises PeerLostError within seconds."""
    async with peer_process("stream") as (process, url):
        client = await connect_websocket(url)
        assert len(await client.recv()) == 16 * MiB
        os.kill(process.pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(PeerLostError, match=r"dropped|closed"):
            while True:  # messages already buffered may still arrive first
                await asyncio.wait_for(client.recv(), PROMPTLY)
        assert time.monotonic() - killed < PROMPTLY
        await client.close()


async def test_killed_peer_fails_blocked_send_promptly() -> None:
    """When a peer that reads nothing is killed, a send() waiting on it raises PeerLostError within seconds."""
    async with peer_process("stall") as (process, url):
        client = await connect_websocket(url, settings=WebSocketSettings(write_limit=1 * MiB))
        sending = asyncio.ensure_future(client.send([bytes(96 * MiB)]))
        await asyncio.sleep(0.5)
        assert not sending.done()
        os.kill(process.pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(PeerLostError):
            await asyncio.wait_for(sending, PROMPTLY)
        assert time.monotonic() - killed < PROMPTLY
        await client.close()


# -- event loops ---------------------------------------------------------------------------------


def test_round_trip_on_uvloop() -> None:
    """The transport works on the loop new_event_loop() returns (uvloop when installed)."""

    data = os.urandom(5 * MiB)

    async def round_trip() -> tuple[bytearray, str]:
        async with websocket_pair() as (client, server_end):
            await client.send([data])
            await server_end.send([await server_end.recv()])
            return await client.recv(), type(asyncio.get_running_loop()).__module__

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        echoed, module = runner.run(round_trip())
    assert echoed == data
    try:
        import uvloop  # noqa: F401
    except ImportError:
        assert module.startswith("asyncio")
    else:
        assert module.startswith("uvloop")
