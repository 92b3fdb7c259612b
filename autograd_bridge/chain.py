"""The chained data path: a host hands its stage's output straight to the next stage's host.

On the relayed path the data owner sends every stage its input and takes back its output, so
every boundary crosses the owner's link twice. On the chained path a host, having computed
stage ``s``, sends the output itself to the host of stage ``s + 1`` (a ``CHAIN_FORWARD``), and
in backward sends the input gradient to the host of stage ``s - 1`` (a ``CHAIN_BACKWARD``). The
owner feeds only the first remote stage, takes the output of the last one, and learns how each
stage fared by asking its host (``AWAIT_FORWARD`` / ``AWAIT_BACKWARD``, answered when that
stage's work for the micro-batch is done or has failed). A host that fails is thus named by its
own answer, or by its connection to the owner dropping while the owner waits on it.

Where a stage's output goes is its :class:`ChainRoute`, set by whoever starts the host (the
client daemon, from the server's peer list; never a peer): a :class:`PeerAddress` for a stage
of another host, nothing where the owner collects it. A host lets in only the peers whose
tokens it was given, so the hosts of one pipeline accept only their neighbours and the owner.

:class:`ChainLinks` is the host's side: the routes, the connections to its neighbours (opened
on first use) and the outcomes the owner waits for. Outcomes are kept per (direction, step,
micro-batch, stage) until the owner collects them or the step is released.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_lib
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from .errors import BridgeError, PeerLostError
from .frames import Compression, Frame, MessageKind
from .remote import ClientSettings, StageClient

log = logging.getLogger(__name__)

Direction = Literal["forward", "backward"]
_OutcomeKey = tuple[Direction, int, int, int]  # (direction, step, micro_batch, stage)


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerAddress:
    """Where a neighbouring stage is hosted, and the token this host shows it."""

    url: str  # ws:// or wss:// URL of the neighbour's host
    token: str | None = None  # this host's token for the run (the neighbour knows its digest)
    ssl: ssl_lib.SSLContext | None = None  # for wss://: the context trusting the neighbour's certificate


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainRoute:
    """Where each hosted stage's output and input gradient go on the chained path.

    ``next[s]``: the host of stage ``s + 1``; ``prev[s]``: the host of stage ``s - 1``. A stage
    missing from ``next`` (``prev``) hands its output (input gradient) to the data owner, or to
    stage ``s + 1`` (``s - 1``) when this host serves that stage too.
    """

    next: Mapping[int, PeerAddress] = field(default_factory=dict)
    prev: Mapping[int, PeerAddress] = field(default_factory=dict)


@dataclass(slots=True)
class _Outcome:
    """What the owner's AWAIT for one stage gets: the tensors handed to the owner, or an error."""

    future: asyncio.Future[Mapping[str, torch.Tensor]]


class ChainLinks:
    """A host's neighbours on the chained path and the outcomes the owner waits for."""

    def __init__(
        self,
        run_id: str,
        *,
        compression: Compression = "none",
        timeout_s: float = 120.0,
        max_outcomes: int = 256,
    ) -> None:
        self.run_id = run_id
        self.route = ChainRoute()
        self.routed = False  # set_route was called (a route with no neighbours is a route too)
        self.compression = compression
        self.timeout_s = timeout_s
        self.max_outcomes = max_outcomes
        self._clients: dict[tuple[str, int], StageClient] = {}  # (url, stage) -> connection
        self._connecting: dict[tuple[str, int], asyncio.Lock] = {}
        self._outcomes: dict[_OutcomeKey, _Outcome] = {}
        self._acks: set[asyncio.Task[None]] = set()

    def set_route(self, route: ChainRoute) -> None:
        """Use ``route`` from now on (connections to neighbours that left it are closed lazily)."""
        self.route = route
        self.routed = True

    # -- outcomes ---------------------------------------------------------------------------

    def _outcome(self, key: _OutcomeKey) -> _Outcome:
        outcome = self._outcomes.get(key)
        if outcome is None:
            if len(self._outcomes) >= self.max_outcomes:
                raise BridgeError(
                    f"this host already keeps {len(self._outcomes)} chained outcomes nobody collected; "
                    f"release old steps first"
                )
            outcome = _Outcome(asyncio.get_running_loop().create_future())
            self._outcomes[key] = outcome
        return outcome

    def succeed(self, key: _OutcomeKey, tensors: Mapping[str, torch.Tensor]) -> None:
        """Stage work done; ``tensors`` go to the owner (empty when they went to a neighbour)."""
        future = self._outcome(key).future
        if not future.done():
            future.set_result(dict(tensors))

    def fail(self, key: _OutcomeKey, error: BridgeError) -> None:
        """Stage work failed; the owner's AWAIT gets ``error``."""
        future = self._outcome(key).future
        if not future.done():
            future.set_exception(error)
            future.exception()  # retrieved here: nobody may ever await it if the step is released

    async def collect(self, key: _OutcomeKey) -> Mapping[str, torch.Tensor]:
        """Wait for the outcome of ``key`` (the owner's AWAIT), then forget it."""
        outcome = self._outcome(key)
        try:
            return await asyncio.shield(outcome.future)
        finally:
            if outcome.future.done():
                self._outcomes.pop(key, None)

    def release(self, step: int, *, up_to: bool = False) -> int:
        """Forget the outcomes of ``step`` (or of every step up to it); their AWAITs fail."""
        doomed = [k for k in self._outcomes if (k[1] <= step if up_to else k[1] == step)]
        for key in doomed:
            future = self._outcomes.pop(key).future
            if not future.done():
                future.set_exception(BridgeError(f"step {step} was released before stage {key[3]} finished"))
                future.exception()
        return len(doomed)

    # -- handing on -------------------------------------------------------------------------

    def next_hop(self, direction: Direction, stage: int) -> tuple[int, PeerAddress] | None:
        """The neighbouring stage and its host that ``stage``'s result goes to (None: the owner)."""
        if direction == "forward":
            peer = self.route.next.get(stage)
            return None if peer is None else (stage + 1, peer)
        peer = self.route.prev.get(stage)
        return None if peer is None else (stage - 1, peer)

    async def _client(self, stage: int, peer: PeerAddress) -> StageClient:
        key = (peer.url, stage)
        lock = self._connecting.setdefault(key, asyncio.Lock())
        async with lock:
            client = self._clients.get(key)
            if client is None or client.lost:
                settings = ClientSettings(timeout_s=self.timeout_s, compression=self.compression)
                client = await StageClient.connect(
                    peer.url,
                    run_id=self.run_id,
                    stage=stage,
                    token=peer.token,
                    settings=settings,
                    ssl=peer.ssl,
                )
                self._clients[key] = client
            return client

    async def hand_on(
        self, direction: Direction, stage: int, frame: Frame, tensors: Mapping[str, torch.Tensor]
    ) -> None:
        """Send ``tensors`` (stage ``stage``'s result) to the neighbour's host as its next request.

        Returns once the request is on its way; raises PeerLostError naming the neighbour when
        it cannot be reached. The neighbour's answer is only logged: a failure there is reported
        to the owner by that host's own outcome.
        """
        hop = self.next_hop(direction, stage)
        assert hop is not None, "hand_on is only called for a stage with a neighbour"
        target, peer = hop
        kind = MessageKind.CHAIN_FORWARD if direction == "forward" else MessageKind.CHAIN_BACKWARD
        try:
            client = await self._client(target, peer)
            pending = await client.start_request(
                kind,
                step=frame.step,
                micro_batch=frame.micro_batch,
                tensors=tensors,
                options=frame.options,
                compression=self.compression,
            )
        except (BridgeError, OSError) as exc:
            raise PeerLostError(
                f"stage {stage} could not hand its {direction} result for step {frame.step} micro-batch "
                f"{frame.micro_batch} to the host of stage {target} ({peer.url}): {exc}"
            ) from exc
        task = asyncio.get_running_loop().create_task(self._log_answer(pending, target, frame))
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)

    @staticmethod
    async def _log_answer(pending: Awaitable[Frame], target: int, frame: Frame) -> None:
        try:
            await pending
        except BridgeError as exc:
            log.info(
                "stage %d refused step %d micro-batch %d: %s", target, frame.step, frame.micro_batch, exc
            )

    async def close(self) -> None:
        """Close the connections to neighbours and fail every outcome still awaited."""
        for task in list(self._acks):
            task.cancel()
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
        for outcome in self._outcomes.values():
            if not outcome.future.done():
                outcome.future.cancel()
        self._outcomes.clear()
