"""The Connection contract, run against every implementation: the memory pipe and real WebSockets.

The WebSocket pairs are a real server and client on 127.0.0.1 (ephemeral port) in this process,
once on the default (fast) path and once with ``fast_path=False`` on websockets' public API only;
tests/autograd_bridge/test_websocket.py adds what only WebSockets have (TLS, tokens, processes).
"""

from __future__ import annotations

import array
import asyncio
import functools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from autograd_bridge.errors import FrameTooLargeError, PeerLostError
from autograd_bridge.transport import Connection, memory_pipe, message_nbytes
from autograd_bridge.websocket import WebSocketSettings, connect_websocket, serve_websocket

KiB = 1 << 10
MiB = 1 << 20
FRAGMENT = WebSocketSettings().fragment_bytes
PROMPTLY = 3.0  # seconds within which a lost peer must be noticed


@asynccontextmanager
async def websocket_pair(
    settings: WebSocketSettings | None = None,
    client_settings: WebSocketSettings | None = None,
) -> AsyncIterator[tuple[Connection, Connection]]:
    """(client end, server end) of one real WebSocket on loopback; both closed on exit."""
    server_settings = settings or WebSocketSettings()
    accepted: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()
    finished = asyncio.Event()

    async def handler(conn: Connection) -> None:
        accepted.set_result(conn)
        await finished.wait()

    server = await serve_websocket(handler, "127.0.0.1", 0, settings=server_settings)
    try:
        client = await connect_websocket(server.url, settings=client_settings or server_settings)
        server_end = await asyncio.wait_for(accepted, 5)
        try:
            yield client, server_end
        finally:
            finished.set()
            await client.close()
    finally:
        await server.close()


@asynccontextmanager
async def connection_pair(
    kind: str, *, max_message_bytes: int | None = None, max_queue: int | None = None
) -> AsyncIterator[tuple[Connection, Connection]]:
    """Two connected ends of the implementation ``kind`` ("memory", "websocket" or "websocket-public")."""
    if kind == "memory":
        options: dict[str, int] = {}
        if max_message_bytes is not None:
            options["max_message_bytes"] = max_message_bytes
        if max_queue is not None:
            options["max_queue"] = max_queue
        a, b = memory_pipe(**options)
        try:
            yield a, b
        finally:
            await a.close()
            await b.close()
        return
    settings = WebSocketSettings(
        max_message_bytes=max_message_bytes or WebSocketSettings().max_message_bytes,
        max_queue=max_queue or WebSocketSettings().max_queue,
        fast_path=kind != "websocket-public",
    )
    async with websocket_pair(settings) as pair:
        yield pair


@pytest.fixture(params=["memory", "websocket", "websocket-public"])
def kind(request: pytest.FixtureRequest) -> str:
    """Which Connection implementation a test runs against."""
    return str(request.param)


@functools.lru_cache(maxsize=1024)
def _block(seed: int) -> bytes:
    return bytes((seed * 131 + i * 7) % 251 for i in range(4096))


def pattern(size: int, seed: int = 0) -> bytes:
    """``size`` reproducible bytes that differ from message to message."""
    block = _block(seed)
    return (block * (size // len(block) + 1))[:size]


@pytest.mark.parametrize(
    "size",
    [0, 1, FRAGMENT - 9, FRAGMENT - 8, FRAGMENT - 7, FRAGMENT - 1, FRAGMENT, FRAGMENT + 1, 20 * MiB],
)
async def test_message_arrives_intact(kind: str, size: int) -> None:
    """A message of any size, from empty to 20 MiB and around a fragment boundary, arrives unchanged."""
    data = os.urandom(size)
    async with connection_pair(kind) as (a, b):
        await a.send([data])
        got = await b.recv()
        await b.send([got])
        back = await a.recv()
    assert isinstance(got, bytearray)
    assert got == data
    assert back == data


async def test_parts_are_joined_into_one_message(kind: str) -> None:
    """Parts of any buffer type and size, empty ones included, arrive as their concatenation."""
    floats = array.array("f", [float(i) for i in range(100_000)])  # a non-byte format
    parts: list[bytes | bytearray | memoryview] = [
        b"head",
        b"",
        bytearray(b"x" * 20_000),
        memoryview(floats),
        os.urandom(3 * FRAGMENT + 5),
        memoryview(os.urandom(100))[10:90],
        b"tail",
    ]
    expected = b"".join(bytes(memoryview(part).cast("B")) for part in parts)
    async with connection_pair(kind) as (a, b):
        await a.send(parts)
        got = await b.recv()
    assert message_nbytes(parts) == len(expected)
    assert got == expected


async def test_sender_may_reuse_its_buffer(kind: str) -> None:
    """Once send() returns, changing the sent buffer does not change what the peer receives."""
    buffer = bytearray(pattern(2 * FRAGMENT + 3))
    original = bytes(buffer)
    async with connection_pair(kind) as (a, b):
        await a.send([buffer])
        buffer[:] = bytes(len(buffer))
        got = await b.recv()
    assert got == original


async def test_received_message_is_writable_and_owned(kind: str) -> None:
    """Each received message is a separate writable bytearray."""
    async with connection_pair(kind) as (a, b):
        await a.send([b"first message"])
        await a.send([b"second message"])
        first, second = await b.recv(), await b.recv()
    first[0:5] = b"FIRST"
    assert first == bytearray(b"FIRST message")
    assert second == bytearray(b"second message")


async def test_many_messages_keep_their_order(kind: str) -> None:
    """Hundreds of small messages with a few multi-fragment ones among them arrive in order."""
    sizes = [8 if i % 50 else 3 * FRAGMENT for i in range(400)]

    async def produce(conn: Connection) -> None:
        for index, size in enumerate(sizes):
            await conn.send([index.to_bytes(8, "little"), pattern(size - 8, index)])

    async with connection_pair(kind) as (a, b):
        producer = asyncio.ensure_future(produce(a))
        for index, size in enumerate(sizes):
            got = await b.recv()
            assert int.from_bytes(got[:8], "little") == index
            assert got[8:] == pattern(size - 8, index)
        await producer


async def test_both_directions_at_once(kind: str) -> None:
    """Both ends sending and receiving concurrently get every message of the other, in order."""
    count, size = 40, FRAGMENT + 12345

    async def talk(conn: Connection, seed: int) -> list[bytearray]:
        async def send_all() -> None:
            for index in range(count):
                await conn.send([pattern(size, seed * 1000 + index)])

        sender = asyncio.ensure_future(send_all())
        received = [await conn.recv() for _ in range(count)]
        await sender
        return received

    async with connection_pair(kind) as (a, b):
        from_b, from_a = await asyncio.wait_for(asyncio.gather(talk(a, 1), talk(b, 2)), 30)
    assert from_a == [pattern(size, 1000 + i) for i in range(count)]
    assert from_b == [pattern(size, 2000 + i) for i in range(count)]


async def test_concurrent_senders_do_not_interleave(kind: str) -> None:
    """Messages sent at the same time by several tasks on one end each arrive whole."""
    size = 5 * FRAGMENT + 17
    async with connection_pair(kind) as (a, b):
        senders = asyncio.gather(*(a.send([bytes([fill]) * size]) for fill in range(1, 6)))
        received = [await b.recv() for _ in range(5)]
        await senders
    fills = sorted(message[0] for message in received)
    assert fills == [1, 2, 3, 4, 5]
    assert all(message == bytes([message[0]]) * size for message in received)


async def test_oversize_send_is_refused_and_connection_stays_usable(kind: str) -> None:
    """A message over max_message_bytes raises FrameTooLargeError before anything is sent."""
    limit = 1 * MiB
    async with connection_pair(kind, max_message_bytes=limit) as (a, b):
        with pytest.raises(FrameTooLargeError, match="max_message_bytes"):
            await a.send([bytes(limit), b"!"])
        await a.send([bytes(limit)])
        assert len(await b.recv()) == limit


async def test_pending_recv_raises_when_peer_closes(kind: str) -> None:
    """A recv() waiting when the peer closes raises PeerLostError promptly."""
    async with connection_pair(kind) as (a, b):
        waiting = asyncio.ensure_future(b.recv())
        await asyncio.sleep(0.05)
        await a.close()
        with pytest.raises(PeerLostError):
            await asyncio.wait_for(waiting, PROMPTLY)
        assert b.closed


async def test_messages_sent_before_close_are_delivered(kind: str) -> None:
    """Messages sent before the peer closed still arrive; then recv() raises PeerLostError."""
    async with connection_pair(kind) as (a, b):
        for index in range(3):
            await a.send([pattern(FRAGMENT + 1, index)])
        closing = asyncio.ensure_future(a.close())
        received = [await b.recv() for _ in range(3)]
        with pytest.raises(PeerLostError):
            await asyncio.wait_for(b.recv(), PROMPTLY)
        await closing
    assert received == [pattern(FRAGMENT + 1, index) for index in range(3)]


async def test_send_raises_after_peer_closed(kind: str) -> None:
    """send() to a peer that has closed raises PeerLostError."""
    async with connection_pair(kind) as (a, b):
        await a.close()
        with pytest.raises(PeerLostError):
            await asyncio.wait_for(b.send([b"anyone there?"]), PROMPTLY)


async def test_close_is_idempotent_and_final(kind: str) -> None:
    """close() twice is fine; afterwards closed is True and send/recv raise PeerLostError."""
    async with connection_pair(kind) as (a, _):
        await a.close()
        await a.close()
        assert a.closed
        with pytest.raises(PeerLostError):
            await a.send([b"late"])
        with pytest.raises(PeerLostError):
            await a.recv()


async def test_pending_recv_raises_on_local_close(kind: str) -> None:
    """A recv() waiting on an end that is closed locally raises PeerLostError."""
    async with connection_pair(kind) as (a, _):
        waiting = asyncio.ensure_future(a.recv())
        await asyncio.sleep(0.05)
        await a.close()
        with pytest.raises(PeerLostError):
            await asyncio.wait_for(waiting, PROMPTLY)


async def test_blocked_send_raises_when_peer_closes(kind: str) -> None:
    """A send() waiting for a peer that reads nothing raises PeerLostError when that peer closes."""
    async with connection_pair(kind, max_queue=2) as (a, b):

        async def flood() -> None:
            while True:
                await a.send([bytes(4 * MiB)])

        flooding = asyncio.ensure_future(flood())
        await asyncio.sleep(0.3)  # long enough to fill every buffer on the way
        assert not flooding.done()
        await asyncio.wait_for(b.close(), PROMPTLY)  # under close_timeout: close() reads what blocks it
        with pytest.raises(PeerLostError):
            await asyncio.wait_for(flooding, PROMPTLY)


async def test_both_ends_are_connections(kind: str) -> None:
    """Both ends satisfy the Connection protocol and name their peer."""
    async with connection_pair(kind) as (a, b):
        assert isinstance(a, Connection)
        assert isinstance(b, Connection)
        assert a.peer and b.peer
        assert not a.closed and not b.closed


# -- memory pipe only ------------------------------------------------------------------------


async def test_memory_pipe_send_waits_when_queue_is_full() -> None:
    """With max_queue messages unread, the next send() waits until the reader takes one."""
    a, b = memory_pipe(max_queue=2)
    await a.send([b"1"])
    await a.send([b"2"])
    third = asyncio.ensure_future(a.send([b"3"]))
    await asyncio.sleep(0.05)
    assert not third.done()
    assert await b.recv() == b"1"
    await asyncio.wait_for(third, 1)
    assert [await b.recv(), await b.recv()] == [b"2", b"3"]


def test_memory_pipe_rejects_bad_bounds() -> None:
    """memory_pipe refuses a queue bound below 1 or a negative message bound."""
    with pytest.raises(ValueError, match="max_queue"):
        memory_pipe(max_queue=0)
    with pytest.raises(ValueError, match="max_message_bytes"):
        memory_pipe(max_message_bytes=-1)


async def test_non_contiguous_part_is_refused() -> None:
    """A strided buffer is refused with a ValueError saying to make it contiguous."""
    a, _ = memory_pipe()
    strided = memoryview(bytes(range(100)))[::2]
    with pytest.raises(ValueError, match="contiguous"):
        await a.send([strided])
