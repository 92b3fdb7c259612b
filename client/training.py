"""The data owner's training loop over a pipeline, whatever carries its frames.

The owner keeps the first and the last stage; :class:`~autograd_bridge.pipeline.Pipeline`
reaches the middle ones. This module only decides which batches go in and in which
order (``dataset.stream``, so round ``r`` with ``s`` steps per round resumes at batch
``r * s``), steps the optimizers, and measures validation perplexity.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from autograd_bridge.pipeline import Pipeline

from .data import OwnerDataset

OptimizerName = Literal["adamw", "sgd"]


def trainable_parameters(stages: Iterable[nn.Module]) -> list[nn.Parameter]:
    """The parameters of ``stages`` that require grad, each once (a tied head is one tensor)."""
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    for stage in stages:
        for param in stage.parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


def build_local_optimizer(
    stages: Iterable[nn.Module],
    *,
    optimizer: OptimizerName = "adamw",
    lr: float,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """The optimizer over the owner's own stages, built like a StageHost builds its own.

    ``weight_decay`` defaults to 0 as on the hosts (torch's AdamW default of 0.01 would
    make the owner's stages train differently from the hosted ones).
    """
    params = trainable_parameters(stages)
    if not params:
        raise ValueError("the owner's stages have no trainable parameters; unfreeze them or add LoRA adapters")
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', not {optimizer!r}")


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
    """Run ``steps`` optimizer steps on batches ``start, start + 1, ...`` of ``dataset.stream``.

    Each step is one forward and backward of a batch through ``pipeline``, then a step of
    ``local_optimizer`` (the owner's stages) and of every host's optimizer, at ``lr``
    when given. Returns the mean token loss of each step's batch, before its update.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    losses: list[float] = []
    for batch in itertools.islice(dataset.stream(batch_size, start=start), steps):
        result = pipeline.train_step(batch.input_ids, batch.attention_mask, batch.labels)
        pipeline.optimizer_step(local_optimizer, lr)
        losses.append(result.loss)
    return losses


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
