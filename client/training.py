"""The data owner's training loop over a pipeline, whatever carries its frames.

The owner keeps the first and the last stage; :class:`~autograd_bridge.pipeline.Pipeline`
reaches the middle ones. This module only decides which batches go in and in which
order (``dataset.stream``, so round ``r`` with ``s`` steps per round resumes at batch
``r * s``), hands each batch to the run's training method, records every step, and
measures validation perplexity.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from autograd_bridge.methods import TrainingMethod, get_method
from autograd_bridge.optim import build_optimizer, trainable_parameters
from autograd_bridge.pipeline import Pipeline
from proto.messages import PeerBytes, StepRecord

from .data import OwnerDataset


def build_local_optimizer(
    stages: Iterable[nn.Module],
    *,
    optimizer: str = "adamw",
    lr: float,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """The optimizer over the owner's own stages, from the registry the stage hosts use too.

    ``weight_decay`` defaults to 0 as on the hosts (torch's AdamW default of 0.01 would
    make the owner's stages train differently from the hosted ones).
    """
    params = trainable_parameters(stages)
    if not params:
        raise ValueError("the owner's stages have no trainable parameters; unfreeze them or add LoRA adapters")
    return build_optimizer(optimizer, params, lr=lr, weight_decay=weight_decay)


def run_steps(
    pipeline: Pipeline,
    dataset: OwnerDataset,
    *,
    steps: int,
    batch_size: int,
    start: int,
    local_optimizer: torch.optim.Optimizer | None,
    lr: float | None = None,
    method: TrainingMethod | None = None,
    peers: Sequence[Any] = (),
    schedule: Callable[[int], float] | None = None,
    clip_norm: float | None = None,
    on_step: Callable[[int, StepRecord], None] | None = None,
    time_budget_s: float | None = None,
    after_s: Callable[[float], float] | None = None,
) -> list[StepRecord]:
    """Run ``steps`` optimizer steps on batches ``start, start + 1, ...`` of ``dataset.stream``.

    With ``time_budget_s`` the loop stops on time instead (``steps`` is then the most it
    runs): it begins another step only while the time spent plus half a step (the mean so
    far) plus ``after_s(mean step seconds)`` (what the caller still does after the loop,
    e.g. its evaluation) is within the budget, so the round ends as near the budget as
    whole steps allow. It always runs at least one step.

    ``method`` (backprop when None) trains each batch through ``pipeline`` and steps
    ``local_optimizer`` (the owner's stages) and every host's optimizer, at ``schedule(i)``
    for batch ``i`` of the stream when given, else at ``lr``; ``clip_norm`` bounds the joint
    gradient norm of every stage. ``on_step(i, record)`` follows step ``i`` of this call.
    Each record holds the step's mean token loss (before its update), its tokens, its wall
    time, and the bridge bytes to and from each of ``peers`` (StageClients) during it.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    method = method or get_method("backprop")
    if time_budget_s is not None and not (math.isfinite(time_budget_s) and time_budget_s > 0):
        raise ValueError(f"time_budget_s must be a finite number > 0, got {time_budget_s}")
    records: list[StepRecord] = []
    # An epoch's last, smaller batch may have fewer rows than the pipeline's micro-batches: leave it out then.
    stream = dataset.stream(batch_size, start=start, drop_last=pipeline.settings.micro_batches > 1)
    loop_began = time.perf_counter()
    for index, batch in enumerate(itertools.islice(stream, steps), start=start):
        if time_budget_s is not None and records:
            spent = time.perf_counter() - loop_began
            mean = spent / len(records)
            if spent + mean / 2 + (after_s(mean) if after_s is not None else 0.0) >= time_budget_s:
                break
        before = [(p.bytes_sent, p.bytes_received) for p in peers]
        began = time.perf_counter()
        step_lr = schedule(index) if schedule is not None else lr
        outcome = method.step(pipeline, batch, local_optimizer, lr=step_lr, clip_norm=clip_norm)
        seconds = time.perf_counter() - began
        traffic = tuple(
            PeerBytes(stage=p.stage, sent=p.bytes_sent - sent, received=p.bytes_received - received)
            for p, (sent, received) in zip(peers, before, strict=True)
        )
        record = StepRecord(
            loss=outcome.loss, tokens=outcome.tokens, seconds=seconds, peers=traffic, lr=step_lr or 0.0,
            grad_norm=outcome.grad_norm or 0.0, output_norm=outcome.output_norm,
        )  # fmt: skip
        records.append(record)
        if on_step is not None:
            on_step(len(records) - 1, record)
    return records


def train_steps(
    pipeline: Pipeline,
    dataset: OwnerDataset,
    *,
    steps: int,
    batch_size: int,
    start: int,
    local_optimizer: torch.optim.Optimizer | None,
    lr: float | None = None,
) -> list[float]:
    """The losses of :func:`run_steps` with backprop: one per step, before its update."""
    records = run_steps(
        pipeline, dataset, steps=steps, batch_size=batch_size, start=start, local_optimizer=local_optimizer, lr=lr
    )
    return [r.loss for r in records]


def evaluate(pipeline: Pipeline, dataset: OwnerDataset, batch_size: int) -> tuple[float, float]:
    """``(mean token loss, perplexity)`` over ``dataset``'s validation split, forward only.

    Batches are weighted by the tokens their loss counts, so the result does not depend on
    ``batch_size``.
    """
    if dataset.num_validation == 0:
        raise ValueError("the dataset holds out no validation sequences; set val_fraction > 0")
    total_loss = 0.0
    total_tokens = 0
    for batch in dataset.validation_batches(batch_size):
        if batch.num_targets == 0:
            continue
        result = pipeline.eval_loss(batch.input_ids, batch.attention_mask, batch.labels)
        total_loss += result.loss * result.tokens
        total_tokens += result.tokens
    if total_tokens == 0:
        raise ValueError("the validation split has no label tokens; use longer sequences")
    mean = total_loss / total_tokens
    return mean, math.exp(mean)
