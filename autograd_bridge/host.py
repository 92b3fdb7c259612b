"""The stage host: serves one or more pipeline stages to the peers of a run.

A host receives frames from its peers over :class:`~autograd_bridge.transport.Connection`s and
answers each request frame with exactly one response frame (same ``request_id``):

=================  ==============================  ============================================
request            tensors in                      response
=================  ==============================  ============================================
HELLO              -                               ACK (options: stages, run_id, version)
FORWARD            x, [attention_mask], [pos_ids]  FORWARD_RESULT y  (keeps state for backward)
EVAL_FORWARD       x, [attention_mask], [pos_ids]  FORWARD_RESULT y  (no state, no grad)
BACKWARD           grad (dL/dy)                    BACKWARD_RESULT [grad] (dL/dx; none for ids)
OPTIMIZER_STEP     - (options: lr, grad_scale)     ACK (options: dropped)
RELEASE            -                               ACK (options: dropped)
GET_GRADS          -                               GRADS  (whole-model parameter names)
GET_WEIGHTS        -                               WEIGHTS
GET_GRAD_NORM      -                               GRAD_NORM sq (sum of squared gradients, float64)
CHAIN_FORWARD      as FORWARD                      FORWARD_RESULT (empty); y goes on (see chain.py)
CHAIN_BACKWARD     as BACKWARD                     BACKWARD_RESULT (empty); grad goes back a hop
AWAIT_FORWARD      -                               FORWARD_RESULT [y] once the stage's forward is done
AWAIT_BACKWARD     -                               BACKWARD_RESULT [grad] once its backward is done
=================  ==============================  ============================================

Anything else, or anything wrong with a request, gets an ERROR frame with a code and a message
that says what was wrong; the host keeps serving. The state kept between FORWARD and BACKWARD is
keyed by (run, step, micro-batch, stage), bounded per peer (in count and bytes) and for the
whole host (in bytes), so one peer holding states cannot make another's FORWARD fail; it is
dropped when it is older than ``state_timeout_s`` and when the connection that created it
goes away. Transport errors (a peer breaking the message framing) end that peer's connection
with a close reason and one log line, never a traceback. Over WebSockets the bytes of messages
still being received are budgeted too, per peer address and for the whole server
(``WebSocketSettings.receive_budget_*``, see :mod:`autograd_bridge.receive_budget`).

Compute runs on one worker thread so that the event loop keeps reading frames and answering
pings while a stage computes; requests are therefore computed one at a time, in arrival order.
The AWAIT requests of the chained path are answered when their stage is done, so they do not
hold up the requests behind them on their connection.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import math
import ssl as ssl_lib
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

from .chain import ChainLinks, Direction
from .errors import (
    BadRequestError,
    BridgeError,
    FrameError,
    PeerLostError,
    ReceiveBudgetError,
    RemoteStageError,
)
from .frames import Compression, Frame, FrameLimits, MessageKind, decode_frame, encode_frame, error_frame
from .methods.remote_space import DirectionalHandlers
from .optim import build_optimizer, check_optimizer_name
from .transport import Connection

if TYPE_CHECKING:
    from .websocket import WebSocketSettings

log = logging.getLogger(__name__)

PROTOCOL_VERSION = "1"

_T = TypeVar("_T")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32)
_MASK_DTYPES = (torch.int64, torch.int32, torch.bool, torch.float32, torch.float16, torch.bfloat16)
# The largest learning rate an OPTIMIZER_STEP may set: above it every model diverges at once.
MAX_STEP_LR = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class HostSettings:
    """What a stage host allows and how it trains."""

    max_micro_batches: int = 64  # FORWARD states one peer may hold at once (each keeps a graph alive)
    # Bytes of stage inputs and outputs one peer's states may hold (the graph between them,
    # activations saved for backward, is several times more and grows alike).
    max_state_bytes_per_peer: int = 1 << 30
    max_state_bytes: int = 4 << 30  # ... and all peers' together
    state_timeout_s: float = 300.0  # a state whose BACKWARD has not come by then is dropped
    optimizer: str = "adamw"  # the host steps its own parameters (a name in autograd_bridge.optim)
    lr: float = 1e-4  # default learning rate; OPTIMIZER_STEP may override it per step
    weight_decay: float = 0.0  # decoupled weight decay for adamw, L2 for sgd
    compression: Compression = "none"  # compression of the activations/gradients this host sends
    limits: FrameLimits = field(default_factory=FrameLimits)  # what an incoming frame may be

    def __post_init__(self) -> None:
        if self.max_micro_batches < 1:
            raise ValueError("max_micro_batches must be at least 1")
        if not 1 <= self.max_state_bytes_per_peer <= self.max_state_bytes:
            raise ValueError("max_state_bytes_per_peer must be at least 1 and at most max_state_bytes")
        if self.state_timeout_s <= 0:
            raise ValueError("state_timeout_s must be positive")
        if self.lr < 0:
            raise ValueError("lr must be non-negative")


class _Refused(Exception):
    """A request this host will not carry out; becomes an ERROR frame with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class _MicroBatchState:
    inputs: torch.Tensor  # the stage input as the host received it (a leaf needing grad if float)
    outputs: torch.Tensor  # the stage output, still attached to the graph
    created: float  # time.monotonic() when the FORWARD arrived
    owner: int  # id() of the connection that created it
    nbytes: int = 0  # bytes of inputs and outputs



_Key = tuple[str, int, int, int]  # (run_id, step, micro_batch, stage)

# Requests answered whenever their stage is done, off the connection's in-order loop.
_DEFERRED = frozenset({MessageKind.AWAIT_FORWARD, MessageKind.AWAIT_BACKWARD})
_COMPUTE_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)
_CHAIN = 0  # the owner id of micro-batch states made by chained forwards (no connection's id)


def _model_named_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    named = getattr(module, "named_model_parameters", None)
    if callable(named):
        yield from named()
    else:
        yield from module.named_parameters()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _parameter_dtype(module: nn.Module) -> torch.dtype | None:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _max_positions(config: object) -> int:
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 1 << 20)


class StageHost:
    """Hosts ``stages`` (stage index -> module) for run ``run_id`` and answers peers' requests."""

    def __init__(
        self,
        stages: Mapping[int, nn.Module],
        *,
        run_id: str,
        settings: HostSettings | None = None,
    ) -> None:
        if not stages:
            raise ValueError("a StageHost needs at least one stage")
        self.stages = dict(stages)
        self.run_id = run_id
        self.settings = settings or HostSettings()
        self._states: dict[_Key, _MicroBatchState] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="titanic-stage")
        params = [p for m in self.stages.values() for p in m.parameters() if p.requires_grad]
        self.optimizer = self._make_optimizer(params)
        self.steps_taken = 0
        # The chained path: neighbours and the outcomes the owner collects (chain.set_route to use it).
        self.chain = ChainLinks(
            run_id, compression=self.settings.compression, max_outcomes=4 * self.settings.max_micro_batches
        )
        self._handlers: dict[MessageKind, Callable[[Frame, int], Awaitable[Frame]]] = {
            MessageKind.HELLO: self._hello,
            MessageKind.FORWARD: self._forward,
            MessageKind.EVAL_FORWARD: self._eval_forward,
            MessageKind.BACKWARD: self._backward,
            MessageKind.OPTIMIZER_STEP: self._optimizer_step,
            MessageKind.RELEASE: self._release,
            MessageKind.GET_GRADS: self._get_grads,
            MessageKind.GET_WEIGHTS: self._get_weights,
            MessageKind.GET_GRAD_NORM: self._get_grad_norm,
            MessageKind.CHAIN_FORWARD: self._chain_forward,
            MessageKind.CHAIN_BACKWARD: self._chain_backward,
            MessageKind.AWAIT_FORWARD: self._await_forward,
            MessageKind.AWAIT_BACKWARD: self._await_backward,
        }
        # Forward gradients: perturb and step this host's tensors along seeded directions.
        self._handlers.update(DirectionalHandlers(self._stage, self._compute).handlers())
        self.received: collections.Counter[MessageKind] = collections.Counter()  # requests by kind

    def _make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer | None:
        if not params:
            return None
        s = self.settings
        return build_optimizer(s.optimizer, params, lr=s.lr, weight_decay=s.weight_decay)

    def set_compression(self, compression: Compression) -> None:
        """Compress the activations and gradients this host sends (to the owner and its neighbours) so."""
        self.settings = replace(self.settings, compression=compression)
        self.chain.compression = compression

    def reset_optimizer(self, optimizer: str | None = None) -> None:
        """Rebuild the optimizer over the parameters that require grad now (after add_lora, say).

        ``optimizer`` switches the kind for this host's later steps (its state starts afresh).
        """
        if optimizer is not None:
            self.settings = replace(self.settings, optimizer=check_optimizer_name(optimizer))
        params = [p for m in self.stages.values() for p in m.parameters() if p.requires_grad]
        self.optimizer = self._make_optimizer(params)

    @property
    def held_micro_batches(self) -> int:
        """How many FORWARD states the host keeps right now."""
        return len(self._states)

    @property
    def held_state_bytes(self) -> int:
        """Bytes of stage inputs and outputs the kept FORWARD states hold."""
        return sum(st.nbytes for st in self._states.values())

    # -- serving ---------------------------------------------------------------------------

    async def serve(self, conn: Connection) -> None:
        """Answer ``conn``'s requests until the peer closes it; drops the peer's state then."""
        conn_id = id(conn)
        sending = asyncio.Lock()  # deferred answers and in-order ones share the connection
        deferred: set[asyncio.Task[None]] = set()

        async def reply(response: Frame) -> None:
            async with sending:
                await conn.send(encode_frame(response, compression=self._compression_for(response)))

        async def answer_later(frame: Frame) -> None:
            with contextlib.suppress(PeerLostError):
                await reply(await self.handle(frame, conn_id))

        try:
            while True:
                try:
                    data = await conn.recv()
                except PeerLostError:
                    return
                except ReceiveBudgetError as exc:
                    log.warning("%s", exc)  # the transport closed the connection with the reason
                    return
                except FrameError as exc:
                    # The transport closed the connection with the reason already; nothing to answer on.
                    log.warning("peer %s broke the message framing: %s", conn.peer, exc)
                    return
                try:
                    frame = decode_frame(data, limits=self.settings.limits)
                except FrameError as exc:
                    response = error_frame(None, "BAD_FRAME", str(exc))
                else:
                    if frame.kind in _DEFERRED:
                        task = asyncio.get_running_loop().create_task(answer_later(frame))
                        deferred.add(task)
                        task.add_done_callback(deferred.discard)
                        continue
                    response = await self.handle(frame, conn_id)
                try:
                    await reply(response)
                except PeerLostError:
                    return
        finally:
            for task in list(deferred):
                task.cancel()
            dropped = self._drop(lambda key, st: st.owner == conn_id)
            if dropped:
                log.info("peer %s went away; dropped %d micro-batch states", conn.peer, dropped)

    def _compression_for(self, frame: Frame) -> Compression:
        # Only activations and gradients are compressed; weights and grads for checks travel exactly.
        if frame.kind in (MessageKind.FORWARD_RESULT, MessageKind.BACKWARD_RESULT):
            return self.settings.compression
        return "none"

    async def handle_bytes(self, data: bytes | bytearray | memoryview, conn_id: int = 0) -> Frame:
        """Decode one request and return the response frame (an ERROR frame for anything wrong)."""
        try:
            frame = decode_frame(data, limits=self.settings.limits)
        except FrameError as exc:
            return error_frame(None, "BAD_FRAME", str(exc))
        return await self.handle(frame, conn_id)

    async def handle(self, frame: Frame, conn_id: int = 0) -> Frame:
        """Carry out one decoded request."""
        self.received[frame.kind] += 1
        if self.received[frame.kind] == 1:  # one line per kind: what a run asked of this host
            log.info("run %s: first %s request", self.run_id, frame.kind.name)
        try:
            handler = self._handlers.get(frame.kind)
            if handler is None:
                raise _Refused("UNEXPECTED_KIND", f"a stage host does not accept {frame.kind.name} frames")
            if frame.run_id != self.run_id:
                raise _Refused(
                    "UNKNOWN_RUN", f"this host serves run {self.run_id!r}, not {frame.run_id!r}"
                )
            return await handler(frame, conn_id)
        except _Refused as exc:
            return error_frame(frame, exc.code, str(exc))
        except BadRequestError as exc:
            return error_frame(frame, "BAD_REQUEST", str(exc))
        except RemoteStageError as exc:
            return error_frame(frame, exc.code, str(exc))
        except BridgeError as exc:
            return error_frame(frame, type(exc).__name__, str(exc))
        except _COMPUTE_ERRORS as exc:
            # A computation that failed on this input; the host stays up for the next request.
            log.warning("stage compute failed: %s", exc)
            return error_frame(frame, "COMPUTE_ERROR", f"{type(exc).__name__}: {exc}")

    async def _compute(self, fn: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # -- handlers --------------------------------------------------------------------------

    def _stage(self, frame: Frame) -> nn.Module:
        module = self.stages.get(frame.stage)
        if module is None:
            held = ", ".join(str(k) for k in sorted(self.stages))
            raise _Refused("UNKNOWN_STAGE", f"stage {frame.stage} is not hosted here (hosted: {held})")
        return module

    async def _hello(self, frame: Frame, conn_id: int) -> Frame:
        return Frame(
            kind=MessageKind.ACK,
            request_id=frame.request_id,
            run_id=self.run_id,
            options={
                "version": PROTOCOL_VERSION,
                "stages": ",".join(str(k) for k in sorted(self.stages)),
            },
        )

    def _stage_inputs(
        self, frame: Frame, module: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        x = frame.tensors.get("x")
        if x is None:
            raise _Refused("BAD_REQUEST", "FORWARD needs a tensor named 'x'")
        config = getattr(module, "config", None)
        is_first = bool(getattr(getattr(module, "spec", None), "is_first", False))
        if is_first:
            if x.dtype not in _INDEX_DTYPES or x.dim() != 2:
                raise _Refused(
                    "BAD_SHAPE",
                    f"stage {frame.stage} takes token ids (B, T) int64; got {tuple(x.shape)} {x.dtype}",
                )
        else:
            hidden = getattr(config, "hidden_size", None)
            if x.dtype not in _FLOAT_DTYPES or x.dim() != 3 or (hidden is not None and x.shape[-1] != hidden):
                raise _Refused(
                    "BAD_SHAPE",
                    f"stage {frame.stage} takes hidden states (B, T, {hidden}) of a float dtype; "
                    f"got {tuple(x.shape)} {x.dtype}",
                )
            dtype = _parameter_dtype(module)
            if dtype is not None and x.dtype != dtype:
                raise _Refused("BAD_DTYPE", f"stage {frame.stage} computes in {dtype}; send hidden states as {dtype}, not {x.dtype}")
        if x.numel() == 0:
            raise _Refused("BAD_SHAPE", f"stage {frame.stage} needs at least one sequence of one token; got {tuple(x.shape)}")
        if is_first:
            vocab = getattr(config, "vocab_size", None)
            low, high = int(x.min()), int(x.max())
            if low < 0 or (vocab is not None and high >= vocab):
                raise _Refused("BAD_INPUT", f"token ids must be in [0, {vocab}); got ids from {low} to {high}")
        mask = frame.tensors.get("attention_mask")
        positions = frame.tensors.get("position_ids")
        for name, t, dtypes in (("attention_mask", mask, _MASK_DTYPES), ("position_ids", positions, _INDEX_DTYPES)):
            if t is None:
                continue
            if tuple(t.shape) != tuple(x.shape[:2]):
                raise _Refused(
                    "BAD_SHAPE", f"{name} must be (B, T) = {tuple(x.shape[:2])}; got {tuple(t.shape)}"
                )
            if t.dtype not in dtypes:
                raise _Refused("BAD_DTYPE", f"{name} must be one of {', '.join(map(str, dtypes))}; got {t.dtype}")
        if positions is not None and (int(positions.min()) < 0 or int(positions.max()) >= _max_positions(config)):
            raise _Refused("BAD_INPUT", f"position_ids must be in [0, {_max_positions(config)})")
        return x, mask, positions

    def _sweep_expired(self) -> None:
        deadline = time.monotonic() - self.settings.state_timeout_s
        dropped = self._drop(lambda key, st: st.created < deadline)
        if dropped:
            log.warning("dropped %d micro-batch states older than %.0f s", dropped, self.settings.state_timeout_s)

    def _drop(self, predicate: Callable[[_Key, _MicroBatchState], bool]) -> int:
        doomed = [k for k, st in self._states.items() if predicate(k, st)]
        for k in doomed:
            del self._states[k]
        return len(doomed)

    async def _forward(self, frame: Frame, conn_id: int) -> Frame:
        module = self._stage(frame)
        x, mask, positions = self._stage_inputs(frame, module)
        key = (frame.run_id, frame.step, frame.micro_batch, frame.stage)
        self._sweep_expired()
        if key in self._states:
            raise _Refused(
                "DUPLICATE", f"step {frame.step} micro-batch {frame.micro_batch} already went forward here"
            )
        self._check_state_room(conn_id, x)

        def run() -> tuple[torch.Tensor, torch.Tensor]:
            inputs = x.detach().requires_grad_(True) if x.is_floating_point() else x
            with torch.enable_grad():
                outputs = module(inputs, attention_mask=mask, position_ids=positions)
            return inputs, outputs

        inputs, outputs = await self._compute(run)
        nbytes = _nbytes(inputs) + _nbytes(outputs)
        self._states[key] = _MicroBatchState(inputs, outputs, time.monotonic(), conn_id, nbytes)
        return self._result(frame, MessageKind.FORWARD_RESULT, {"y": outputs.detach()})

    def _check_state_room(self, conn_id: int, x: torch.Tensor) -> None:
        """Refuse a FORWARD whose state would take the peer or the host over its budget.

        The peer's own count and bytes come first, so a peer at its limit is refused while
        the others keep their room; the host's total guards memory when many peers are busy.
        The new state's bytes are estimated as twice its input (input and an output alike).
        """
        s = self.settings
        mine = [st for st in self._states.values() if st.owner == conn_id]
        new = 2 * _nbytes(x)
        if len(mine) >= s.max_micro_batches:
            raise _Refused(
                "STATE_LIMIT",
                f"this peer already holds {len(mine)} micro-batches awaiting backward here "
                f"(max_micro_batches={s.max_micro_batches}); run backward or RELEASE first",
            )
        held = sum(st.nbytes for st in mine)
        if held + new > s.max_state_bytes_per_peer:
            raise _Refused(
                "STATE_LIMIT",
                f"this peer's micro-batches awaiting backward hold {held} bytes; another of ~{new} bytes would pass "
                f"max_state_bytes_per_peer={s.max_state_bytes_per_peer}; run backward or RELEASE first, or send smaller micro-batches",
            )
        total = self.held_state_bytes
        if total + new > s.max_state_bytes:
            raise _Refused(
                "STATE_LIMIT",
                f"the host's micro-batches awaiting backward hold {total} bytes of max_state_bytes={s.max_state_bytes}; "
                "try again after other peers' backward passes",
            )

    async def _eval_forward(self, frame: Frame, conn_id: int) -> Frame:
        module = self._stage(frame)
        x, mask, positions = self._stage_inputs(frame, module)

        def run() -> torch.Tensor:
            with torch.no_grad():
                return module(x, attention_mask=mask, position_ids=positions)

        outputs = await self._compute(run)
        return self._result(frame, MessageKind.FORWARD_RESULT, {"y": outputs})

    async def _backward(self, frame: Frame, conn_id: int) -> Frame:
        self._stage(frame)
        key = (frame.run_id, frame.step, frame.micro_batch, frame.stage)
        state = self._states.get(key)
        if state is None:
            raise _Refused(
                "UNKNOWN_MICRO_BATCH",
                f"no forward state for step {frame.step} micro-batch {frame.micro_batch} on stage "
                f"{frame.stage} (never sent, already used, released, or older than "
                f"{self.settings.state_timeout_s:.0f} s)",
            )
        grad = frame.tensors.get("grad")
        if grad is None:
            raise _Refused("BAD_REQUEST", "BACKWARD needs a tensor named 'grad'")
        if tuple(grad.shape) != tuple(state.outputs.shape) or grad.dtype not in _FLOAT_DTYPES:
            raise _Refused(
                "BAD_SHAPE",
                f"grad must match the stage output {tuple(state.outputs.shape)} and be floating point; "
                f"got {tuple(grad.shape)} {grad.dtype}",
            )
        del self._states[key]

        def run() -> torch.Tensor | None:
            torch.autograd.backward(state.outputs, grad.to(state.outputs.dtype))
            return state.inputs.grad

        grad_in = await self._compute(run)
        tensors = {"grad": grad_in} if grad_in is not None else {}
        return self._result(frame, MessageKind.BACKWARD_RESULT, tensors)

    async def _optimizer_step(self, frame: Frame, conn_id: int) -> Frame:
        lr_text = frame.options.get("lr")
        try:
            lr = float(lr_text) if lr_text is not None else None
        except ValueError as exc:
            raise _Refused("BAD_REQUEST", f"option lr must be a number, got {lr_text!r}") from exc
        if lr is not None and not (math.isfinite(lr) and 0 <= lr <= MAX_STEP_LR):
            raise _Refused("BAD_REQUEST", f"option lr must be a finite number in [0, {MAX_STEP_LR:g}], got {lr_text!r}")
        scale_text = frame.options.get("grad_scale")
        try:
            scale = float(scale_text) if scale_text is not None else None
        except ValueError as exc:
            raise _Refused("BAD_REQUEST", f"option grad_scale must be a number, got {scale_text!r}") from exc
        if scale is not None and not (math.isfinite(scale) and 0 <= scale <= 1):
            raise _Refused("BAD_REQUEST", f"option grad_scale must be in [0, 1] (clipping only shrinks), got {scale_text!r}")
        dropped = self._drop(lambda key, st: key[0] == frame.run_id and key[1] <= frame.step)
        self.chain.release(frame.step, up_to=True)
        optimizer = self.optimizer

        def run() -> None:
            if optimizer is None:
                return
            if lr is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr
            if scale is not None:
                with torch.no_grad():
                    for group in optimizer.param_groups:
                        for p in group["params"]:
                            if p.grad is not None:
                                p.grad.mul_(scale)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        await self._compute(run)
        self.steps_taken += 1
        return Frame(
            kind=MessageKind.ACK,
            request_id=frame.request_id,
            run_id=self.run_id,
            step=frame.step,
            options={"dropped": str(dropped)},
        )

    async def _release(self, frame: Frame, conn_id: int) -> Frame:
        dropped = self._drop(lambda key, st: key[0] == frame.run_id and key[1] == frame.step)
        self.chain.release(frame.step)
        return Frame(
            kind=MessageKind.ACK,
            request_id=frame.request_id,
            run_id=self.run_id,
            step=frame.step,
            options={"dropped": str(dropped)},
        )

    async def _get_grads(self, frame: Frame, conn_id: int) -> Frame:
        module = self._stage(frame)
        grads = {name: p.grad for name, p in _model_named_parameters(module) if p.grad is not None}
        return self._result(frame, MessageKind.GRADS, grads)

    async def _get_grad_norm(self, frame: Frame, conn_id: int) -> Frame:
        params = [p for _, p in _model_named_parameters(self._stage(frame)) if p.requires_grad]

        def run() -> torch.Tensor:
            sq = torch.zeros(1, dtype=torch.float64)
            for p in params:
                if p.grad is not None:
                    sq += p.grad.detach().double().pow(2).sum()
            return sq

        return self._result(frame, MessageKind.GRAD_NORM, {"sq": await self._compute(run)})

    async def _get_weights(self, frame: Frame, conn_id: int) -> Frame:
        module = self._stage(frame)
        weights = {name: p.detach() for name, p in _model_named_parameters(module)}
        return self._result(frame, MessageKind.WEIGHTS, weights)

    # -- the chained path (see autograd_bridge.chain) ----------------------------------------

    def _check_routed(self) -> None:
        if not self.chain.routed:
            raise _Refused("NO_ROUTE", "this host has not been told its neighbours yet; retry once the run is set up")

    async def _chain_forward(self, frame: Frame, conn_id: int) -> Frame:
        """FORWARD (EVAL_FORWARD with option eval=1), then hand the output on; answer empty."""
        self._check_routed()
        train = frame.options.get("eval") != "1"
        key: tuple[Direction, int, int, int] = ("forward", frame.step, frame.micro_batch, frame.stage)
        try:
            # The state outlives the neighbour's connection: a neighbour that goes away must not
            # take this stage's state with it (the owner releases a failed step everywhere).
            result = await (self._forward(frame, _CHAIN) if train else self._eval_forward(frame, _CHAIN))
            onward = {"x": result.tensors["y"]}
            for name in ("attention_mask", "position_ids"):
                if name in frame.tensors:
                    onward[name] = frame.tensors[name]
            await self._pass_on("forward", frame, onward, conn_id, to_owner={"y": result.tensors["y"]})
        except (_Refused, BridgeError, *_COMPUTE_ERRORS) as exc:
            self.chain.fail(key, self._chain_error("forward", frame, exc))
            raise
        return self._result(frame, MessageKind.FORWARD_RESULT, {})

    async def _chain_backward(self, frame: Frame, conn_id: int) -> Frame:
        """BACKWARD, then hand the input gradient back a hop; answer empty."""
        self._check_routed()
        key: tuple[Direction, int, int, int] = ("backward", frame.step, frame.micro_batch, frame.stage)
        try:
            result = await self._backward(frame, conn_id)
            grad = result.tensors.get("grad")
            to_owner = {} if grad is None else {"grad": grad}
            await self._pass_on("backward", frame, to_owner, conn_id, to_owner=to_owner)
        except (_Refused, BridgeError, *_COMPUTE_ERRORS) as exc:
            self.chain.fail(key, self._chain_error("backward", frame, exc))
            raise
        return self._result(frame, MessageKind.BACKWARD_RESULT, {})

    async def _pass_on(
        self,
        direction: Direction,
        frame: Frame,
        onward: Mapping[str, torch.Tensor],
        conn_id: int,
        *,
        to_owner: Mapping[str, torch.Tensor],
    ) -> None:
        """Send a stage's result to the neighbour's host, this host's next stage, or the owner."""
        key: tuple[Direction, int, int, int] = (direction, frame.step, frame.micro_batch, frame.stage)
        neighbour = frame.stage + 1 if direction == "forward" else frame.stage - 1
        if self.chain.next_hop(direction, frame.stage) is not None:
            if direction == "backward" and "grad" not in onward:
                raise _Refused("BAD_ROUTE", f"stage {frame.stage} takes token ids: no gradient to send back")
            await self.chain.hand_on(direction, frame.stage, frame, onward)
            self.chain.succeed(key, {})
        elif neighbour in self.stages:
            self.chain.succeed(key, {})
            kind = MessageKind.CHAIN_FORWARD if direction == "forward" else MessageKind.CHAIN_BACKWARD
            handler = self._chain_forward if direction == "forward" else self._chain_backward
            await handler(replace(frame, kind=kind, stage=neighbour, tensors=dict(onward)), conn_id)
        else:
            self.chain.succeed(key, to_owner)

    def _chain_error(self, direction: str, frame: Frame, exc: Exception) -> RemoteStageError:
        code = exc.code if isinstance(exc, _Refused | RemoteStageError) else type(exc).__name__
        return RemoteStageError(
            f"stage {frame.stage} failed its {direction} of step {frame.step} micro-batch {frame.micro_batch}: "
            f"{type(exc).__name__}: {exc}",
            code=code,
        )

    async def _await_forward(self, frame: Frame, conn_id: int) -> Frame:
        self._stage(frame)
        tensors = await self.chain.collect(("forward", frame.step, frame.micro_batch, frame.stage))
        return self._result(frame, MessageKind.FORWARD_RESULT, tensors)

    async def _await_backward(self, frame: Frame, conn_id: int) -> Frame:
        self._stage(frame)
        tensors = await self.chain.collect(("backward", frame.step, frame.micro_batch, frame.stage))
        return self._result(frame, MessageKind.BACKWARD_RESULT, tensors)

    def _result(self, frame: Frame, kind: MessageKind, tensors: Mapping[str, torch.Tensor]) -> Frame:
        return Frame(
            kind=kind,
            request_id=frame.request_id,
            run_id=self.run_id,
            step=frame.step,
            micro_batch=frame.micro_batch,
            stage=frame.stage,
            tensors=dict(tensors),
        )

    async def aclose(self) -> None:
        """Close the connections to neighbouring hosts, then :meth:`close`."""
        await self.chain.close()
        self.close()

    def close(self) -> None:
        """Release the compute thread and all held state (:meth:`aclose` also closes neighbour links)."""
        self._states.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


async def serve_stage_host(
    host: StageHost,
    address: str = "127.0.0.1",
    port: int = 0,
    *,
    ssl: ssl_lib.SSLContext | None = None,
    authenticate: Callable[[str | None], bool] | None = None,
    websocket: WebSocketSettings | None = None,
) -> object:
    """Serve ``host`` over WebSockets; returns the server (``.port``, ``.url``, ``await .close()``).

    ``websocket`` sets the transport, its receive budget included (default: WebSocketSettings()).
    """
    # The real transport, imported here: tests may serve a host over memory pipes instead.
    from .websocket import WebSocketSettings, serve_websocket

    settings = WebSocketSettings() if websocket is None else websocket
    return await serve_websocket(
        host.serve, address, port, ssl=ssl, settings=settings, authenticate=authenticate
    )
