"""A private asyncio loop in a daemon thread.

The training code of a data owner is ordinary synchronous PyTorch; the transports are asyncio.
The bridge runs all network I/O on one loop in a background thread and lets synchronous code
wait on it (``run``) or hand work to it without waiting (``submit``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class EventLoopThread:
    """Owns an event loop running forever in a daemon thread until :meth:`close`."""

    def __init__(self, name: str = "titanic-bridge-io") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; the caller gets a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and block the calling thread until it finishes."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("EventLoopThread.run() called from its own loop thread; await instead")
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        """Stop the loop and join the thread; pending tasks are cancelled."""
        if self.loop.is_closed():
            return

        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks(self.loop) if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            self.submit(_cancel_all()).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> EventLoopThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
