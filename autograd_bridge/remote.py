"""The data owner's side of a remote stage, and the autograd function that hides the network.

:class:`StageClient` speaks the host protocol (see :mod:`autograd_bridge.host`) over one
:class:`~autograd_bridge.transport.Connection`: requests carry a ``request_id``, a reader task
matches responses to waiting requests, so many micro-batches can be in flight at once.

:class:`RemoteStage` is an ``nn.Module`` whose forward sends the activation to the host and
returns the host's output; its backward (through :class:`RemoteStageFunction`) sends the
incoming gradient and returns the gradient of the input. A split model made of local stages and
``RemoteStage``s is one PyTorch graph: ``loss.backward()`` on the data owner drives backward
through every remote stage, and each host accumulates its own parameter gradients.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl as ssl_lib
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import BridgeTimeoutError, FrameError, PeerLostError, RemoteStageError
from .frames import Compression, Frame, FrameLimits, MessageKind, decode_frame, encode_frame
from .runtime import EventLoopThread
from .transport import Connection

_RESPONSES = {
    MessageKind.HELLO: (MessageKind.ACK,),
    MessageKind.FORWARD: (MessageKind.FORWARD_RESULT,),
    MessageKind.EVAL_FORWARD: (MessageKind.FORWARD_RESULT,),
    MessageKind.BACKWARD: (MessageKind.BACKWARD_RESULT,),
    MessageKind.OPTIMIZER_STEP: (MessageKind.ACK,),
    MessageKind.RELEASE: (MessageKind.ACK,),
    MessageKind.GET_GRADS: (MessageKind.GRADS,),
    MessageKind.GET_WEIGHTS: (MessageKind.WEIGHTS,),
    MessageKind.GET_GRAD_NORM: (MessageKind.GRAD_NORM,),
    MessageKind.PERTURB: (MessageKind.ACK,),
    MessageKind.APPLY_DIRECTIONAL: (MessageKind.ACK, MessageKind.DIRECTIONAL_RESULT),
    MessageKind.ALIGNMENT: (MessageKind.DIRECTIONAL_RESULT,),
    MessageKind.CHAIN_FORWARD: (MessageKind.FORWARD_RESULT,),
    MessageKind.CHAIN_BACKWARD: (MessageKind.BACKWARD_RESULT,),
    MessageKind.AWAIT_FORWARD: (MessageKind.FORWARD_RESULT,),
    MessageKind.AWAIT_BACKWARD: (MessageKind.BACKWARD_RESULT,),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientSettings:
    """How the data owner talks to one stage host."""

    timeout_s: float = 120.0  # a request without an answer by then fails with BridgeTimeoutError
    compression: Compression = "none"  # compression of the activations/gradients sent to the host
    limits: FrameLimits = field(default_factory=FrameLimits)  # what a response frame may be

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")


class StageClient:
    """Requests to the host of ``stage`` for run ``run_id`` over ``conn``. Use on one event loop."""

    def __init__(
        self,
        conn: Connection,
        *,
        run_id: str,
        stage: int,
        settings: ClientSettings | None = None,
    ) -> None:
        self.conn = conn
        self.run_id = run_id
        self.stage = stage
        self.settings = settings or ClientSettings()
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[MessageKind, asyncio.Future[Frame]]] = {}
        self._pending_about: dict[
            int, tuple[MessageKind, int, int]
        ] = {}  # request -> (kind, step, micro-batch)
        self._reader: asyncio.Task[None] | None = None
        self._lost: BaseException | None = None
        # Frame bytes over this connection so far, both ways (what the owner reports per step).
        self.bytes_sent = 0
        self.bytes_received = 0

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        run_id: str,
        stage: int,
        settings: ClientSettings | None = None,
        ssl: ssl_lib.SSLContext | None = None,
        token: str | None = None,
    ) -> StageClient:
        """Open a WebSocket to the host at ``url`` and check that it serves ``stage``."""
        from .websocket import connect_websocket

        conn = await connect_websocket(url, ssl=ssl, token=token)
        client = cls(conn, run_id=run_id, stage=stage, settings=settings)
        hello = await client.request(MessageKind.HELLO)
        stages = {int(s) for s in hello.options.get("stages", "").split(",") if s}
        if stage not in stages:
            await client.close()
            raise RemoteStageError(
                f"host at {url} serves stages {sorted(stages)} of run {run_id!r}, not stage {stage}",
                code="UNKNOWN_STAGE",
            )
        return client

    @property
    def lost(self) -> bool:
        """Whether the connection is gone (every later request fails at once)."""
        return self._lost is not None or self.conn.closed

    def _ensure_reader(self) -> None:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_responses())

    async def _read_responses(self) -> None:
        try:
            while True:
                data = await self.conn.recv()
                self.bytes_received += memoryview(data).nbytes
                frame = decode_frame(data, limits=self.settings.limits)
                entry = self._pending.pop(frame.request_id, None)
                self._pending_about.pop(frame.request_id, None)
                if entry is None:
                    raise FrameError(
                        f"stage {self.stage} host sent a response to unknown request {frame.request_id}"
                    )
                expected, future = entry
                if frame.kind == MessageKind.ERROR:
                    future.set_exception(
                        RemoteStageError(
                            f"stage {self.stage} host {self.conn.peer}: {frame.error_code}: "
                            f"{frame.error_message}",
                            code=frame.error_code,
                        )
                    )
                elif frame.kind not in _RESPONSES[expected]:
                    future.set_exception(
                        FrameError(f"stage {self.stage} host answered {expected.name} with {frame.kind.name}")
                    )
                elif not future.done():
                    future.set_result(frame)
        except PeerLostError as exc:
            self._fail_all(
                PeerLostError(
                    f"the host of stage {self.stage} ({self.conn.peer}) went away{self._pending_work()} with "
                    f"{len(self._pending)} request(s) pending: {exc}",
                    stage=self.stage,
                )
            )
        except FrameError as exc:
            # A peer that speaks garbage cannot be trusted with the rest of the step either.
            self._fail_all(exc)
            await self.conn.close()
        except asyncio.CancelledError:
            self._fail_all(PeerLostError(f"connection to stage {self.stage} host closed", stage=self.stage))
            raise

    def _pending_work(self) -> str:
        """' during step S micro-batch M (KIND)' for the oldest pending request, or ''."""
        if not self._pending:
            return ""
        kind, step, micro_batch = self._pending_about[min(self._pending)]
        return f" during step {step} micro-batch {micro_batch} ({kind.name})"

    def _fail_all(self, exc: BaseException) -> None:
        self._lost = exc
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        self._pending.clear()
        self._pending_about.clear()

    async def start_request(
        self,
        kind: MessageKind,
        *,
        step: int = 0,
        micro_batch: int = 0,
        tensors: Mapping[str, torch.Tensor] | None = None,
        options: Mapping[str, str] | None = None,
        compression: Compression = "none",
    ) -> Awaitable[Frame]:
        """Send a request; returns once it is on its way, with an awaitable for the response.

        Callers that must keep requests in order (micro-batches of one stage) await this in
        order and await the responses later, so the host works while the next one travels.
        """
        if self._lost is not None:
            raise PeerLostError(f"connection to the host of stage {self.stage} is gone: {self._lost}", stage=self.stage)
        self._ensure_reader()
        request_id = next(self._ids)
        frame = Frame(
            kind=kind,
            request_id=request_id,
            run_id=self.run_id,
            step=step,
            micro_batch=micro_batch,
            stage=self.stage,
            tensors=dict(tensors or {}),
            options=dict(options or {}),
        )
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (kind, future)
        self._pending_about[request_id] = (kind, step, micro_batch)
        parts = encode_frame(frame, compression=compression)
        self.bytes_sent += sum(memoryview(part).nbytes for part in parts)
        try:
            await self.conn.send(parts)
        except BaseException:
            self._pending.pop(request_id, None)
            self._pending_about.pop(request_id, None)
            raise
        return self._await_response(request_id, kind, step, micro_batch, future)

    async def _await_response(
        self, request_id: int, kind: MessageKind, step: int, micro_batch: int, future: asyncio.Future[Frame]
    ) -> Frame:
        try:
            return await asyncio.wait_for(future, self.settings.timeout_s)
        except TimeoutError as exc:
            self._pending.pop(request_id, None)
            self._pending_about.pop(request_id, None)
            raise BridgeTimeoutError(
                f"the host of stage {self.stage} ({self.conn.peer}) did not answer {kind.name} for step "
                f"{step} micro-batch {micro_batch} within {self.settings.timeout_s:g} s",
                stage=self.stage,
            ) from exc

    async def request(self, kind: MessageKind, **kwargs: Any) -> Frame:
        """Send a request and wait for its response."""
        return await (await self.start_request(kind, **kwargs))

    # -- the operations the pipeline uses -------------------------------------------------

    @staticmethod
    def _stage_tensors(
        x: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        tensors = {"x": x.detach()}
        if attention_mask is not None:
            tensors["attention_mask"] = attention_mask
        if position_ids is not None:
            tensors["position_ids"] = position_ids
        return tensors

    async def start_forward(
        self,
        x: torch.Tensor,
        *,
        step: int,
        micro_batch: int,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        train: bool = True,
    ) -> Awaitable[torch.Tensor]:
        """Send a stage input; the awaitable gives the stage output."""
        pending = await self.start_request(
            MessageKind.FORWARD if train else MessageKind.EVAL_FORWARD,
            step=step,
            micro_batch=micro_batch,
            tensors=self._stage_tensors(x, attention_mask, position_ids),
            compression=self.settings.compression,
        )
        return self._tensor_of(pending, "y")

    async def start_backward(
        self, grad: torch.Tensor, *, step: int, micro_batch: int
    ) -> Awaitable[torch.Tensor | None]:
        """Send dL/d(output); the awaitable gives dL/d(input), or None when the input was token ids."""
        pending = await self.start_request(
            MessageKind.BACKWARD,
            step=step,
            micro_batch=micro_batch,
            tensors={"grad": grad.detach()},
            compression=self.settings.compression,
        )
        return self._optional_tensor_of(pending, "grad")

    async def _tensor_of(self, pending: Awaitable[Frame], name: str) -> torch.Tensor:
        frame = await pending
        tensor = frame.tensors.get(name)
        if tensor is None:
            raise FrameError(f"stage {self.stage} host's {frame.kind.name} lacks tensor {name!r}")
        return tensor

    async def _optional_tensor_of(self, pending: Awaitable[Frame], name: str) -> torch.Tensor | None:
        return (await pending).tensors.get(name)

    async def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Run the remote stage on ``x`` and return its output."""
        return await (await self.start_forward(x, **kwargs))

    async def backward(self, grad: torch.Tensor, *, step: int, micro_batch: int) -> torch.Tensor | None:
        """Backpropagate ``grad`` through the remote stage; returns the input gradient."""
        return await (await self.start_backward(grad, step=step, micro_batch=micro_batch))

    async def optimizer_step(self, step: int, lr: float | None = None, grad_scale: float | None = None) -> None:
        """Ask the host to step its optimizer (and zero its gradients), its gradients times ``grad_scale`` first."""
        options = {} if lr is None else {"lr": repr(float(lr))}
        if grad_scale is not None:
            options["grad_scale"] = repr(float(grad_scale))
        await self.request(MessageKind.OPTIMIZER_STEP, step=step, options=options)

    async def grad_sq_norm(self, step: int) -> float:
        """The sum of the squares of every gradient the host's stages hold (float64)."""
        frame = await self.request(MessageKind.GET_GRAD_NORM, step=step)
        sq = frame.tensors.get("sq")
        if sq is None or sq.numel() != 1 or not torch.isfinite(sq).all() or float(sq) < 0:
            raise FrameError(f"stage {self.stage} host sent no usable gradient norm")
        return float(sq.double())

    async def release(self, step: int) -> None:
        """Ask the host to drop every micro-batch state of ``step`` (after a failed step)."""
        await self.request(MessageKind.RELEASE, step=step)

    async def named_grads(self) -> dict[str, torch.Tensor]:
        """The host's parameter gradients of this stage, by whole-model parameter name."""
        return dict((await self.request(MessageKind.GET_GRADS)).tensors)

    async def named_weights(self) -> dict[str, torch.Tensor]:
        """The host's parameters of this stage, by whole-model parameter name."""
        return dict((await self.request(MessageKind.GET_WEIGHTS)).tensors)

    async def close(self) -> None:
        """Close the connection; pending requests fail with PeerLostError."""
        await self.conn.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


class RemoteStageFunction(torch.autograd.Function):
    """Autograd node for one remote stage: forward and backward each make one round trip.

    ``anchor`` is an empty tensor that requires grad, so the node is part of the graph (and its
    backward runs) even when the stage input is token ids, which carry no gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        anchor: torch.Tensor,
        stage: RemoteStage,
        micro_batch: int,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.stage = stage
        ctx.micro_batch = micro_batch
        ctx.input_is_float = x.is_floating_point()
        return stage.runtime.run(
            stage.client.forward(
                x,
                step=stage.step,
                micro_batch=micro_batch,
                attention_mask=attention_mask,
                position_ids=position_ids,
            )
        )

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        stage: RemoteStage = ctx.stage
        grad_in = stage.runtime.run(
            stage.client.backward(grad.contiguous(), step=stage.step, micro_batch=ctx.micro_batch)
        )
        return (grad_in if ctx.input_is_float else None, None, None, None, None, None)


class RemoteStage(nn.Module):
    """A stage hosted elsewhere, used like a local module inside the data owner's graph."""

    def __init__(self, client: StageClient, runtime: EventLoopThread) -> None:
        super().__init__()
        self.client = client
        self.runtime = runtime
        self.step = 0
        self._micro_batches = itertools.count()
        # Not a Parameter: it only makes the autograd node exist for token-id inputs.
        self._anchor = torch.empty(0, requires_grad=True)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.runtime.run(
                self.client.forward(
                    x,
                    step=self.step,
                    micro_batch=next(self._micro_batches),
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    train=False,
                )
            )
        out: torch.Tensor = RemoteStageFunction.apply(
            x, self._anchor, self, next(self._micro_batches), attention_mask, position_ids
        )
        return out

    def optimizer_step(self, lr: float | None = None) -> None:
        """Step the host's optimizer for the current step, then move on to the next step."""
        self.runtime.run(self.client.optimizer_step(self.step, lr))
        self.step += 1
        self._micro_batches = itertools.count()

    def remote_grads(self) -> dict[str, torch.Tensor]:
        """The host's parameter gradients (for checks against an unsplit model)."""
        return self.runtime.run(self.client.named_grads())
