"""The data owner's training step over local and remote stages, with micro-batching.

Two ways to drive a split model:

* :class:`SplitModel` chains stages as one ``nn.Module``; remote stages are
  :class:`~autograd_bridge.remote.RemoteStage`s, so ``loss.backward()`` drives backward through
  every host. One micro-batch at a time; the simplest way to use the bridge.
* :class:`Pipeline` splits a batch into M micro-batches that flow through the stages
  concurrently (GPipe fill-drain or 1F1B). Each stage sees micro-batches in the same order as a
  sequential run would, forward and backward, so gradients are accumulated in the same order
  and the result equals M sequential micro-batch steps bit for bit (and the whole batch to fp32
  rounding).

Local stages compute on one owner thread; remote stages are :class:`StageClient`s. Between
stages the activation is detached and re-attached, like a host does, so each stage's backward
is ``torch.autograd.backward(output, grad_output)``.

:class:`Pipeline` also times where its train steps go: per stage, the seconds the owner waits
for that stage (see :meth:`Pipeline.stage_seconds`), and the whole step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar, cast

import torch
from torch import nn

from .errors import BridgeError
from .partition import causal_lm_loss
from .paths import PATHS, get_path
from .remote import RemoteStage, StageClient
from .runtime import EventLoopThread

T = TypeVar("T")

Schedule = Literal["gpipe", "1f1b"]


class SplitModel(nn.Module):
    """Stages (local modules or RemoteStages) chained into one module that returns logits."""

    def __init__(self, stages: Sequence[nn.Module]) -> None:
        super().__init__()
        if not stages:
            raise ValueError("a SplitModel needs at least one stage")
        self.stages = nn.ModuleList(stages)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = input_ids
        for stage in self.stages:
            h = stage(h, attention_mask=attention_mask, position_ids=position_ids)
        return h

    def remote_stages(self) -> list[RemoteStage]:
        return [s for s in self.stages if isinstance(s, RemoteStage)]

    def step_remote(self, lr: float | None = None) -> None:
        """Step every remote host's optimizer (the local optimizer is the caller's)."""
        for stage in self.remote_stages():
            stage.optimizer_step(lr)


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineSettings:
    """How the data owner schedules a step."""

    micro_batches: int = 1  # M: the batch is split into this many micro-batches (along dim 0)
    schedule: Schedule = "1f1b"  # gpipe: all forwards, then all backwards; 1f1b: bounded in-flight
    path: str = "relay"  # relay: every boundary through the owner; chain: host to host (autograd_bridge.paths)

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {sorted(PATHS)}, not {self.path!r}")
        if self.micro_batches < 1:
            raise ValueError("micro_batches must be at least 1")
        if self.schedule not in ("gpipe", "1f1b"):
            raise ValueError(f"schedule must be 'gpipe' or '1f1b', not {self.schedule!r}")


def _optimizer_parameters(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """The parameters ``optimizer`` steps, each once."""
    if optimizer is None:
        return []
    seen: dict[int, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen.setdefault(id(p), p)
    return list(seen.values())


@dataclass(frozen=True, slots=True)
class StepResult:
    loss: float  # mean token loss over the whole batch
    tokens: int  # tokens that counted (labels != -100 after the shift)
    output_norm: float = 0.0  # mean L2 norm of the logits per position: a divergence signal (Photon)


class _Turnstile:
    """Lets micro-batches through in order 0, 1, 2, ... (one per phase and stage)."""

    def __init__(self) -> None:
        self._next = 0
        self._changed = asyncio.Condition()

    async def wait_for(self, turn: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._next == turn)

    async def advance(self) -> None:
        async with self._changed:
            self._next += 1
            self._changed.notify_all()


_Stage = nn.Module | StageClient


class Pipeline:
    """Runs training steps of a split model whose stages are local modules or StageClients.

    ``stages`` is the whole chain in order. For the U-shape the first and last are local
    modules (the data owner's) and the middle ones StageClients. The loss is always computed
    here, so labels never leave this process.
    """

    def __init__(
        self,
        stages: Sequence[_Stage],
        runtime: EventLoopThread,
        settings: PipelineSettings | None = None,
    ) -> None:
        if not stages:
            raise ValueError("a Pipeline needs at least one stage")
        self.stages = list(stages)
        self.runtime = runtime
        self.settings = settings or PipelineSettings()
        self.path = get_path(self.settings.path)
        self.step = 0
        self._compute_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="titanic-owner")
        # Timing since reset_stage_times(): seconds per stage and per whole step, summed over steps.
        self.reset_stage_times()

    @property
    def remote(self) -> list[StageClient]:
        return [s for s in self.stages if isinstance(s, StageClient)]

    # -- public API (synchronous) ---------------------------------------------------------

    def train_step(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor
    ) -> StepResult:
        """Forward and backward of one batch; leaves gradients on every stage (local and remote)."""
        return self.runtime.run(self._train_step(input_ids, attention_mask, labels))

    def optimizer_step(
        self, local_optimizer: torch.optim.Optimizer | None, lr: float | None = None, clip_norm: float | None = None
    ) -> float | None:
        """Step the local optimizer and every remote host's, then start the next step.

        With ``clip_norm``, first scale every stage's gradients (local and remote) so that
        their joint L2 norm is at most ``clip_norm``, as ``torch.nn.utils.clip_grad_norm_``
        does on the whole model; returns that norm before clipping (None without clipping).
        """
        began = time.perf_counter()
        local = _optimizer_parameters(local_optimizer)
        norm = scale = None
        if clip_norm is not None:
            norm = self._grad_norm(local)
            # As torch's clip_grad_norm_: the factor max/(norm + 1e-6), never above 1.
            scale = min(1.0, clip_norm / (norm + 1e-6))
            with torch.no_grad():
                for p in local:
                    if p.grad is not None:
                        p.grad.mul_(scale)
        if local_optimizer is not None:
            if lr is not None:
                for group in local_optimizer.param_groups:
                    group["lr"] = lr
            local_optimizer.step()
            local_optimizer.zero_grad(set_to_none=True)

        async def step_all() -> None:
            await asyncio.gather(*(c.optimizer_step(self.step, lr, scale) for c in self.remote))

        self.runtime.run(step_all())
        self.step += 1
        self._step_total += time.perf_counter() - began
        return norm

    def _grad_norm(self, local: Sequence[torch.Tensor]) -> float:
        """The L2 norm of every gradient of the pipeline: the owner's stages' and each host's."""
        sq = sum(float(p.grad.detach().double().pow(2).sum()) for p in local if p.grad is not None)

        async def remote_sq() -> list[float]:
            return list(await asyncio.gather(*(c.grad_sq_norm(self.step) for c in self.remote)))

        return math.sqrt(sq + sum(self.runtime.run(remote_sq())))

    def eval_loss(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor
    ) -> StepResult:
        """Forward only (no state kept anywhere): the mean token loss of a batch."""
        return self.runtime.run(self._eval(input_ids, attention_mask, labels))

    def close(self) -> None:
        self._compute_thread.shutdown(wait=False, cancel_futures=True)

    # -- timing -------------------------------------------------------------------------------

    def stage_seconds(self) -> list[float]:
        """Per stage, the mean seconds per train step the owner waited for it (0.0 before any step).

        A remote stage's time runs from sending each FORWARD or BACKWARD request to its reply:
        both transfers plus the host's compute and queueing. A local stage's time is its own
        compute on the owner's thread (not its wait for that thread); the last stage's time
        includes the loss, forward and backward, which the owner computes right after it.
        Optimizer steps are not in any stage's time. Only steps that succeeded since
        :meth:`reset_stage_times` count. With one micro-batch the stages run one after another,
        so the times add up to at most :meth:`step_seconds`; with several micro-batches in flight
        each request's wait is summed, so overlapping stages can add up to more.
        """
        steps = max(self._timed_steps, 1)
        return [total / steps for total in self._stage_total]

    def step_seconds(self) -> float:
        """Mean wall seconds of a whole step: :meth:`train_step` plus the :meth:`optimizer_step` after it."""
        return self._step_total / max(self._timed_steps, 1)

    @property
    def timed_steps(self) -> int:
        """Train steps counted in :meth:`stage_seconds` and :meth:`step_seconds`."""
        return self._timed_steps

    def reset_stage_times(self) -> None:
        """Start timing afresh (e.g. at the start of a round)."""
        self._stage_total = [0.0] * len(self.stages)
        self._step_total = 0.0
        self._timed_steps = 0

    # -- the schedule ---------------------------------------------------------------------

    async def _local(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._compute_thread, fn)

    async def _local_timed(self, fn: Callable[[], T], spent: list[float], s: int) -> T:
        """:meth:`_local`, adding the seconds ``fn`` itself ran (not its wait for the thread) to ``spent[s]``."""

        def timed() -> tuple[T, float]:
            began = time.perf_counter()
            value = fn()
            return value, time.perf_counter() - began

        value, seconds = await self._local(timed)
        spent[s] += seconds
        return value

    @staticmethod
    def _count_tokens(labels: torch.Tensor) -> int:
        return int((labels[:, 1:] != -100).sum())

    def _split(self, t: torch.Tensor | None) -> list[torch.Tensor | None]:
        m = self.settings.micro_batches
        if t is None:
            return [None] * m
        if t.shape[0] < m:
            raise ValueError(f"batch of {t.shape[0]} rows cannot be split into {m} micro-batches")
        return list(torch.tensor_split(t, m, dim=0))

    async def _train_step(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor
    ) -> StepResult:
        began = time.perf_counter()
        step = self.step
        m_count = self.settings.micro_batches
        num_items = self._count_tokens(labels)
        if num_items == 0:
            raise ValueError("the batch has no label tokens to learn from (all -100)")
        ids_mb = self._split(input_ids)
        mask_mb = self._split(attention_mask)
        labels_mb = self._split(labels)
        n = len(self.stages)
        fwd_turn = [_Turnstile() for _ in range(n + 1)]  # +1: the loss
        bwd_turn = [_Turnstile() for _ in range(n + 1)]
        forwards_done = asyncio.Event()
        done_count = 0
        # 1F1B keeps at most one micro-batch per stage in flight; GPipe all of them.
        in_flight = asyncio.Semaphore(n if self.settings.schedule == "1f1b" else m_count)
        admit = _Turnstile()
        losses: list[float] = [0.0] * m_count
        norms: list[float] = [0.0] * m_count  # per micro-batch: mean L2 norm of the logits per position
        spent = [0.0] * n  # this step's seconds per stage; counted only if the step succeeds

        async def micro_batch(m: int) -> None:
            nonlocal done_count
            await admit.wait_for(m)
            await in_flight.acquire()
            await admit.advance()
            try:
                mask = mask_mb[m]
                saved: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * (n + 1)
                h: torch.Tensor | None = cast(torch.Tensor, ids_mb[m])
                for s, stage in enumerate(self.stages):
                    h = await self._stage_forward(s, stage, h, mask, step, m, fwd_turn[s], saved, spent)
                labels_m = cast(torch.Tensor, labels_mb[m])
                await fwd_turn[n].wait_for(m)
                if h is None:
                    raise BridgeError(
                        f"the last stage's output for micro-batch {m} did not come back to the owner"
                    )
                logits_in = h.detach().requires_grad_(True)
                loss = await self._local_timed(
                    lambda: causal_lm_loss(logits_in, labels_m, num_items=num_items), spent, n - 1
                )
                await fwd_turn[n].advance()
                saved[n] = (logits_in, loss)
                losses[m] = float(loss.detach())
                norms[m] = float(logits_in.detach().float().norm(dim=-1).mean())
                done_count += 1
                if done_count == m_count:
                    forwards_done.set()
                if self.settings.schedule == "gpipe":
                    await forwards_done.wait()
                grad: torch.Tensor | None = None
                for s in range(n, -1, -1):
                    grad = await self._stage_backward(s, grad, step, m, bwd_turn[s], saved, spent)
            finally:
                in_flight.release()

        tasks = [asyncio.ensure_future(micro_batch(m)) for m in range(m_count)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._release_remote(step)
            raise
        for s, seconds in enumerate(spent):
            self._stage_total[s] += seconds
        self._step_total += time.perf_counter() - began
        self._timed_steps += 1
        return StepResult(loss=sum(losses), tokens=num_items, output_norm=sum(norms) / m_count)

    async def _stage_forward(
        self,
        s: int,
        stage: _Stage,
        h: torch.Tensor | None,
        mask: torch.Tensor | None,
        step: int,
        m: int,
        turn: _Turnstile,
        saved: list[tuple[torch.Tensor, torch.Tensor] | None],
        spent: list[float],
    ) -> torch.Tensor | None:
        """Stage ``s``'s forward of micro-batch ``m``; None when its output went on to another host."""
        await turn.wait_for(m)
        if isinstance(stage, StageClient):
            began = time.perf_counter()
            try:
                pending = await self.path.start_forward(
                    stage, h, fed=self._owner_feeds(s), collects=self._owner_collects(s), step=step,
                    micro_batch=m, attention_mask=mask,
                )  # fmt: skip
            finally:
                await turn.advance()
            y = await pending
            spent[s] += time.perf_counter() - began
            return y

        module = stage
        if h is None:
            raise BridgeError(f"stage {s - 1}'s output for micro-batch {m} did not come back to the owner")

        def run() -> tuple[torch.Tensor, torch.Tensor]:
            inputs = h.detach().requires_grad_(True) if h.is_floating_point() else h
            with torch.enable_grad():
                return inputs, module(inputs, attention_mask=mask)

        try:
            inputs, outputs = await self._local_timed(run, spent, s)
        finally:
            await turn.advance()
        saved[s] = (inputs, outputs)
        return outputs.detach()

    async def _stage_backward(
        self,
        s: int,
        grad: torch.Tensor | None,
        step: int,
        m: int,
        turn: _Turnstile,
        saved: list[tuple[torch.Tensor, torch.Tensor] | None],
        spent: list[float],
    ) -> torch.Tensor | None:
        await turn.wait_for(m)
        stage = self.stages[s] if s < len(self.stages) else None
        if isinstance(stage, StageClient):
            began = time.perf_counter()
            try:
                pending = await self.path.start_backward(
                    stage, grad, fed=self._owner_collects(s), collects=s > 0 and self._owner_feeds(s),
                    step=step, micro_batch=m,
                )  # fmt: skip
            finally:
                await turn.advance()
            grad_in = await pending
            spent[s] += time.perf_counter() - began
            return grad_in
        entry = saved[s]
        saved[s] = None
        if entry is None:
            raise BridgeError(f"stage {s} has no saved forward for micro-batch {m}")
        inputs, outputs = entry

        def run() -> torch.Tensor | None:
            if not outputs.requires_grad:
                # A frozen first stage (LoRA, embeddings only): token ids in, nothing to train.
                return None
            torch.autograd.backward(outputs, grad)
            return inputs.grad

        try:
            # s == n is the loss's backward, the owner's work right after the last stage's.
            return await self._local_timed(run, spent, min(s, len(self.stages) - 1))
        finally:
            await turn.advance()

    def _owner_feeds(self, s: int) -> bool:
        """Whether the owner gives remote stage ``s`` its input (the stage before it is the owner's)."""
        return s == 0 or not isinstance(self.stages[s - 1], StageClient)

    def _owner_collects(self, s: int) -> bool:
        """Whether the owner takes remote stage ``s``'s output (the next stage, or the loss, is the owner's)."""
        return s == len(self.stages) - 1 or not isinstance(self.stages[s + 1], StageClient)

    async def _release_remote(self, step: int) -> None:
        async def release(client: StageClient) -> None:
            # A host that fails here is the one that broke the step; nothing is left to free there.
            with contextlib.suppress(BridgeError):
                await client.release(step)

        await asyncio.gather(*(release(c) for c in self.remote))

    async def _eval(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor
    ) -> StepResult:
        num_items = self._count_tokens(labels)
        h: torch.Tensor | None = input_ids
        for s, stage in enumerate(self.stages):
            if isinstance(stage, StageClient):
                pending = await self.path.start_forward(
                    stage, h, fed=self._owner_feeds(s), collects=self._owner_collects(s), step=self.step,
                    micro_batch=0, attention_mask=attention_mask, train=False,
                )  # fmt: skip
                h = await pending
            else:
                if h is None:
                    raise BridgeError(f"stage {s - 1}'s output did not come back to the owner")

                def run(module: nn.Module = stage, inp: torch.Tensor = h) -> torch.Tensor:
                    with torch.no_grad():
                        return module(inp, attention_mask=attention_mask)

                h = await self._local(run)
        if h is None:
            raise BridgeError("the last stage's output did not come back to the owner")
        logits = h
        loss = await self._local(lambda: causal_lm_loss(logits, labels))
        return StepResult(loss=float(loss), tokens=num_items)
