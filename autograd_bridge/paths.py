"""How activations travel between the data owner and the hosts: the relayed or the chained path.

A :class:`DataPath` is what the :class:`~autograd_bridge.pipeline.Pipeline` calls for every
remote stage, forward and backward; the pipeline never branches on which one a run uses.

* ``relay`` (today's): the owner sends every remote stage its input and takes back its output,
  so every boundary crosses the owner's link.
* ``chain``: a host hands its output straight to the next stage's host and its input gradient to
  the previous one (see :mod:`autograd_bridge.chain`). The owner sends only the first remote
  stage's input and the last one's output gradient, collects the last output and the first
  input gradient, and waits on every stage for its outcome, so a failure names its stage.

``fed`` says whether the owner gives the stage its input (forward) or output gradient
(backward); ``collects`` whether the owner needs what the stage computes. On the relayed path
both are always true.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

import torch

from .errors import BridgeError, FrameError
from .frames import Frame, MessageKind
from .remote import StageClient


class DataPath(Protocol):
    """How the owner drives one remote stage's forward and backward of a micro-batch."""

    name: str

    async def start_forward(
        self,
        client: StageClient,
        x: torch.Tensor | None,
        *,
        fed: bool,
        collects: bool,
        step: int,
        micro_batch: int,
        attention_mask: torch.Tensor | None,
        train: bool = True,
    ) -> Awaitable[torch.Tensor | None]:
        """Send what the stage needs (in micro-batch order); the awaitable gives its output or None."""
        ...

    async def start_backward(
        self,
        client: StageClient,
        grad: torch.Tensor | None,
        *,
        fed: bool,
        collects: bool,
        step: int,
        micro_batch: int,
    ) -> Awaitable[torch.Tensor | None]:
        """Send what the stage needs; the awaitable gives its input gradient or None."""
        ...


class RelayPath:
    """Every boundary through the owner: a FORWARD / BACKWARD round trip per remote stage."""

    name = "relay"

    async def start_forward(
        self,
        client: StageClient,
        x: torch.Tensor | None,
        *,
        fed: bool,
        collects: bool,
        step: int,
        micro_batch: int,
        attention_mask: torch.Tensor | None,
        train: bool = True,
    ) -> Awaitable[torch.Tensor | None]:
        if x is None:
            raise BridgeError(f"no input reached stage {client.stage} for micro-batch {micro_batch}")
        return await client.start_forward(
            x, step=step, micro_batch=micro_batch, attention_mask=attention_mask, train=train
        )

    async def start_backward(
        self,
        client: StageClient,
        grad: torch.Tensor | None,
        *,
        fed: bool,
        collects: bool,
        step: int,
        micro_batch: int,
    ) -> Awaitable[torch.Tensor | None]:
        if grad is None:
            raise BridgeError(f"no gradient reached stage {client.stage} for micro-batch {micro_batch}")
        return await client.start_backward(grad, step=step, micro_batch=micro_batch)


class ChainPath:
    """Host to host: the owner feeds the chain's ends and waits on every stage's outcome."""

    name = "chain"

    async def start_forward(
        self,
        client: StageClient,
        x: torch.Tensor | None,
        *,
        fed: bool,
        collects: bool,
        step: int,
        micro_batch: int,
        attention_mask: torch.Tensor | None,
        train: bool = True,
    ) -> Awaitable[torch.Tensor | None]:
        sent: Awaitable[Frame] | None = None
        if fed:
            if x is None:
                raise BridgeError(f"no input reached stage {client.stage} for micro-batch {micro_batch}")
            tensors = {"x": x.detach()}
            if attention_mask is not None:
                tensors["attention_mask"] = attention_mask
            sent = await client.start_request(
                MessageKind.CHAIN_FORWARD,
                step=step,
                micro_batch=micro_batch,
                tensors=tensors,
                options={} if train else {"eval": "1"},
                compression=client.settings.compression,
            )
        outcome = await client.start_request(MessageKind.AWAIT_FORWARD, step=step, micro_batch=micro_batch)
        return _outcome(client, sent, outcome, "y" if collects else None, micro_batch)

    async def start_backward(
        self,
        client: StageClient,
        grad: torch.Tensor | None,
        *,
        fed: bool,
        collects: bool,
        step: int,
        micro_batch: int,
    ) -> Awaitable[torch.Tensor | None]:
        sent: Awaitable[Frame] | None = None
        if fed:
            if grad is None:
                raise BridgeError(f"no gradient reached stage {client.stage} for micro-batch {micro_batch}")
            sent = await client.start_request(
                MessageKind.CHAIN_BACKWARD,
                step=step,
                micro_batch=micro_batch,
                tensors={"grad": grad.detach()},
                compression=client.settings.compression,
            )
        outcome = await client.start_request(MessageKind.AWAIT_BACKWARD, step=step, micro_batch=micro_batch)
        # The owner's first stage may take token ids: then no gradient comes back, and none is needed.
        return _outcome(client, sent, outcome, None, micro_batch, optional="grad" if collects else None)


async def _outcome(
    client: StageClient,
    sent: Awaitable[Frame] | None,
    outcome: Awaitable[Frame],
    required: str | None,
    micro_batch: int,
    *,
    optional: str | None = None,
) -> torch.Tensor | None:
    if sent is None:
        frame = await outcome
    else:
        # Both answers come (a stage that refuses its input also fails its outcome); the outcome's
        # error says more, since it may come from further down the chain.
        took, done = await asyncio.gather(sent, outcome, return_exceptions=True)
        for answer in (done, took):
            if isinstance(answer, BaseException):
                raise answer
        assert isinstance(done, Frame)
        frame = done
    if required is not None:
        tensor = frame.tensors.get(required)
        if tensor is None:
            raise FrameError(
                f"the host of stage {client.stage} handed micro-batch {micro_batch} on to another host, but "
                f"the owner holds the next stage: its chain route does not match the plan"
            )
        return tensor
    return frame.tensors.get(optional) if optional is not None else None


PATHS: dict[str, Callable[[], DataPath]] = {"relay": RelayPath, "chain": ChainPath}


def get_path(name: str) -> DataPath:
    """The data path called ``name`` (a key of PATHS)."""
    try:
        return PATHS[name]()
    except KeyError:
        raise ValueError(f"unknown data path {name!r}; choose one of {sorted(PATHS)}") from None
