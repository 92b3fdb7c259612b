"""The switch between the WebSocket transport's fast path and public path, and the fast path's parts.

test_websocket.py and test_transport.py run the transport's behaviour on both paths; these tests
check which path a connection takes, and that the fast path's replacements of websockets' private
parts (_ChunkReader, frames written unjoined) act exactly like the originals.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Generator, Iterator

import pytest
import websockets
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode, apply_mask
from websockets.streams import StreamReader

from autograd_bridge import websocket
from autograd_bridge.transport import Connection
from autograd_bridge.websocket import (
    PUBLIC_PATH_ENV,
    WebSocketSettings,
    _ChunkReader,
    _fast_path_problem,
    _frame_parts,
    connect_websocket,
)
from tests.autograd_bridge.test_transport import FRAGMENT, websocket_pair

PUBLIC = WebSocketSettings(fast_path=False)


@pytest.fixture(autouse=True)
def fresh_check(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No path forced from outside, and the installed websockets checked anew by each test."""
    monkeypatch.delenv(PUBLIC_PATH_ENV, raising=False)
    _fast_path_problem.cache_clear()
    yield
    _fast_path_problem.cache_clear()


@pytest.fixture
def needs_fast_path() -> None:
    problem = _fast_path_problem()
    if problem is not None:
        pytest.skip(f"the installed websockets has no fast path: {problem}")


def reader_types(*ends: Connection) -> list[type]:
    """The type of the stream reader each end's websockets protocol receives through."""
    return [type(end._ws.protocol.reader) for end in ends]  # type: ignore[attr-defined]


def frames_written_unjoined(*ends: Connection) -> list[bool]:
    """Whether each end's protocol has the fast path's send_frame in place of websockets' own."""
    return ["send_frame" in vars(end._ws.protocol) for end in ends]  # type: ignore[attr-defined]


async def round_trip(client: Connection, server_end: Connection, size: int = 3 * FRAGMENT + 5) -> None:
    """A multi-fragment message from client to server and back arrives intact."""
    data = os.urandom(size)
    await client.send([data])
    await server_end.send([await server_end.recv()])
    assert await client.recv() == data


# -- which path a connection takes -----------------------------------------------------------


@pytest.mark.usefixtures("needs_fast_path")
async def test_connections_use_the_one_copy_reader() -> None:
    """Both ends receive through _ChunkReader (a websockets upgrade that breaks this fails here)."""
    async with websocket_pair() as (client, server_end):
        for end in (client, server_end):
            assert isinstance(end._ws.protocol.reader, _ChunkReader)  # type: ignore[attr-defined]
        assert frames_written_unjoined(client, server_end) == [True, True]


async def test_setting_takes_the_public_path() -> None:
    """With fast_path=False both ends keep websockets' own reader and frame writer."""
    async with websocket_pair(PUBLIC) as (client, server_end):
        assert reader_types(client, server_end) == [StreamReader, StreamReader]
        assert frames_written_unjoined(client, server_end) == [False, False]
        await round_trip(client, server_end)


async def test_environment_variable_takes_the_public_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """TITANIC_WS_PUBLIC_PATH=1 puts connections with default settings on the public path."""
    monkeypatch.setenv(PUBLIC_PATH_ENV, "1")
    async with websocket_pair() as (client, server_end):
        assert reader_types(client, server_end) == [StreamReader, StreamReader]
        assert frames_written_unjoined(client, server_end) == [False, False]
        await round_trip(client, server_end)


@pytest.mark.usefixtures("needs_fast_path")
async def test_ends_on_different_paths_understand_each_other() -> None:
    """A fast-path client and a public-path server exchange messages intact."""
    async with websocket_pair(PUBLIC, client_settings=WebSocketSettings()) as (client, server_end):
        assert reader_types(client, server_end) == [_ChunkReader, StreamReader]
        await round_trip(client, server_end)
        await round_trip(server_end, client, size=FRAGMENT - 3)


async def test_bad_environment_value_is_a_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A TITANIC_WS_PUBLIC_PATH other than 0 or 1 is refused with a ValueError naming it."""
    monkeypatch.setenv(PUBLIC_PATH_ENV, "yes")
    with pytest.raises(ValueError, match=PUBLIC_PATH_ENV):
        await connect_websocket("ws://127.0.0.1:1")


@pytest.mark.parametrize("patched", ["version", "tested majors"])
async def test_unknown_version_takes_the_public_path_with_one_warning(
    patched: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A websockets major version the fast path was not tested with gets the public path and one warning."""
    if patched == "version":
        monkeypatch.setattr(websockets, "__version__", "99.0")
    else:
        monkeypatch.setattr(websocket, "TESTED_WEBSOCKETS_MAJORS", ())
    caplog.set_level(logging.WARNING, logger=websocket.__name__)
    for _ in range(2):
        async with websocket_pair() as (client, server_end):
            assert reader_types(client, server_end) == [StreamReader, StreamReader]
            assert frames_written_unjoined(client, server_end) == [False, False]
            await round_trip(client, server_end)
    warnings = [record.getMessage() for record in caplog.records if "public API" in record.getMessage()]
    assert len(warnings) == 1
    assert "tested with websockets" in warnings[0]


async def test_missing_private_attribute_takes_the_public_path(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A websockets protocol without an attribute the fast path needs gets the public path and a warning naming it."""
    monkeypatch.setattr(websocket, "_PROTOCOL_INTERNALS", (*websocket._PROTOCOL_INTERNALS, "gone_in_v99"))
    caplog.set_level(logging.WARNING, logger=websocket.__name__)
    async with websocket_pair() as (client, server_end):
        assert reader_types(client, server_end) == [StreamReader, StreamReader]
        await round_trip(client, server_end)
    assert any("gone_in_v99" in record.getMessage() for record in caplog.records)


def test_installed_version_is_tested() -> None:
    """The installed websockets is one the fast path was tested with (else pyproject's bound is wrong)."""
    assert _fast_path_problem() is None


# -- the fast path's parts -------------------------------------------------------------------


def _drive(reader: StreamReader, chunks: list[bytes], reads: list[tuple[str, int]]) -> list[object]:
    """Results of ``reads`` on ``reader``, feeding it ``chunks`` one by one whenever it waits."""
    pending = deque(chunks)
    results: list[object] = []
    for operation, n in reads:
        generator: Generator[None, None, bytes | bytearray] = (
            reader.read_exact(n) if operation == "exact" else reader.read_line(n)
        )
        while True:
            try:
                next(generator)
            except StopIteration as done:
                results.append(bytes(done.value))
                break
            except (EOFError, RuntimeError) as error:
                results.append(f"{type(error).__name__}: {error}")
                break
            if pending:
                reader.feed_data(pending.popleft())
            elif not reader.eof:
                reader.feed_eof()
    return results


def _split(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    start = 0
    for point in [*points, len(data)]:
        if point > start:
            yield data[start:point]
            start = point


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=300).map(lambda b: b.replace(b"\x00", b"\n")),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    reads=st.lists(st.tuples(st.sampled_from(["exact", "line"]), st.integers(0, 120)), max_size=12),
)
def test_chunk_reader_reads_like_the_stock_reader(
    data: bytes, cuts: list[int], reads: list[tuple[str, int]]
) -> None:
    """_ChunkReader returns the same bytes and errors as websockets' StreamReader for any chunking."""
    chunks = list(_split(data, cuts))
    assert _drive(_ChunkReader(), chunks, reads) == _drive(StreamReader(), chunks, reads)


@pytest.mark.parametrize("size", [0, 5, 125, 126, 65535, 65536, 300_000])
def test_frames_written_unjoined_are_the_bytes_websockets_would_write(size: int) -> None:
    """Header + payload written separately equal websockets' own serialization (masked: after unmasking)."""
    data = memoryview(bytes(range(256)) * (size // 256 + 1))[:size]
    frame = WsFrame(Opcode.CONT, data, fin=False)
    header, payload = _frame_parts(frame, mask=False)
    assert header + payload == frame.serialize(mask=False)
    header, payload = _frame_parts(frame, mask=True)
    reference = frame.serialize(mask=True)
    assert header[:-4] == reference[: len(header) - 4]  # same opcode, flags and length
    assert apply_mask(payload, header[-4:]) == bytes(data)
