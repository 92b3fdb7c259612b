"""The data owner's side of a run: one round of training and evaluation per ``Train`` command.

The owner keeps its own stages (the first and the last, U-shape) and reaches the middle ones
over the bridge with the tokens the server gave it. An :class:`OwnerTrainer` lives as long as
the run: the dataset, the connections and the local optimizer's state carry over from round
to round, so round ``r`` continues exactly where round ``r - 1`` stopped (batch
``(r - 1) * steps`` of the owner's stream).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proto.messages import PeerEndpoint

from .errors import HostingError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundSettings:
    """One round of training as the server asked for it (validated: it came over the network)."""

    round: int  # 1-based round number
    steps: int  # optimizer steps this round
    start: int  # first batch of the owner's stream this round
    batch_size: int  # sequences per step
    seq_len: int  # tokens per sequence
    micro_batches: int  # micro-batches per step in the pipeline
    lr: float  # learning rate of every stage
    seed: int  # data split and batch order
    val_fraction: float  # held-out share of the owner's sequences
    eval_batch_size: int  # sequences per validation batch
    tokenizer: str  # name or path of the tokenizer to load here

    @classmethod
    def from_json(cls, text: str) -> RoundSettings:
        """Parse and check the Train command's settings."""
        raw = _json_object(text, "training settings")
        values: dict[str, Any] = {}
        for name in ("round", "steps", "start", "batch_size", "seq_len", "micro_batches", "seed", "eval_batch_size"):
            value = raw.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise HostingError(f"training setting {name!r} must be an integer >= 0, got {value!r}")
            values[name] = value
        for name in ("lr", "val_fraction"):
            value = raw.get(name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise HostingError(f"training setting {name!r} must be a finite number, got {value!r}")
            values[name] = float(value)
        if not isinstance(raw.get("tokenizer"), str) or not raw["tokenizer"]:
            raise HostingError("training setting 'tokenizer' must name a tokenizer")
        values["tokenizer"] = raw["tokenizer"]
        if values["batch_size"] < 1 or values["micro_batches"] < 1 or values["eval_batch_size"] < 1:
            raise HostingError("batch_size, micro_batches and eval_batch_size must be at least 1")
        return cls(**values)


def _json_object(text: str, what: str) -> dict[str, Any]:
    """A command's settings: a JSON object, or a HostingError saying what was wrong."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise HostingError(f"the server sent {what} that are not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise HostingError(f"the server's {what} must be a JSON object")
    return raw


class OwnerTrainer:
    """The owner's pipeline for one run: local end stages plus the hosts' middle stages."""

    def __init__(
        self,
        run_id: str,
        stages: Mapping[int, Any],
        peers: Sequence[PeerEndpoint],
        data: Path,
        settings: RoundSettings,
        optimizer: Any,
    ) -> None:
        from autograd_bridge.models import load_tokenizer
        from autograd_bridge.pipeline import Pipeline, PipelineSettings
        from autograd_bridge.remote import StageClient
        from autograd_bridge.runtime import EventLoopThread

        from .data import DataSettings, OwnerDataset

        self.run_id = run_id
        self.settings = settings
        remote = {p.partition: p for p in peers}
        num_stages = len(stages) + len(remote)
        missing = [k for k in range(num_stages) if k not in stages and k not in remote]
        if missing or 0 not in stages or num_stages - 1 not in stages:
            raise HostingError(f"run {run_id}: the owner needs the first and last stage and a host for each other one")
        try:
            tokenizer = load_tokenizer(settings.tokenizer)
        except ValueError as exc:
            raise HostingError(str(exc)) from exc
        data_settings = DataSettings(seq_len=settings.seq_len, val_fraction=settings.val_fraction, seed=settings.seed)
        self.dataset = OwnerDataset.from_path(data, tokenizer, settings=data_settings)
        self.runtime = EventLoopThread(name=f"titanic-train-{run_id}")
        chain: list[Any] = []
        self.clients: list[Any] = []
        for k in range(num_stages):
            if k in stages:
                chain.append(stages[k].train())
            else:
                peer = remote[k]
                client = self.runtime.run(StageClient.connect(peer.url, run_id=run_id, stage=k, token=peer.token))
                self.clients.append(client)
                chain.append(client)
        self.local_stages = [stages[k] for k in sorted(stages)]
        pipeline_settings = PipelineSettings(micro_batches=settings.micro_batches)
        self.pipeline = Pipeline(chain, self.runtime, pipeline_settings)
        # The optimizer of the owner's own stages (None: they train nothing), built by
        # build_owner_optimizer when the run is prepared, over stages tie_owner_stages tied,
        # so that a handed-over optimizer state can be loaded before round 1.
        self.optimizer: Any = optimizer

    def train_round(self, settings: RoundSettings) -> dict[str, Any]:
        """Train ``settings.steps`` steps, then evaluate; the metrics the server records (blocking)."""
        from .training import evaluate, train_steps

        began = time.perf_counter()
        self.pipeline.reset_stage_times()  # this round's steps only
        losses = train_steps(
            self.pipeline,
            self.dataset,
            steps=settings.steps,
            batch_size=settings.batch_size,
            start=settings.start,
            local_optimizer=self.optimizer,
            lr=settings.lr,
        )
        # Per stage, the owner's wait per step (transfers + the host's compute), before evaluation adds none.
        stage_seconds = [round(x, 6) for x in self.pipeline.stage_seconds()]
        step_seconds = round(self.pipeline.step_seconds(), 6)
        val_loss, ppl = evaluate(self.pipeline, self.dataset, settings.eval_batch_size)
        val_tokens = sum(b.num_targets for b in self.dataset.validation_batches(settings.eval_batch_size))
        return {
            "losses": [round(x, 7) for x in losses],
            "val_loss": val_loss,
            "ppl": ppl,
            "val_tokens": val_tokens,  # weight of this owner's loss in the all-owner perplexity
            "samples": settings.steps * settings.batch_size,  # sequences trained this round
            "data_samples": self.dataset.num_samples,  # training sequences held: the FedAvg weight
            "seconds": time.perf_counter() - began,
            "stage_seconds": stage_seconds,  # per stage, mean seconds per step this round
            "step_seconds": step_seconds,  # mean seconds of a whole step (forward, backward, optimizer)
        }

    def close(self) -> None:
        """Close the connections and the pipeline (blocking)."""
        for client in self.clients:
            try:
                self.runtime.run(client.close(), timeout=10)
            except Exception as exc:  # closing is best effort: the host may be gone already
                log.debug("closing a stage client: %s", exc)
        self.pipeline.close()
        self.runtime.close()


@dataclass(frozen=True, slots=True, kw_only=True)
class PrepareSettings:
    """How a run's stages train, from the PrepareRun command (validated: network input)."""

    lora: bool  # True: add LoRA adapters and train only them
    optimizer: str  # every stage's optimizer here: "adamw" or "sgd"
    lora_r: int  # adapter rank
    lora_alpha: int  # adapter scale numerator
    lora_targets: tuple[str, ...]  # module names to adapt; empty: the family's default
    seed: int  # adapters of partition k start from seed * 1000 + k on every copy

    @classmethod
    def from_json(cls, text: str) -> PrepareSettings:
        """Parse and check the PrepareRun command's settings."""
        raw = _json_object(text, "run settings")
        if raw.get("finetune") not in ("full", "lora"):
            raise HostingError("the run settings must be a JSON object with finetune 'full' or 'lora'")
        ints = {}
        for name in ("lora_r", "lora_alpha", "seed"):
            value = raw.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise HostingError(f"run setting {name!r} must be an integer >= 0, got {value!r}")
            ints[name] = value
        targets = raw.get("lora_targets", [])
        if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
            raise HostingError("run setting 'lora_targets' must be a list of module names")
        if raw["finetune"] == "lora" and ints["lora_r"] < 1:
            raise HostingError("run setting 'lora_r' must be at least 1 for LoRA")
        optimizer = raw.get("optimizer", "adamw")  # servers before the setting existed ran AdamW
        if optimizer not in ("adamw", "sgd"):
            raise HostingError(f"run setting 'optimizer' must be 'adamw' or 'sgd', got {optimizer!r}")
        return cls(lora=raw["finetune"] == "lora", optimizer=optimizer, lora_targets=tuple(targets), **ints)


def adapt_stages(stages: Mapping[int, Any], settings: PrepareSettings) -> None:
    """Add LoRA adapters to every stage, seeded per partition so every copy of it starts equal.

    A stage without decoder blocks (only the embeddings, say) has nothing LoRA adapts: it is
    frozen and trains nothing.
    """
    import torch

    from autograd_bridge.lora import add_lora

    for index in sorted(stages):
        spec = stages[index].spec
        if spec.layer_end <= spec.layer_start:
            stages[index].requires_grad_(False)
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed * 1000 + index)
            try:
                add_lora(
                    stages[index],
                    r=settings.lora_r,
                    alpha=settings.lora_alpha,
                    targets=list(settings.lora_targets) or None,
                )
            except ValueError as exc:
                raise HostingError(f"partition {index}: {exc}") from exc


def trained_tensors(stage: Any, lora: bool) -> dict[str, Any]:
    """What travels after a round: the LoRA adapters, or every tensor of the stage (whole-model names)."""
    from autograd_bridge.lora import is_adapter_name, lora_state

    if lora:
        has_adapters = any(is_adapter_name(name) for name, _ in stage.named_parameters())
        return lora_state(stage) if has_adapters else {}  # a frozen stage without blocks
    return {name: t.detach().cpu().contiguous() for name, t in stage.model_state().items()}


def tie_owner_stages(stages: Mapping[int, Any]) -> None:
    """Give the owner's first and last stage one embedding/head tensor when the model ties them.

    Done right after the stages are built, before any optimizer sees the parameters.
    """
    from autograd_bridge.partition import tie_stage_weights

    ends = [s for s in stages.values() if s.spec.is_first or s.spec.is_last]
    first = next((s for s in ends if s.spec.is_first), None)
    last = next((s for s in ends if s.spec.is_last), None)
    if first is None or last is None or first is last:
        return
    if getattr(first, "tied_embeddings", False) and getattr(last, "tied_embeddings", False):
        tie_stage_weights(first, last)


def build_owner_optimizer(stages: Sequence[Any], optimizer: str = "adamw") -> Any:
    """The optimizer over what the owner's own stages train, or None when they train nothing.

    Its learning rate is set at every step from the round's settings.
    """
    from .training import build_local_optimizer, trainable_parameters

    if not trainable_parameters(stages):
        return None
    return build_local_optimizer(stages, optimizer=optimizer, lr=0.0)  # type: ignore[arg-type]


def trained_state(stage: Any, lora: bool, optimizer: Any) -> dict[str, Any]:
    """What a holder uploads for one partition: :func:`trained_tensors` plus its optimizer's state for them.

    The optimizer state (``optimizer/<entry>/<name>`` tensors, see
    :mod:`autograd_bridge.optim_state`) lets the server hand a partition to the next owner
    in case 2, and resume a run, with AdamW's moments and step count intact.
    """
    from autograd_bridge.optim_state import optimizer_tensors

    tensors = trained_tensors(stage, lora)
    tensors.update(optimizer_tensors(optimizer, stage.named_model_parameters()))
    return tensors


def load_trained_state(stage: Any, tensors: Mapping[str, Any], lora: bool, optimizer: Any) -> None:
    """Load what the server sent for one partition: the tensors, and the optimizer state when it sent one.

    Without optimizer-state tensors the optimizer keeps its own state (case 3: every
    pipeline keeps its local moments across rounds).
    """
    from autograd_bridge.optim_state import load_optimizer_tensors, split_optimizer_tensors

    weights, state = split_optimizer_tensors(tensors)
    if state:
        try:
            load_optimizer_tensors(optimizer, stage.named_model_parameters(), state)
        except ValueError as exc:
            raise HostingError(f"partition {stage.spec.index}: {exc}") from exc
    load_trained_tensors(stage, weights, lora)


def load_trained_tensors(stage: Any, tensors: Mapping[str, Any], lora: bool) -> None:
    """Copy the server's merged tensors into ``stage`` in place (optimizers keep their references)."""
    import torch

    from autograd_bridge.lora import is_adapter_name, load_lora_state

    if lora:
        if not tensors and not any(is_adapter_name(name) for name, _ in stage.named_parameters()):
            return  # a frozen stage without blocks: nothing trains, nothing to load
        try:
            load_lora_state(stage, tensors)
        except ValueError as exc:
            raise HostingError(f"partition {stage.spec.index}: {exc}") from exc
        return
    own = stage.model_state()
    missing = sorted(name for name in own if name not in tensors)
    if missing:
        raise HostingError(f"the merged weights of partition {stage.spec.index} lack {missing[0]!r}")
    with torch.no_grad():
        for name, tensor in own.items():
            value = tensors[name]
            if value.shape != tensor.shape:
                raise HostingError(f"merged tensor {name!r} is {tuple(value.shape)}, here {tuple(tensor.shape)}")
            tensor.copy_(value)
