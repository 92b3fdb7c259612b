"""The channel the bridge sends frames over, and its in-memory implementation.

The bridge talks to its peers only through :class:`Connection`: an ordered, reliable,
message-oriented duplex channel. A message is handed over as a sequence of parts (so a frame's
header and its tensors' own memory can be sent without first being joined) and arrives whole, as
one writable ``bytearray`` that the receiver owns and may decode tensors from in place.

Every implementation keeps the same promises, checked by one shared test suite:

* messages arrive complete, unchanged and in the order they were sent;
* once :meth:`Connection.send` returns, the sender may reuse the memory of the parts;
* a message larger than the configured maximum raises
  :class:`~autograd_bridge.errors.FrameTooLargeError` on the side that notices it;
* messages the peer sent before it closed are still delivered, after which ``recv()`` raises
  :class:`~autograd_bridge.errors.PeerLostError`, and so do ``send()`` and anything pending;
  none of them ever waits forever on a peer that is gone;
* ``close()`` is idempotent and never raises for a lost peer.

:func:`memory_pipe` connects two endpoints inside one event loop; unit tests use it where a real
socket would add nothing. :mod:`autograd_bridge.websocket` is the implementation between processes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from .errors import FrameTooLargeError, PeerLostError

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "Connection",
    "MemoryConnection",
    "byte_view",
    "memory_pipe",
    "message_nbytes",
]

# Largest message accepted by default: the largest frame that FrameLimits admits by default.
DEFAULT_MAX_MESSAGE_BYTES = 2 << 30


@runtime_checkable
class Connection(Protocol):
    """An ordered, reliable, message-oriented duplex channel to one peer.

    Use it from one event loop. ``send`` and ``recv`` may run concurrently with each other;
    concurrent ``send`` calls are delivered one whole message after another, while two
    concurrent ``recv`` calls are not supported (one reader task per connection).
    """

    peer: str  # who is on the other end, for log and error messages (e.g. "ws://10.0.0.2:8765")

    async def send(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """Send the concatenation of ``parts`` as one message.

        Raises FrameTooLargeError if it exceeds the connection's maximum message size (nothing
        is sent then) and PeerLostError if the connection is closed or lost.
        """
        ...

    async def recv(self) -> bytearray:
        """Wait for the next whole message; raise PeerLostError once the connection is closed."""
        ...

    async def close(self) -> None:
        """Close the connection; idempotent, and safe to call when the peer is already gone."""
        ...

    @property
    def closed(self) -> bool:
        """True once the connection was closed by either side or lost."""
        ...


def message_nbytes(parts: Sequence[bytes | bytearray | memoryview]) -> int:
    """Size in bytes of the message made of ``parts``."""
    return sum(part.nbytes if isinstance(part, memoryview) else len(part) for part in parts)


def byte_view(part: bytes | bytearray | memoryview) -> memoryview:
    """``part`` as a flat memoryview of unsigned bytes (no copy); ValueError if not contiguous."""
    view = memoryview(part)
    if not view.c_contiguous:
        raise ValueError("message parts must be C-contiguous buffers; make a contiguous copy first")
    if view.format == "B" and view.ndim == 1:
        return view
    return view.cast("B")


class _Mailbox:
    """One direction of a memory pipe: a bounded FIFO of messages that can be shut."""

    def __init__(self, max_queue: int) -> None:
        self._messages: deque[bytearray] = deque()
        self._max_queue = max_queue
        self._put_error: str | None = None  # set once nothing more may be put: why, for the sender
        self._get_error: str | None = None  # set with it: why, for the receiver once drained
        self._discard = False  # the reader is gone too: drop what is queued
        # asyncio.Event binds to a loop on first wait, so a pipe can be made outside a loop.
        self._not_empty = asyncio.Event()
        self._not_full = asyncio.Event()

    async def put(self, message: bytearray) -> None:
        while True:
            if self._put_error is not None:
                raise PeerLostError(self._put_error)
            if len(self._messages) < self._max_queue:
                self._messages.append(message)
                self._not_empty.set()
                return
            self._not_full.clear()
            await self._not_full.wait()

    async def get(self) -> bytearray:
        while True:
            if self._messages and not self._discard:
                message = self._messages.popleft()
                self._not_full.set()
                return message
            if self._get_error is not None:
                raise PeerLostError(self._get_error)
            self._not_empty.clear()
            await self._not_empty.wait()

    @property
    def shut_down(self) -> bool:
        """True once nothing more may be put."""
        return self._put_error is not None

    def shut(self, *, put_error: str, get_error: str, discard: bool) -> None:
        """Refuse further puts; with ``discard`` also drop queued messages. Wakes every waiter."""
        if self._put_error is None:
            self._put_error, self._get_error = put_error, get_error
        if discard:
            self._discard = True
            self._messages.clear()
        self._not_empty.set()
        self._not_full.set()


class MemoryConnection:
    """One end of a :func:`memory_pipe`; every message is copied, as a socket would."""

    def __init__(
        self, inbox: _Mailbox, outbox: _Mailbox, *, name: str, peer: str, max_message_bytes: int
    ) -> None:
        self.peer = peer
        self._name = name  # how the peer calls us
        self._inbox = inbox  # the peer puts, we get
        self._outbox = outbox  # we put, the peer gets
        self._max_message_bytes = max_message_bytes
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed or self._outbox.shut_down


    async def send(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        size = message_nbytes(parts)
        if size > self._max_message_bytes:
            raise FrameTooLargeError(
                f"message of {size} bytes exceeds max_message_bytes={self._max_message_bytes}; "
                f"split it or raise the limit on both ends"
            )
        if self._closed:
            raise PeerLostError(f"connection to {self.peer} is closed")
        # The copy decouples the receiver's buffer from the sender's (a socket copies too).
        message = bytearray(size)
        position = 0
        for part in parts:
            view = byte_view(part)
            message[position : position + view.nbytes] = view
            position += view.nbytes
        await self._outbox.put(message)

    async def recv(self) -> bytearray:
        return await self._inbox.get()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        local = f"connection to {self.peer} was closed locally"
        remote = f"{self._name} closed the connection"
        # What we sent stays readable for the peer; what was sent to us is dropped.
        self._outbox.shut(put_error=local, get_error=remote, discard=False)
        self._inbox.shut(put_error=remote, get_error=local, discard=True)

    def __repr__(self) -> str:
        return f"<MemoryConnection to {self.peer}{' closed' if self._closed else ''}>"


def memory_pipe(
    *, max_queue: int = 64, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> tuple[MemoryConnection, MemoryConnection]:
    """Two connected in-memory endpoints for use inside one event loop.

    ``max_queue`` messages may wait unread in each direction before ``send`` waits for the
    reader; messages over ``max_message_bytes`` are refused with FrameTooLargeError.
    """
    if max_queue < 1:
        raise ValueError(f"max_queue must be at least 1, got {max_queue}")
    if max_message_bytes < 0:
        raise ValueError(f"max_message_bytes must be non-negative, got {max_message_bytes}")
    a_to_b, b_to_a = _Mailbox(max_queue), _Mailbox(max_queue)
    a = MemoryConnection(
        b_to_a, a_to_b, name="memory-pipe:a", peer="memory-pipe:b", max_message_bytes=max_message_bytes
    )
    b = MemoryConnection(
        a_to_b, b_to_a, name="memory-pipe:b", peer="memory-pipe:a", max_message_bytes=max_message_bytes
    )
    return a, b
