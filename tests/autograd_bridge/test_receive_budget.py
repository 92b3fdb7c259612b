"""The receive budget: bytes of messages being received, per peer and in total, and memory given back
when a peer drops in the middle of a message.

The first tests drive :class:`ReceiveBudget` alone; the rest run real WebSocket servers on loopback
(on both the fast and the public path, as in test_websocket.py) with raw clients
that announce large messages and send them slowly or not at all. Peers are told apart by address:
loopback accepts any 127.x.y.z source, so a client bound to 127.0.0.2 is another peer.
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import torch
from websockets.asyncio.client import ClientConnection, connect

from autograd_bridge.errors import BridgeError, PeerLostError, ReceiveBudgetError
from autograd_bridge.host import StageHost, serve_stage_host
from autograd_bridge.partition import even_stage_specs, save_stage_weights, split_model
from autograd_bridge.receive_budget import ReceiveBudget
from autograd_bridge.remote import ClientSettings, StageClient
from autograd_bridge.serve import StageHostProcess, build_parser, websocket_settings
from autograd_bridge.transport import Connection
from autograd_bridge.websocket import (
    WebSocketServer,
    WebSocketSettings,
    serve_websocket,
)
from tests.autograd_bridge.test_transport import PROMPTLY
from tests.autograd_bridge.test_websocket import length, take_path

MiB = 1 << 20
FRAGMENT = 256 << 10
OTHER_PEER = "127.0.0.2"


# -- the budget alone ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "per_peer", "wait_s"),
    [
        (0, 0, 1.0),
        (1, 2, 1.0),
        (-1, -1, 1.0),
        (2, 1, 0.0),
        (2, 1, -1.0),
        (2, 1, float("inf")),
        (2, 1, float("nan")),
    ],
)
def test_budget_settings_are_checked(total: int, per_peer: int, wait_s: float) -> None:
    """Sizes must satisfy 1 <= per_peer <= total and the wait must be positive and finite."""
    with pytest.raises(ValueError, match="receive budget"):
        ReceiveBudget(total_bytes=total, per_peer_bytes=per_peer, wait_s=wait_s)
    with pytest.raises(ValueError, match="receive budget"):
        WebSocketSettings(
            receive_budget_bytes=total, receive_budget_per_peer_bytes=per_peer, receive_budget_wait_s=wait_s
        )


def test_per_peer_share_defaults_to_the_largest_message() -> None:
    """Unset, the per-peer share is max_message_bytes, which then must fit in the total."""
    assert WebSocketSettings(max_message_bytes=5 * MiB).receive_budget_per_peer == 5 * MiB
    with pytest.raises(ValueError, match="max_message_bytes"):
        WebSocketSettings(max_message_bytes=8 * MiB, receive_budget_bytes=4 * MiB)


async def test_waiters_are_served_in_order() -> None:
    """A large waiter ahead is not overtaken by a small one that would fit; both get in once room frees."""
    budget = ReceiveBudget(total_bytes=10, per_peer_bytes=10, wait_s=PROMPTLY)
    budget.try_reserve("a", 6)
    large = asyncio.ensure_future(budget.reserve("b", 8))
    await asyncio.sleep(0)
    small = asyncio.ensure_future(budget.reserve("c", 2))  # 6 + 2 fits, but the 8 came first
    await asyncio.sleep(0.05)
    assert not large.done() and not small.done() and budget.waiting == 2
    budget.release("a", 6)
    await asyncio.gather(large, small)
    assert budget.reserved == 10 and budget.reserved_by("b") == 8


async def test_a_peer_waiting_for_its_own_share_holds_up_no_one_else() -> None:
    """A waiter blocked by its peer's limit lets another peer's later request through."""
    budget = ReceiveBudget(total_bytes=10, per_peer_bytes=4, wait_s=PROMPTLY)
    assert budget.try_reserve("a", 4)
    again = asyncio.ensure_future(budget.reserve("a", 1))
    await asyncio.sleep(0)
    await asyncio.wait_for(budget.reserve("b", 4), 1)
    assert not again.done()
    budget.release("a", 4)
    await again
    assert (budget.reserved_by("a"), budget.reserved_by("b")) == (1, 4)


async def test_a_waiter_that_times_out_or_is_cancelled_holds_nothing() -> None:
    """No room within wait_s raises ReceiveBudgetError; a cancelled waiter leaves no reservation behind."""
    budget = ReceiveBudget(total_bytes=4, per_peer_bytes=4, wait_s=0.1)
    budget.try_reserve("a", 4)
    started = time.monotonic()
    with pytest.raises(ReceiveBudgetError, match=r"no room for 2 bytes within 0\.1 s"):
        await budget.reserve("b", 2)
    assert time.monotonic() - started >= 0.1
    waiting = asyncio.ensure_future(budget.reserve("b", 2))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert (budget.reserved, budget.waiting) == (4, 0)
    with pytest.raises(ReceiveBudgetError, match="per peer"):
        await budget.reserve("c", 5)  # could never fit: at once, no wait


# -- over real sockets -----------------------------------------------------------------------


@pytest.fixture(params=["fast", "public"])
def both_paths(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The path every connection of the test takes: "fast", or "public" forced by TITANIC_WS_PUBLIC_PATH=1."""
    return take_path(str(request.param), monkeypatch)


async def serve_collecting(
    settings: WebSocketSettings,
) -> tuple[WebSocketServer, asyncio.Queue[int | type[BridgeError]]]:
    """A server that queues the size of every message it receives, or the type of error that ended a connection."""
    received: asyncio.Queue[int | type[BridgeError]] = asyncio.Queue()

    async def handler(conn: Connection) -> None:
        while True:
            try:
                message = await conn.recv()
            except BridgeError as error:
                received.put_nowait(type(error))  # not the error: its traceback would keep buffers alive
                return
            received.put_nowait(len(message))

    return await serve_websocket(handler, "127.0.0.1", 0, settings=settings), received


async def raw_client(url: str, source: str = "127.0.0.1") -> ClientConnection:
    """A plain websockets client whose connection comes from address ``source``."""
    return await connect(url, compression=None, max_size=None, proxy=None, local_addr=(source, 0))


class Trickle:
    """One message of ``total`` bytes from ``ws``: ``now`` bytes at once, the rest after ``finish()``."""

    def __init__(self, ws: ClientConnection, total: int, now: int = FRAGMENT) -> None:
        self._go = asyncio.Event()
        self.sending = asyncio.ensure_future(ws.send(self._fragments(total, now)))

    async def _fragments(self, total: int, now: int) -> AsyncIterator[bytes]:
        yield length(total)
        for start in range(0, total, FRAGMENT):
            if start >= now:
                await self._go.wait()
            yield bytes(min(FRAGMENT, total - start))

    def finish(self) -> None:
        self._go.set()

    async def cancel(self) -> None:
        self.sending.cancel()
        await asyncio.gather(self.sending, return_exceptions=True)


async def eventually(condition: Callable[[], bool], timeout: float = PROMPTLY) -> None:
    """Wait until ``condition()`` holds (polled), failing after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.mark.usefixtures("both_paths")
async def test_messages_over_the_total_wait_in_order_and_complete_later() -> None:
    """Only what fits the total is reserved; the rest waits, first come first served, and arrives once room frees."""
    settings = WebSocketSettings(receive_budget_bytes=4 * MiB, receive_budget_per_peer_bytes=4 * MiB)
    server, received = await serve_collecting(settings)
    budget = server.receive_budget
    try:
        holder = Trickle(await raw_client(server.url), 3 * MiB)
        await eventually(lambda: budget.reserved == 3 * MiB)
        second, third = await raw_client(server.url), await raw_client(server.url)
        sending = [asyncio.ensure_future(second.send([length(2 * MiB), bytes(2 * MiB)]))]
        await eventually(lambda: budget.waiting == 1)
        # The third would fit beside the holder, but it comes after the second.
        sending.append(asyncio.ensure_future(third.send([length(MiB), bytes(MiB)])))
        await eventually(lambda: budget.waiting == 2)
        await asyncio.sleep(0.2)
        assert budget.reserved == 3 * MiB and received.empty()
        holder.finish()
        got = {await asyncio.wait_for(received.get(), PROMPTLY) for _ in range(3)}
        assert got == {3 * MiB, 2 * MiB, MiB}
        await asyncio.gather(holder.sending, *sending)
        await eventually(lambda: budget.reserved == 0)
    finally:
        await server.close()


@pytest.mark.usefixtures("both_paths")
async def test_a_message_that_waits_too_long_is_refused_and_others_are_served() -> None:
    """A message that finds no room within the wait gets close code 1013; the server keeps serving."""
    settings = WebSocketSettings(
        receive_budget_bytes=4 * MiB, receive_budget_per_peer_bytes=4 * MiB, receive_budget_wait_s=0.5
    )
    server, received = await serve_collecting(settings)
    try:
        holder = Trickle(await raw_client(server.url), 3 * MiB)
        await eventually(lambda: server.receive_budget.reserved == 3 * MiB)
        late = await raw_client(server.url)
        started = time.monotonic()
        sending = asyncio.ensure_future(late.send([length(2 * MiB), bytes(2 * MiB)]))
        await asyncio.wait_for(late.wait_closed(), PROMPTLY)
        assert time.monotonic() - started >= 0.5
        assert late.close_code == 1013
        assert "receive budget exhausted" in (late.close_reason or "")
        refused = await asyncio.wait_for(received.get(), PROMPTLY)
        assert refused is ReceiveBudgetError
        await asyncio.gather(sending, return_exceptions=True)
        holder.finish()
        assert await asyncio.wait_for(received.get(), PROMPTLY) == 3 * MiB
        newcomer = await raw_client(server.url)
        await newcomer.send([length(2 * MiB), bytes(2 * MiB)])
        assert await asyncio.wait_for(received.get(), PROMPTLY) == 2 * MiB
        assert server.receive_budget.reserved == 0
    finally:
        await server.close()


@pytest.mark.usefixtures("both_paths")
async def test_a_peer_holding_its_share_does_not_stop_another_peer() -> None:
    """One address at its per-peer share waits for itself; a message from another address goes through."""
    settings = WebSocketSettings(receive_budget_bytes=6 * MiB, receive_budget_per_peer_bytes=3 * MiB)
    server, received = await serve_collecting(settings)
    budget = server.receive_budget
    try:
        holder = Trickle(await raw_client(server.url), 3 * MiB)
        await eventually(lambda: budget.reserved_by("127.0.0.1") == 3 * MiB)
        same_peer = await raw_client(server.url)  # another connection from the same address
        waiting = asyncio.ensure_future(same_peer.send([length(MiB), bytes(MiB)]))
        await eventually(lambda: budget.waiting == 1)
        other = await raw_client(server.url, source=OTHER_PEER)
        await other.send([length(2 * MiB), bytes(2 * MiB)])
        assert await asyncio.wait_for(received.get(), PROMPTLY) == 2 * MiB
        assert budget.waiting == 1 and received.empty()
        holder.finish()
        assert {await asyncio.wait_for(received.get(), PROMPTLY) for _ in range(2)} == {3 * MiB, MiB}
        await asyncio.gather(holder.sending, waiting)
        assert budget.reserved == 0
    finally:
        await server.close()


@pytest.mark.usefixtures("both_paths")
async def test_a_message_over_the_per_peer_share_is_refused_at_once() -> None:
    """A message that could never fit the per-peer share gets close code 1009 without waiting."""
    settings = WebSocketSettings(
        receive_budget_bytes=4 * MiB, receive_budget_per_peer_bytes=MiB, receive_budget_wait_s=60.0
    )
    server, received = await serve_collecting(settings)
    try:
        ws = await raw_client(server.url)
        started = time.monotonic()
        sending = asyncio.ensure_future(ws.send([length(2 * MiB), bytes(2 * MiB)]))
        await asyncio.wait_for(ws.wait_closed(), PROMPTLY)
        assert time.monotonic() - started < PROMPTLY
        assert ws.close_code == 1009
        assert f"exceeds the receive budget of {MiB} bytes per peer" in (ws.close_reason or "")
        assert await asyncio.wait_for(received.get(), PROMPTLY) is ReceiveBudgetError
        await asyncio.gather(sending, return_exceptions=True)
        assert server.receive_budget.reserved == 0
    finally:
        await server.close()


# -- memory of a message cut short ---------------------------------------------------------------


@pytest.fixture
def no_cycle_collector() -> Iterator[None]:
    """As in a quiet server, where Python's cycle collector may not run for a long time."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class KeepsLastError:
    """A handler that keeps the error that ended its connection, as StageClient keeps ``_lost``.

    The error's traceback holds the frame that caught it, whose ``self`` holds the error: a
    reference cycle that only the cycle collector frees. Every frame of the failed recv() is in
    that traceback, so a buffer any of them still refers to stays allocated with it.
    """

    def __init__(self) -> None:
        self.lost: BridgeError | None = None
        self.ended: asyncio.Queue[type[BridgeError]] = asyncio.Queue()

    async def __call__(self, conn: Connection) -> None:
        try:
            while True:
                await conn.recv()
        except BridgeError as error:
            self.lost = error
            self.ended.put_nowait(type(error))


@pytest.mark.usefixtures("both_paths", "no_cycle_collector")
async def test_a_peer_dropping_mid_message_frees_the_buffer_at_once() -> None:
    """Three peers announce 64 MiB, send 4 MiB and drop: each buffer is freed and its bytes given back."""
    handler = KeepsLastError()
    server = await serve_websocket(handler, "127.0.0.1", 0)
    budget = server.receive_budget
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        for _ in range(3):
            ws = await raw_client(server.url)
            trickle = Trickle(ws, 64 * MiB, now=4 * MiB)
            await eventually(lambda: budget.reserved == 64 * MiB)
            held, _ = tracemalloc.get_traced_memory()
            assert held - baseline >= 64 * MiB  # the buffer is traced: this test can see a leak
            ws.transport.abort()  # no closing handshake: the peer is simply gone
            await trickle.cancel()
            assert await asyncio.wait_for(handler.ended.get(), PROMPTLY) is PeerLostError
            del ws, trickle
            await eventually(lambda: budget.reserved == 0)
            # What may stay until the cycle collector runs: websockets' last frame on each side.
            after, _ = tracemalloc.get_traced_memory()
            assert after - baseline < 8 * MiB, f"{(after - baseline) / MiB:.0f} MiB still held after the drop"
    finally:
        tracemalloc.stop()
        await server.close()


# -- the stage host ----------------------------------------------------------------------------


@pytest.mark.usefixtures("both_paths", "single_thread")
async def test_stage_host_trains_after_a_peer_exhausted_and_released_the_budget(load_tiny) -> None:
    """A rogue peer's half-sent message takes the whole budget; a step waits, then trains once the peer drops."""
    model = load_tiny("llama")
    middle = split_model(model, even_stage_specs(model.config.num_hidden_layers, 3))[1]
    host = StageHost({1: middle}, run_id="r")
    settings = WebSocketSettings(receive_budget_bytes=8 * MiB, receive_budget_per_peer_bytes=8 * MiB)
    server = await serve_stage_host(host, websocket=settings)
    budget = server.receive_budget  # type: ignore[attr-defined]
    try:
        url: str = server.url  # type: ignore[attr-defined]
        client = await StageClient.connect(url, run_id="r", stage=1, settings=ClientSettings(timeout_s=30))
        rogue_ws = await raw_client(url, source=OTHER_PEER)
        rogue = Trickle(rogue_ws, 8 * MiB)
        await eventually(lambda: budget.reserved == 8 * MiB)
        x = torch.randn(2, 5, model.config.hidden_size)
        forward = asyncio.ensure_future(client.forward(x, step=0, micro_batch=0))
        await eventually(lambda: budget.waiting == 1)
        rogue_ws.transport.abort()
        await rogue.cancel()
        y = await asyncio.wait_for(forward, PROMPTLY)
        assert torch.allclose(y, middle(x), atol=1e-6)
        before = [p.detach().clone() for p in middle.parameters()]
        await client.backward(torch.ones_like(y), step=0, micro_batch=0)
        await client.optimizer_step(0, lr=1e-2)
        assert host.steps_taken == 1
        assert any(not torch.equal(a, b) for a, b in zip(before, middle.parameters(), strict=True))
        await client.close()
        await eventually(lambda: budget.reserved == 0)
    finally:
        await server.close()  # type: ignore[attr-defined]
        host.close()


# -- python -m autograd_bridge.serve -----------------------------------------------------------

STAGE_ARGS = ["--config", "c", "--weights", "w", "--stage", "1/3:1-2", "--run-id", "r"]


def test_serve_flags_set_the_budget() -> None:
    """The CLI's MiB flags become the server's budget; the per-peer share defaults to the largest message."""
    flags = ["--receive-budget-mib", "64", "--receive-budget-per-peer-mib", "16", "--receive-wait-s", "2.5"]
    settings = websocket_settings(build_parser().parse_args([*STAGE_ARGS, *flags]))
    assert (
        settings.receive_budget_bytes,
        settings.receive_budget_per_peer,
        settings.receive_budget_wait_s,
    ) == (
        64 * MiB,
        16 * MiB,
        2.5,
    )
    default = websocket_settings(build_parser().parse_args(STAGE_ARGS))
    assert (default.receive_budget_bytes, default.receive_budget_per_peer) == (4 << 30, 2 << 30)


@pytest.mark.parametrize(
    "flags",
    [
        ["--receive-budget-mib", "1", "--receive-budget-per-peer-mib", "2"],
        ["--receive-budget-mib", "0"],
        ["--receive-wait-s", "nan"],
        ["--receive-wait-s", "-1"],
    ],
)
def test_serve_refuses_nonsense_budget_flags(flags: list[str]) -> None:
    """Flags that make no budget stop the host before it loads anything, with the reason."""
    with pytest.raises(SystemExit, match="bad receive budget flags"):
        websocket_settings(build_parser().parse_args([*STAGE_ARGS, *flags]))


@pytest.mark.slow
def test_host_process_refuses_a_message_over_its_per_peer_flag(tmp_path, load_tiny) -> None:
    """A host process started with --receive-budget-per-peer-mib 1 refuses a 2 MiB message with 1009, then serves."""
    model = load_tiny("llama")
    model.config.save_pretrained(tmp_path)
    specs = even_stage_specs(model.config.num_hidden_layers, 3)
    stage = split_model(model, specs)[1]
    save_stage_weights(stage, tmp_path / "s1.safetensors")
    flags = ["--receive-budget-mib", "4", "--receive-budget-per-peer-mib", "1"]
    host = StageHostProcess(tmp_path, [tmp_path / "s1.safetensors"], [specs[1]], run_id="r", extra_args=flags)
    try:

        async def scenario() -> None:
            ws = await raw_client(host.url)
            await ws.send([length(2 * MiB), bytes(2 * MiB)])
            await asyncio.wait_for(ws.wait_closed(), PROMPTLY)
            assert ws.close_code == 1009 and "receive budget" in (ws.close_reason or "")
            client = await StageClient.connect(host.url, run_id="r", stage=1)
            x = torch.randn(2, 4, model.config.hidden_size)
            assert torch.allclose(await client.forward(x, step=0, micro_batch=0), stage(x), atol=1e-6)
            await client.close()

        asyncio.run(scenario())
    finally:
        host.close()
