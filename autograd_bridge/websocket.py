"""The WebSocket implementation of :class:`~autograd_bridge.transport.Connection`.

Built on the ``websockets`` library (its asyncio API): it does the HTTP upgrade, TLS, the
framing, pings and the closing handshake. This module adds what frames of tensors need:

* A message travels as a fragmented WebSocket message (``fragment_bytes`` per fragment), so the
  receiver copies fragment ``i`` while the sender is still writing fragment ``i + 1``. The first
  fragment starts with the message's total length (8 bytes, little-endian), which lets the
  receiver check it against ``max_message_bytes`` and allocate the whole ``bytearray`` once,
  before any payload arrives. A peer whose fragments disagree with its declared length is
  refused: the connection is closed with a close code and a reason saying what was wrong.
* Limits on what a server receives. One message: ``max_message_bytes`` (larger is refused from
  its declared length, close code 1009). All messages being received at once: a server's
  connections share one :class:`~autograd_bridge.receive_budget.ReceiveBudget` of
  ``receive_budget_bytes`` (default 4 GiB) and ``receive_budget_per_peer_bytes`` per client IP
  address (default ``max_message_bytes``). A message's bytes are reserved there before its buffer
  is allocated and given back when ``recv`` returns it or fails, so many peers announcing large
  messages and trickling bytes cannot make the server commit more than the budget. A message
  that finds no room waits (the connection stops reading, so TCP holds the sender back) up to
  ``receive_budget_wait_s``, then is refused with close code 1013 (try again later); one larger
  than the per-peer share is refused at once with 1009. Waiters are served in order, but one that
  waits for its own peer's share holds up only that peer (see receive_budget.py). Not counted:
  the fragments websockets queues per connection before the message is read (at most
  ``max_queue`` frames; a hostile peer may send frames far larger than ``fragment_bytes``, up to
  ``max_message_bytes``, though only as fast as it really sends the bytes). A client's
  connections (:func:`connect_websocket`) have no budget: they receive from a server they chose.
* A peer that drops in the middle of a message gets its buffer freed at once (no reference to it
  outlives the failed ``recv``, so it does not wait for Python's cycle collector) and its
  reservation given back.
* permessage-deflate is off: tensor bytes do not compress, and deflate runs at ~30 MB/s.
* Failures surface as the bridge's exceptions: a lost peer (killed, reset, closed) makes pending
  and later ``send``/``recv`` raise :class:`~autograd_bridge.errors.PeerLostError`, a handshake
  that does not finish in time raises :class:`~autograd_bridge.errors.BridgeTimeoutError`.
* Optional bearer-token authentication: the client sends ``Authorization: Bearer <token>`` and
  the server's ``authenticate`` callback decides; a refused client gets HTTP 401 (no token) or
  403 (wrong token) during the handshake, and :func:`connect_websocket` raises PeerLostError.

Speed: memory bandwidth, not the network, limits loopback and LAN transfers of large frames, so
the receive path avoids passes over the bytes: :class:`_ChunkReader` replaces websockets' stream
reader (which copies every byte twice) and message buffers are not zero-filled before being
overwritten. What remains per 16 MiB message is websockets' own work (serializing each fragment,
the client's masking and the server's unmasking required by RFC 6455), one copy into the message
buffer and the kernel's copies; ``python bench/wire.py`` measures it against a raw TCP socket.

Fast path and public path: the speed-ups above (:class:`_ChunkReader`, frames written as header
and payload, unfilled buffers) reach into private parts of websockets, which may change in any
release. They make up the *fast path*, used only when the installed websockets' major version is
in :data:`TESTED_WEBSOCKETS_MAJORS` and the private attributes they touch exist. Otherwise (one
warning is logged), or when ``WebSocketSettings(fast_path=False)`` or the environment variable
``TITANIC_WS_PUBLIC_PATH=1`` asks for it, connections take the *public path*: only websockets'
documented API, with its own reader and frame writer and zero-filled buffers. Callers see the same
behaviour on both (limits, errors, close codes, tokens, TLS); the public path copies more.

Event loop: everything works on asyncio's default loop; :func:`new_event_loop` returns uvloop's
loop when the optional ``fast`` extra is installed (with the default ``write_limit`` the two
measured alike on 16 MiB frames).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import http
import logging
import os
import secrets
import ssl as ssl_lib
import struct
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.connection import Connection as _WsConnection
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.client import ClientProtocol
from websockets.datastructures import Headers
from websockets.exceptions import (
    ConcurrencyError,
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
)
from websockets.frames import CloseCode, apply_mask
from websockets.frames import Frame as WsFrame
from websockets.http11 import Request, Response
from websockets.protocol import Protocol, Side, State
from websockets.server import ServerProtocol
from websockets.streams import StreamReader

from .errors import BridgeTimeoutError, FrameError, FrameTooLargeError, PeerLostError, ReceiveBudgetError
from .receive_budget import ReceiveBudget, check_budget
from .transport import DEFAULT_MAX_MESSAGE_BYTES, byte_view

__all__ = [
    "PUBLIC_PATH_ENV",
    "TESTED_WEBSOCKETS_MAJORS",
    "WebSocketConnection",
    "WebSocketServer",
    "WebSocketSettings",
    "connect_websocket",
    "new_event_loop",
    "serve_websocket",
]

_log = logging.getLogger(__name__)

_LENGTH = struct.Struct("<Q")  # total message length, at the start of the first fragment
_COALESCE_BYTES = 16 << 10  # parts smaller than this are copied into one fragment, not sent alone
_MAX_CLOSE_REASON = 120  # a close frame's reason is at most 123 UTF-8 bytes

# Major versions of websockets whose private parts the fast path was tested with: the transport's
# tests (test_transport.py, test_websocket*.py) passed on 15.0.1, 16.1.1 and 17.4. Keep in step
# with the bound in pyproject.toml.
TESTED_WEBSOCKETS_MAJORS: tuple[int, ...] = (15, 16, 17)
# Set to 1 to make every connection of this process take the public path (0 or unset: don't).
PUBLIC_PATH_ENV = "TITANIC_WS_PUBLIC_PATH"


@dataclass(frozen=True, slots=True, kw_only=True)
class WebSocketSettings:
    """How a WebSocket connection is set up; both ends should use the same values."""

    # Largest message accepted or sent, in bytes. A peer declaring more is refused before
    # anything is allocated. Keep it >= FrameLimits.max_frame_bytes of the frames carried.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Bytes per WebSocket fragment. Small enough that sender and receiver work overlap,
    # large enough that per-fragment overhead (tens of microseconds each) stays negligible;
    # 64 KiB cost ~30% more CPU than 256 KiB, 1 MiB no less (bench/wire.py, 16 MiB frames).
    fragment_bytes: int = 256 << 10
    # Bytes the sender may queue in user space beyond what the kernel accepted before send()
    # waits. Larger is not faster: at 16 MiB asyncio's write buffer page-faulted on every
    # message and doubled the CPU per byte; 256 KiB to 4 MiB measured alike.
    write_limit: int = 1 << 20
    # Fragments the receiver may hold unread before it stops reading from the socket
    # (64 x 256 KiB = 16 MiB).
    max_queue: int = 64
    # Seconds for TCP connect, TLS and the HTTP upgrade; None waits forever.
    open_timeout: float | None = 10.0
    # Seconds to wait for the peer's half of the closing handshake before dropping the socket.
    close_timeout: float | None = 5.0
    # Seconds between keepalive pings; None disables them (and with them ping_timeout).
    ping_interval: float | None = 20.0
    # Seconds a ping may go unanswered before the peer counts as lost; None waits forever.
    ping_timeout: float | None = 20.0
    # Take the fast path (websockets' private parts patched for fewer copies) where the installed
    # websockets allows it; False takes the public path (documented API only, slower), like
    # TITANIC_WS_PUBLIC_PATH=1 does for the whole process. The two ends may differ.
    fast_path: bool = True
    # Server side (see autograd_bridge/receive_budget.py): bytes the buffers of messages being
    # received may hold at once, over all the connections of one server. Like the stage host's
    # max_state_bytes; a message that finds no room waits, then is refused (close code 1013).
    receive_budget_bytes: int = 4 << 30
    # ... and per peer (one remote IP address, however many connections it opens). None means
    # max_message_bytes, so that every message the limit allows can fit; a message larger than
    # this is refused at once (close code 1009).
    receive_budget_per_peer_bytes: int | None = None
    # Seconds a message may wait for room in the budget before it is refused. Keep it below
    # ping_timeout: while it waits the server stops reading that socket, the peer's pings too.
    receive_budget_wait_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_message_bytes < 0:
            raise ValueError(f"max_message_bytes must be >= 0, got {self.max_message_bytes}")
        if self.fragment_bytes < 1024:
            raise ValueError(f"fragment_bytes must be at least 1024, got {self.fragment_bytes}")
        if self.write_limit < 1 or self.max_queue < 1:
            raise ValueError(
                f"write_limit and max_queue must be positive, got {self.write_limit} and {self.max_queue}"
            )
        for name in ("open_timeout", "close_timeout", "ping_interval", "ping_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value}")
        try:
            check_budget(
                total_bytes=self.receive_budget_bytes,
                per_peer_bytes=self.receive_budget_per_peer,
                wait_s=self.receive_budget_wait_s,
            )
        except ValueError as error:
            raise ValueError(
                f"{error} (receive_budget_bytes={self.receive_budget_bytes}, receive_budget_per_peer_bytes="
                f"{self.receive_budget_per_peer_bytes} (None: max_message_bytes={self.max_message_bytes}), "
                f"receive_budget_wait_s={self.receive_budget_wait_s})"
            ) from None

    @property
    def receive_budget_per_peer(self) -> int:
        """Bytes one peer's messages being received may hold at a server (its per-peer share)."""
        if self.receive_budget_per_peer_bytes is not None:
            return self.receive_budget_per_peer_bytes
        return max(self.max_message_bytes, 1)

    def receive_budget(self) -> ReceiveBudget:
        """A new, empty budget of these sizes (a server shares one between its connections)."""
        return ReceiveBudget(
            total_bytes=self.receive_budget_bytes,
            per_peer_bytes=self.receive_budget_per_peer,
            wait_s=self.receive_budget_wait_s,
        )

    def _library_options(self) -> dict[str, Any]:
        """Keyword arguments common to websockets' ``connect`` and ``serve``."""
        return {
            "compression": None,
            # The length prefix rides in the message, so the library's limit is 8 bytes higher.
            "max_size": self.max_message_bytes + _LENGTH.size,
            "max_queue": self.max_queue,
            "write_limit": self.write_limit,
            "open_timeout": self.open_timeout,
            "close_timeout": self.close_timeout,
            "ping_interval": self.ping_interval,
            "ping_timeout": self.ping_timeout,
        }


class WebSocketConnection:
    """A :class:`~autograd_bridge.transport.Connection` over one WebSocket."""

    def __init__(
        self,
        ws: _WsConnection,
        *,
        peer: str,
        settings: WebSocketSettings,
        allocate: Callable[[int], bytearray] = bytearray,
        budget: ReceiveBudget | None = None,
        budget_key: str = "",
    ) -> None:
        """Wrap ``ws``; ``allocate(n)`` makes each received message's buffer (all n bytes get written).

        With ``budget``, each received message's bytes are reserved there under ``budget_key``
        (the peer's address) before its buffer is allocated, and released when recv() returns
        or fails.
        """
        self.peer = peer
        self._ws = ws
        self._settings = settings
        self._allocate = allocate
        self._budget = budget
        self._budget_key = budget_key
        self._closed_locally = False
        self._closing: asyncio.Future[None] | None = None  # the close once started, by whichever path

    @property
    def closed(self) -> bool:
        return self._closed_locally or self._ws.state in (State.CLOSING, State.CLOSED)

    # -- send ------------------------------------------------------------------------------

    async def send(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        views = [byte_view(part) for part in parts]
        total = sum(view.nbytes for view in views)
        limit = self._settings.max_message_bytes
        if total > limit:
            raise FrameTooLargeError(
                f"message of {total} bytes exceeds max_message_bytes={limit}; "
                f"split it or raise the limit on both ends"
            )
        if self.closed:
            raise self._lost_error()
        length = _LENGTH.pack(total)
        try:
            if total <= self._settings.fragment_bytes:
                # One frame; joining costs less than a fragment's overhead at this size.
                await self._ws.send(b"".join([length, *views]))
            else:
                await self._send_fragments(length, views)
        except ConnectionClosed as error:
            raise self._lost_error() from error

    async def _send_fragments(self, length: bytes, views: list[memoryview]) -> None:
        handed_out = 0  # fragments given to websockets, which writes each before asking for more

        def fragments() -> Iterator[bytes | bytearray | memoryview]:
            nonlocal handed_out
            for fragment in _fragments(length, views, self._settings.fragment_bytes):
                handed_out += 1
                yield fragment

        try:
            await self._ws.send(fragments())
        except asyncio.CancelledError:
            # websockets cannot finish a fragmented message it was cancelled in the middle of;
            # the peer would read the next message as garbage. Drop the connection instead.
            if handed_out:
                self._close_soon(CloseCode.INTERNAL_ERROR, "sender gave up in the middle of a message")
            raise

    # -- recv ------------------------------------------------------------------------------

    async def recv(self) -> bytearray:
        if self._closed_locally:
            raise self._lost_error()
        stream = self._ws.recv_streaming(decode=False)
        try:
            first = await anext(stream)
        except ConnectionClosed as error:
            raise self._lost_error() from error
        # From here on the message must be read to its end, or the connection dropped:
        # websockets cannot resume a fragmented message half read.
        try:
            return await self._assemble(first, stream)
        except ConnectionClosed as error:
            raise self._lost_error() from error
        except FrameError:
            raise  # the connection was closed with the reason already
        except BaseException:
            # Cancelled (or worse) mid-message: the stream cannot be resumed.
            self._close_soon(CloseCode.INTERNAL_ERROR, "receiver gave up in the middle of a message")
            raise

    async def _assemble(self, first: bytes, stream: AsyncIterator[bytes]) -> bytearray:
        """The message whose first fragment is ``first``, the rest coming from ``stream``."""
        if len(first) < _LENGTH.size:
            raise await self._refuse(
                stream,
                FrameError,
                CloseCode.PROTOCOL_ERROR,
                f"message starts with {len(first)} bytes, not the {_LENGTH.size}-byte length",
            )
        (total,) = _LENGTH.unpack_from(first)
        limit = self._settings.max_message_bytes
        if total > limit:
            raise await self._refuse(
                stream,
                FrameTooLargeError,
                CloseCode.MESSAGE_TOO_BIG,
                f"message of {total} bytes exceeds max_message_bytes={limit}",
            )
        budget = self._budget
        if budget is None:
            return await self._fill(first, stream, total)
        await self._reserve(budget, total, stream)
        try:
            return await self._fill(first, stream, total)
        finally:
            budget.release(self._budget_key, total)

    async def _reserve(self, budget: ReceiveBudget, total: int, stream: AsyncIterator[bytes]) -> None:
        """Reserve ``total`` bytes in ``budget``, waiting for room; refuse the message if none comes.

        While this waits nothing reads the message's fragments, so websockets stops reading the
        socket once its queue is full and TCP holds the sender back.
        """
        if budget.try_reserve(self._budget_key, total):
            return
        never_fits = total > budget.per_peer_bytes
        try:
            await budget.reserve(self._budget_key, total)
        except ReceiveBudgetError as error:
            code = CloseCode.MESSAGE_TOO_BIG if never_fits else CloseCode.TRY_AGAIN_LATER
            raise await self._refuse(stream, ReceiveBudgetError, code, str(error)) from None

    async def _fill(self, first: bytes, stream: AsyncIterator[bytes], total: int) -> bytearray:
        """Allocate the ``total``-byte message and copy ``first``'s payload and the rest of ``stream`` in."""
        message = self._allocate(total)
        try:
            with memoryview(message) as view:
                position = len(first) - _LENGTH.size
                if position > total:
                    raise await self._refuse(stream, FrameError, CloseCode.PROTOCOL_ERROR, _overrun(total))
                view[:position] = memoryview(first)[_LENGTH.size :]
                async for fragment in stream:
                    end = position + len(fragment)
                    if end > total:
                        raise await self._refuse(stream, FrameError, CloseCode.PROTOCOL_ERROR, _overrun(total))
                    view[position:end] = fragment
                    position = end
        except BaseException:
            # This frame lives on in the error's traceback. A caller that keeps the error (as
            # StageClient keeps the one that ended its connection) puts it in a reference cycle
            # that only the cycle collector frees, maybe much later: let go of the buffer now.
            # (tests/autograd_bridge/test_receive_budget.py fails without this line.)
            del message
            raise
        if position != total:
            raise await self._refuse(
                None,
                FrameError,
                CloseCode.PROTOCOL_ERROR,
                f"message ended after {position} of its declared {total} bytes",
            )
        return message

    async def _refuse(
        self, stream: AsyncIterator[bytes] | None, kind: type[FrameError], code: CloseCode, reason: str
    ) -> FrameError:
        """Close the connection because of ``reason``; return the error for the local caller."""
        _log.warning("closing WebSocket to %s: %s", self.peer, reason)
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._ws.close(code, reason[:_MAX_CLOSE_REASON]))
        # Read and drop the rest of the bad message, then whatever follows until the peer
        # answers the close (see _drain).
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            async with asyncio.timeout(self._settings.close_timeout):
                if stream is not None:
                    async for _ in stream:
                        pass
                await self._drain()
        await self._closing
        if issubclass(kind, ReceiveBudgetError):
            return kind(f"refused a message from {self.peer} ({reason}); the connection was closed")
        return kind(f"{self.peer} sent a bad message ({reason}); the connection was closed")

    async def _drain(self) -> None:
        """Read and drop messages until the connection closes (raises ConnectionClosed).

        With unread fragments queued, websockets stops reading from the socket, so the peer's
        answer to our close frame would never be seen and closing could only time out.
        """
        while True:
            async for _ in self._ws.recv_streaming(decode=False):
                pass

    # -- close -----------------------------------------------------------------------------

    async def close(self) -> None:
        self._closed_locally = True
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._ws.close())
            # ConcurrencyError: a recv() is running; it reads the close itself.
            with contextlib.suppress(ConnectionClosed, ConcurrencyError, TimeoutError):
                async with asyncio.timeout(self._settings.close_timeout):
                    await self._drain()
        await self._closing

    def _close_soon(self, code: CloseCode, reason: str) -> None:
        """Start closing from a path that cannot wait (cancellation); keeps the task alive."""
        self._closed_locally = True
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._ws.close(code, reason))

    def _lost_error(self) -> PeerLostError:
        if self._closed_locally:
            return PeerLostError(f"WebSocket to {self.peer} was closed locally")
        code, reason = self._ws.close_code, self._ws.close_reason
        detail = f"close code {code}" + (f", reason {reason!r}" if reason else "")
        if code is None or code == CloseCode.ABNORMAL_CLOSURE:
            detail = "connection dropped without a closing handshake (peer crashed or network failed)"
        return PeerLostError(f"WebSocket to {self.peer} is closed: {detail}")

    def __repr__(self) -> str:
        return f"<WebSocketConnection to {self.peer} {self._ws.state.name}>"


def _bytearray_allocator() -> Callable[[int], bytearray]:
    """How to allocate a message buffer without zero-filling it first.

    Every byte of a message buffer is overwritten before it is handed out, so zero-filling it
    (as ``bytearray(n)`` does) is a wasted pass over memory, ~15% of the receiver's time on
    16 MiB messages. CPython's ``PyByteArray_FromStringAndSize(NULL, n)`` leaves the bytes
    as malloc returned them; elsewhere fall back to ``bytearray``.
    """
    if sys.implementation.name != "cpython":
        return bytearray
    from_string_and_size = ctypes.pythonapi.PyByteArray_FromStringAndSize
    from_string_and_size.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    from_string_and_size.restype = ctypes.py_object  # a new reference, which ctypes hands over

    def allocate(size: int) -> bytearray:
        message: bytearray = from_string_and_size(None, size)
        return message

    return allocate


_unfilled_bytearray = _bytearray_allocator()


def _overrun(total: int) -> str:
    return f"message runs past its declared length of {total} bytes"


def _fragments(
    length: bytes, views: Sequence[memoryview], fragment_bytes: int
) -> Iterator[bytes | bytearray | memoryview]:
    """The fragments of one message: ``length`` then the bytes of ``views``.

    Large parts go out as views of the caller's memory, ``fragment_bytes`` at a time; small
    ones (a frame's header) are copied together so they do not each cost a fragment.
    """
    pending = bytearray(length)
    for view in views:
        size = view.nbytes
        if size < _COALESCE_BYTES and len(pending) + size <= fragment_bytes:
            pending += view
            continue
        if pending:
            yield pending
            pending = bytearray()
        for start in range(0, size, fragment_bytes):
            yield view[start : start + fragment_bytes]
    if pending:
        yield pending


# -- receiving with fewer copies -------------------------------------------------------------


class _ChunkReader(StreamReader):
    """websockets' stream reader, keeping received chunks instead of appending them to a buffer.

    The stock reader copies every received byte twice, into its buffer and out again for each
    frame; this one copies it once, when a read needs bytes from more than one chunk (a read
    inside one chunk slices it, also one copy). That halves the receiver's memory traffic,
    which is what limits throughput on large tensors. Same generator-based interface, same
    errors.
    """

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.offset = 0  # bytes of chunks[0] already read
        self.size = 0  # bytes received and not read yet
        self.eof = False

    def feed_data(self, data: bytes | bytearray) -> None:
        if self.eof:
            raise EOFError("stream ended")
        if data:
            # Transports hand over fresh bytes; anything mutable is copied to stay ours.
            self.chunks.append(data if type(data) is bytes else bytes(data))
            self.size += len(data)

    def feed_eof(self) -> None:
        if self.eof:
            raise EOFError("stream ended")
        self.eof = True

    def discard(self) -> None:
        self.chunks.clear()
        self.offset = self.size = 0

    def read_exact(self, n: int) -> Generator[None, None, bytes]:  # type: ignore[override]
        while self.size < n:
            if self.eof:
                raise EOFError(f"stream ends after {self.size} bytes, expected {n} bytes")
            yield
        return self._take(n)

    def read_line(  # type: ignore[override]
        self, m: int, too_long_exc_type: type[Exception] = RuntimeError
    ) -> Generator[None, None, bytes]:
        while True:
            n = self._line_length()
            if n > 0:
                break
            if self.size > m:
                raise too_long_exc_type(f"read {self.size} bytes, expected no more than {m} bytes")
            if self.eof:
                raise EOFError(f"stream ends after {self.size} bytes, before end of line")
            yield
        if n > m:
            raise too_long_exc_type(f"read {n} bytes, expected no more than {m} bytes")
        return self._take(n)

    def read_to_eof(  # type: ignore[override]
        self, m: int, too_long_exc_type: type[Exception] = RuntimeError
    ) -> Generator[None, None, bytes]:
        while not self.eof:
            if self.size > m:
                raise too_long_exc_type(f"read {self.size} bytes, expected no more than {m} bytes")
            yield
        return self._take(self.size)

    def at_eof(self) -> Generator[None, None, bool]:
        while True:
            if self.size:
                return False
            if self.eof:
                return True
            yield

    def _line_length(self) -> int:
        """Bytes up to and including the first LF, or 0 if none was received yet."""
        scanned = 0
        start = self.offset
        for chunk in self.chunks:
            index = chunk.find(b"\n", start)
            if index >= 0:
                return scanned + index - start + 1
            scanned += len(chunk) - start
            start = 0
        return 0

    def _take(self, n: int) -> bytes:
        """Remove and return the next ``n`` bytes (``n <= self.size``)."""
        if n == 0:
            return b""
        self.size -= n
        first = self.chunks[0]
        start = self.offset
        if len(first) - start >= n:
            end = start + n
            if end == len(first):
                self.chunks.popleft()
                self.offset = 0
                if start == 0:
                    return first  # the whole chunk: no copy at all
            else:
                self.offset = end
            return first[start:end]
        pieces: list[bytes | memoryview] = []
        missing = n
        while missing:
            chunk = self.chunks[0]
            available = len(chunk) - self.offset
            if missing >= available:
                pieces.append(memoryview(chunk)[self.offset :] if self.offset else chunk)
                self.chunks.popleft()
                self.offset = 0
                missing -= available
            else:
                pieces.append(memoryview(chunk)[self.offset : self.offset + missing])
                self.offset += missing
                missing = 0
        return b"".join(pieces)


def _use_chunk_reader(protocol: Protocol) -> None:
    """Give a websockets protocol that has not received anything yet a :class:`_ChunkReader`.

    The protocol's parser is a generator bound to its reader, so it is restarted too (exactly
    as the protocol's constructor started it).
    """
    if type(protocol.reader) is StreamReader and not protocol.reader.buffer:
        protocol.reader = _ChunkReader()
        protocol.parser = protocol.parse()
        next(protocol.parser)


def _frame_parts(frame: WsFrame, *, mask: bool) -> tuple[bytes, bytes]:
    """A frame as (header, payload): the wire bytes websockets' ``Frame.serialize`` joins.

    ``serialize`` writes header and payload into a BytesIO: one more copy of every tensor
    byte than handing the two to the transport one after the other.
    """
    frame.check()
    head1 = (0b10000000 if frame.fin else 0) | frame.opcode  # rsv bits are 0: no extensions
    head2 = 0b10000000 if mask else 0
    length = len(frame.data)
    if length < 126:
        header = struct.pack("!BB", head1, head2 | length)
    elif length < 65536:
        header = struct.pack("!BBH", head1, head2 | 126, length)
    else:
        header = struct.pack("!BBQ", head1, head2 | 127, length)
    if mask:
        key = secrets.token_bytes(4)
        return header + key, apply_mask(frame.data, key)
    # An unmasked payload may be a view of the sender's memory, and a transport (uvloop) may
    # hold on to what it cannot write at once: hand it a copy the sender cannot change.
    return header, bytes(frame.data)


def _write_frames_unjoined(protocol: Protocol) -> None:
    """Make ``protocol`` queue each frame as header + payload (see :func:`_frame_parts`)."""
    if protocol.extensions:
        return  # compression=None everywhere here; with extensions keep websockets' own path
    mask = protocol.side is Side.CLIENT

    def send_frame(frame: WsFrame) -> None:
        header, payload = _frame_parts(frame, mask=mask)
        protocol.writes.append(header)
        if payload:  # an empty write means end-of-stream to websockets' connection
            protocol.writes.append(payload)

    protocol.send_frame = send_frame  # type: ignore[method-assign]


class _ClientConnection(ClientConnection):
    """websockets' client connection: receives through a :class:`_ChunkReader`, writes unjoined."""

    def __init__(self, protocol: ClientProtocol, **kwargs: Any) -> None:
        _use_chunk_reader(protocol)
        _write_frames_unjoined(protocol)
        super().__init__(protocol, **kwargs)


class _ServerConnection(ServerConnection):
    """websockets' server connection: receives through a :class:`_ChunkReader`, writes unjoined."""

    def __init__(self, protocol: ServerProtocol, *args: Any, **kwargs: Any) -> None:
        _use_chunk_reader(protocol)
        _write_frames_unjoined(protocol)
        super().__init__(protocol, *args, **kwargs)


# -- the switch between the fast and the public path ----------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Path:
    """What differs between the fast path and the public path (see the module docstring)."""

    client_connection: type[ClientConnection]  # given to websockets' connect as create_connection
    server_connection: type[ServerConnection]  # given to websockets' serve as create_connection
    allocate: Callable[[int], bytearray]  # a received message's buffer, before it is written


_FAST_PATH = _Path(
    client_connection=_ClientConnection, server_connection=_ServerConnection, allocate=_unfilled_bytearray
)
_PUBLIC_PATH = _Path(
    client_connection=ClientConnection, server_connection=ServerConnection, allocate=bytearray
)

# The private attributes of a websockets Sans-I/O protocol that _use_chunk_reader and
# _write_frames_unjoined read or replace.
_PROTOCOL_INTERNALS = ("reader", "parser", "parse", "writes", "send_frame", "extensions", "side")


def _path_for(settings: WebSocketSettings) -> _Path:
    """The path that connections made with ``settings`` take, in this process and now."""
    if not settings.fast_path or _public_path_forced():
        return _PUBLIC_PATH
    return _PUBLIC_PATH if _fast_path_problem() else _FAST_PATH


def _public_path_forced() -> bool:
    """Whether the environment variable TITANIC_WS_PUBLIC_PATH asks for the public path."""
    value = os.environ.get(PUBLIC_PATH_ENV, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{PUBLIC_PATH_ENV} must be 1 (public path) or 0, got {value!r}; fix or unset it")
    return value == "1"


@functools.cache
def _fast_path_problem() -> str | None:
    """Why the installed websockets cannot take the fast path, or None; warns the first time."""
    problem = _find_fast_path_problem()
    if problem is not None:
        _log.warning("WebSocket connections use websockets' public API only, which is slower: %s", problem)
    return problem


def _find_fast_path_problem() -> str | None:
    """What keeps the fast path from working on the installed websockets, or None."""
    version = websockets.__version__
    major = version.partition(".")[0]
    if not major.isdigit() or int(major) not in TESTED_WEBSOCKETS_MAJORS:
        tested = ", ".join(f"{tested}.x" for tested in TESTED_WEBSOCKETS_MAJORS)
        return (
            f"the fast path was tested with websockets {tested}, not {version}; "
            f"install a tested version for full speed"
        )
    probe = ServerProtocol()
    missing = [name for name in _PROTOCOL_INTERNALS if not hasattr(probe, name)]
    if missing:
        return f"websockets {version} has no protocol attributes {', '.join(missing)}"
    if type(probe.reader) is not StreamReader or not hasattr(probe.reader, "buffer"):
        return f"websockets {version} reads frames with {type(probe.reader).__name__}, not StreamReader"
    # A reader method _ChunkReader does not replace would look for a buffer it lacks.
    unreplaced = [
        name for name in vars(StreamReader) if not name.startswith("_") and name not in vars(_ChunkReader)
    ]
    if unreplaced:
        return f"websockets {version}'s StreamReader has methods _ChunkReader lacks: {', '.join(unreplaced)}"
    return None


# -- server ----------------------------------------------------------------------------------


class WebSocketServer:
    """A listening WebSocket server; ``await close()`` (or ``async with``) stops it."""

    def __init__(self, server: Server, *, host: str, tls: bool, receive_budget: ReceiveBudget) -> None:
        self._server = server
        self.host = host
        # Shared by every connection this server accepts (see WebSocketSettings.receive_budget_bytes).
        self.receive_budget = receive_budget
        # With port 0 every listening socket gets its own port; callers use the first.
        self.port: int = server.sockets[0].getsockname()[1]
        scheme = "wss" if tls else "ws"
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{scheme}://{shown}:{self.port}"

    async def close(self) -> None:
        """Stop listening and close every open connection (idempotent)."""
        self._server.close(close_connections=True)
        await self._server.wait_closed()

    async def __aenter__(self) -> WebSocketServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<WebSocketServer {self.url}>"


async def serve_websocket(
    handler: Callable[[WebSocketConnection], Awaitable[None]],
    host: str,
    port: int,
    *,
    ssl: ssl_lib.SSLContext | None = None,
    settings: WebSocketSettings = WebSocketSettings(),
    authenticate: Callable[[str | None], bool] | None = None,
) -> WebSocketServer:
    """Listen on ``host:port`` (0 picks a free port) and run ``handler`` for every connection.

    The connection is closed when ``handler`` returns. With ``ssl`` (a server-side context with
    a certificate) the server speaks wss://. ``authenticate`` receives the client's bearer token
    (None when it sent none) and returns whether to accept it. The buffers of messages being
    received are bounded over all connections and per client IP address by one
    :class:`~autograd_bridge.receive_budget.ReceiveBudget` (the server's ``receive_budget``),
    sized by ``settings.receive_budget_*``.
    """

    path = _path_for(settings)
    budget = settings.receive_budget()

    async def run(ws: ServerConnection) -> None:
        conn = WebSocketConnection(
            ws,
            peer=_remote_name(ws),
            settings=settings,
            allocate=path.allocate,
            budget=budget,
            budget_key=_remote_host(ws),
        )
        try:
            await handler(conn)
        except PeerLostError as error:
            # A client going away is not an error of the server.
            _log.info("%s", error)
        # Any other exception propagates: websockets logs it and closes with code 1011.
        await conn.close()

    process_request = None if authenticate is None else _token_checker(authenticate)
    server = await serve(
        run,
        host,
        port,
        ssl=ssl,
        process_request=process_request,
        server_header=None,
        create_connection=path.server_connection,
        **settings._library_options(),
    )
    return WebSocketServer(server, host=host, tls=ssl is not None, receive_budget=budget)


def _token_checker(
    authenticate: Callable[[str | None], bool],
) -> Callable[[ServerConnection, Request], Response | None]:
    """A websockets ``process_request`` hook that lets in only tokens ``authenticate`` accepts."""

    def check(connection: ServerConnection, request: Request) -> Response | None:
        token = _bearer_token(request.headers)
        if authenticate(token):
            return None
        if token is None:
            response = connection.respond(
                http.HTTPStatus.UNAUTHORIZED, "This server needs 'Authorization: Bearer <token>'.\n"
            )
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return connection.respond(http.HTTPStatus.FORBIDDEN, "The bearer token was not accepted.\n")

    return check


def _bearer_token(headers: Headers) -> str | None:
    value = headers.get("Authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _remote_host(ws: ServerConnection) -> str:
    """The client's IP address: a peer's key in the receive budget, whatever port it comes from."""
    address = ws.remote_address
    if isinstance(address, tuple) and address:
        return str(address[0])
    return str(address)


def _remote_name(ws: ServerConnection) -> str:
    address = ws.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


# -- client ----------------------------------------------------------------------------------


async def connect_websocket(
    url: str,
    *,
    ssl: ssl_lib.SSLContext | None = None,
    settings: WebSocketSettings = WebSocketSettings(),
    token: str | None = None,
) -> WebSocketConnection:
    """Open a connection to the server at ``url`` (ws:// or wss://).

    For wss:// pass an ``ssl`` context that trusts the server's certificate (default: the
    system's CAs). ``token`` is sent as ``Authorization: Bearer <token>``. Raises PeerLostError
    when the server cannot be reached, refuses the token or fails TLS verification, and
    BridgeTimeoutError when the handshake takes longer than ``settings.open_timeout``.
    """
    if not url.startswith(("ws://", "wss://")):
        raise ValueError(f"url must start with ws:// or wss://, got {url!r}")
    if ssl is not None and url.startswith("ws://"):
        raise ValueError(f"an ssl context needs a wss:// url, got {url!r}; change the scheme")
    headers: dict[str, str] = {}
    if token is not None:
        if not token or any(ch.isspace() or not ch.isprintable() for ch in token):
            raise ValueError("token must be a non-empty string without spaces or control characters")
        headers["Authorization"] = f"Bearer {token}"
    path = _path_for(settings)
    # For wss:// without a context, websockets verifies against the system's CAs.
    tls: dict[str, Any] = {} if ssl is None else {"ssl": ssl}
    try:
        ws: ClientConnection = await connect(
            url,
            additional_headers=headers,
            user_agent_header=None,
            proxy=None,  # loopback and LAN peers; never route through a proxy from the environment
            create_connection=path.client_connection,
            **tls,
            **settings._library_options(),
        )
    except InvalidURI as error:
        raise ValueError(f"{url!r} is not a valid WebSocket url: {error}") from error
    except InvalidStatus as error:
        raise PeerLostError(_refusal_message(url, error.response)) from error
    except ssl_lib.SSLCertVerificationError as error:
        raise PeerLostError(
            f"TLS certificate of {url} was not accepted ({error.verify_message}); pass ssl= a "
            f"context that trusts the CA that signed the server's certificate"
        ) from error
    except TimeoutError as error:
        raise BridgeTimeoutError(
            f"no WebSocket handshake with {url} within open_timeout={settings.open_timeout}s"
        ) from error
    except (OSError, InvalidHandshake) as error:
        raise PeerLostError(f"could not open a WebSocket to {url}: {error}") from error
    return WebSocketConnection(ws, peer=url, settings=settings, allocate=path.allocate)


def _refusal_message(url: str, response: Response) -> str:
    status = response.status_code
    if status == http.HTTPStatus.UNAUTHORIZED:
        return f"{url} refused the connection (HTTP 401): it needs a token; pass token="
    if status == http.HTTPStatus.FORBIDDEN:
        return f"{url} refused the connection (HTTP 403): the token was not accepted; check it"
    return f"{url} refused the WebSocket upgrade with HTTP {status}"


# -- event loop ------------------------------------------------------------------------------


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's when installed (the ``fast`` extra), else asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
