"""A byte budget for the buffers of messages being received, per peer and in total.

A WebSocket server (:func:`~autograd_bridge.websocket.serve_websocket`) shares one
:class:`ReceiveBudget` between all the connections it accepts. Before a connection allocates the
buffer of an incoming message (whose length the peer declared up front) it reserves that many
bytes; it gives them back when the message has been handed to the caller or has failed (refused,
peer dropped, cancelled). So the bytes a server has committed to half-received messages never pass
``total_bytes``, and no single peer (one remote address, however many connections it opens) holds
more than ``per_peer_bytes`` of them.

Semantics:

* A reservation is granted at once when it fits under both limits and no earlier request that it
  competes with is waiting (see the order below).
* Otherwise it waits, at most ``wait_s`` seconds; the connection does not read from its socket
  meanwhile, so TCP backpressure holds the sender. A request still waiting then is refused with
  :class:`~autograd_bridge.errors.ReceiveBudgetError`.
* A request larger than ``per_peer_bytes`` could never fit; callers refuse it without waiting
  (:meth:`ReceiveBudget.reserve` raises at once).
* Order: waiters are served first come, first served, so a large message is not starved by a
  stream of small ones, with one exception for fairness. A waiter blocked by its own peer's
  limit holds up only that peer's later requests; a waiter blocked by the total holds up every
  later one. So a peer that sits on its whole ``per_peer_bytes`` cannot stop other peers while
  ``total_bytes`` leaves room beyond it.
* A waiting request holds no bytes; one whose peer has gone keeps its place until ``wait_s``
  passes (the message may still be complete in the connection's queue).

Pure asyncio bookkeeping, no I/O: it is tested without sockets, and used from one event loop.
"""

from __future__ import annotations

import asyncio
import collections
import math
from dataclasses import dataclass, field

from .errors import ReceiveBudgetError

__all__ = ["ReceiveBudget"]


@dataclass(slots=True, eq=False)
class _Waiter:
    peer: str
    nbytes: int
    granted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class ReceiveBudget:
    """Bytes that received-message buffers may hold: ``per_peer_bytes`` per peer, ``total_bytes`` in all."""

    def __init__(self, *, total_bytes: int, per_peer_bytes: int, wait_s: float) -> None:
        """Raises ValueError unless ``1 <= per_peer_bytes <= total_bytes`` and ``wait_s`` is positive and finite."""
        check_budget(total_bytes=total_bytes, per_peer_bytes=per_peer_bytes, wait_s=wait_s)
        self.total_bytes = total_bytes
        self.per_peer_bytes = per_peer_bytes
        self.wait_s = wait_s
        self._reserved = 0
        self._by_peer: collections.Counter[str] = collections.Counter()
        self._waiters: collections.deque[_Waiter] = collections.deque()

    @property
    def reserved(self) -> int:
        """Bytes reserved right now, over all peers."""
        return self._reserved

    def reserved_by(self, peer: str) -> int:
        """Bytes ``peer`` has reserved right now."""
        return self._by_peer[peer]

    @property
    def waiting(self) -> int:
        """Requests waiting for room."""
        return len(self._waiters)

    def try_reserve(self, peer: str, nbytes: int) -> bool:
        """Reserve ``nbytes`` for ``peer`` if that can be done now without waiting; whether it was."""
        if self._waiters or not self._fits(peer, nbytes):
            return False
        self._take(peer, nbytes)
        return True

    async def reserve(self, peer: str, nbytes: int) -> None:
        """Reserve ``nbytes`` for ``peer``, waiting up to ``wait_s`` for room; :meth:`release` gives them back.

        Raises ReceiveBudgetError when ``nbytes`` is over ``per_peer_bytes`` (at once) or when no
        room came within ``wait_s``. If cancelled, nothing stays reserved.
        """
        if nbytes > self.per_peer_bytes:
            raise ReceiveBudgetError(
                f"message of {nbytes} bytes exceeds the receive budget of {self.per_peer_bytes} bytes per peer"
            )
        if self.try_reserve(peer, nbytes):
            return
        waiter = _Waiter(peer, nbytes)
        self._waiters.append(waiter)
        self._grant()
        try:
            async with asyncio.timeout(self.wait_s):
                await asyncio.shield(waiter.granted)
        except TimeoutError:
            if not self._leave(waiter):
                return  # granted at the last moment: keep it
            raise ReceiveBudgetError(
                f"receive budget exhausted: no room for {nbytes} bytes within {self.wait_s:g} s; try again later"
            ) from None
        except BaseException:
            if not self._leave(waiter):
                self.release(peer, nbytes)
            raise

    def release(self, peer: str, nbytes: int) -> None:
        """Give back ``nbytes`` that ``peer`` reserved, and let waiters in."""
        held = self._by_peer[peer]
        if not 0 <= nbytes <= held:
            # A bug in the caller, not a peer's doing.
            raise ValueError(f"release of {nbytes} bytes by {peer}, which holds {held}")
        if held == nbytes:
            del self._by_peer[peer]
        else:
            self._by_peer[peer] = held - nbytes
        self._reserved -= nbytes
        self._grant()

    def _fits(self, peer: str, nbytes: int) -> bool:
        return (
            self._by_peer[peer] + nbytes <= self.per_peer_bytes
            and self._reserved + nbytes <= self.total_bytes
        )

    def _take(self, peer: str, nbytes: int) -> None:
        self._by_peer[peer] += nbytes
        self._reserved += nbytes

    def _leave(self, waiter: _Waiter) -> bool:
        """Take a waiter that gives up out of the queue; False if it had been granted already."""
        if waiter.granted.done():
            return False
        waiter.granted.cancel()
        self._waiters.remove(waiter)
        self._grant()  # it may have held up the ones behind it
        return True

    def _grant(self) -> None:
        """Grant, in order, the waiters that fit and that no earlier waiter holds up."""
        total_blocked = False  # an earlier waiter waits for the total: later ones queue behind it
        blocked_peers: set[str] = set()  # peers with an earlier waiter: keep their order
        for waiter in list(self._waiters):
            if waiter.peer in blocked_peers:
                continue
            peer_fits = self._by_peer[waiter.peer] + waiter.nbytes <= self.per_peer_bytes
            if peer_fits and not total_blocked and self._reserved + waiter.nbytes <= self.total_bytes:
                self._take(waiter.peer, waiter.nbytes)
                self._waiters.remove(waiter)
                waiter.granted.set_result(None)
                continue
            blocked_peers.add(waiter.peer)
            if peer_fits:
                total_blocked = True

    def __repr__(self) -> str:
        return (
            f"<ReceiveBudget {self._reserved}/{self.total_bytes} bytes reserved, "
            f"{self.per_peer_bytes} per peer, {len(self._waiters)} waiting>"
        )


def check_budget(*, total_bytes: int, per_peer_bytes: int, wait_s: float) -> None:
    """Raise ValueError with the fix unless the budget's settings make sense."""
    if not 1 <= per_peer_bytes <= total_bytes:
        raise ValueError(
            f"the receive budget needs 1 <= per-peer bytes ({per_peer_bytes}) <= total bytes ({total_bytes}); "
            f"raise the total or lower the per-peer share"
        )
    if not (math.isfinite(wait_s) and wait_s > 0):
        raise ValueError(
            f"the receive budget's wait must be a positive, finite number of seconds, got {wait_s}"
        )
