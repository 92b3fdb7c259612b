"""The data owner's side of a run: one round of training and evaluation per ``Train`` command.

The owner keeps its own stages (the first and the last, U-shape) and reaches the middle ones
over the bridge with the tokens the server gave it. An :class:`OwnerTrainer` lives as long as
the run: the dataset, the connections and the local optimizer's state carry over from round
to round, so round ``r`` continues exactly where round ``r - 1`` stopped (batch
``(r - 1) * steps`` of the owner's stream).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from autograd_bridge.codecs import CodecSettings as CodecChoice
from autograd_bridge.codecs import UpdateCodec, decode_update, get_codec
from autograd_bridge.finetune import Finetune, FinetuneSettings, get_finetune
from autograd_bridge.frames import COMPRESSIONS, Compression
from autograd_bridge.methods import TrainingMethod, get_method
from autograd_bridge.optim import check_optimizer_name, check_schedule_name
from autograd_bridge.paths import get_path
from proto.messages import Evaluation, PeerEndpoint, PrepareRun, RoundReport, StepRecord, Train, Upload

from .errors import HostingError
from .tls import peer_context

log = logging.getLogger(__name__)


def check_train(cmd: Train) -> Train:
    """``cmd`` when every setting of the round is usable, else a HostingError naming the bad one.

    It came over the network: nothing in it is trusted before this check.
    """
    for name in ("steps", "batch_size", "seq_len", "micro_batches", "eval_batch_size"):
        value = getattr(cmd, name)
        if value < 1:
            raise HostingError(f"training setting {name!r} must be at least 1, got {value!r}")
    if cmd.round < 1:
        raise HostingError(f"training setting 'round' must be at least 1, got {cmd.round}")
    if not (math.isfinite(cmd.lr) and cmd.lr >= 0):
        raise HostingError(f"training setting 'lr' must be a finite number >= 0, got {cmd.lr!r}")
    if not (math.isfinite(cmd.val_fraction) and 0.0 < cmd.val_fraction < 1.0):
        raise HostingError(f"training setting 'val_fraction' must be in (0, 1), got {cmd.val_fraction!r}")
    if not cmd.tokenizer:
        raise HostingError("training setting 'tokenizer' must name a tokenizer")
    if not (math.isfinite(cmd.min_lr) and 0 <= cmd.min_lr <= cmd.lr):
        raise HostingError(f"training setting 'min_lr' must be in [0, lr], got {cmd.min_lr!r}")
    if not (math.isfinite(cmd.clip_norm) and cmd.clip_norm >= 0):
        raise HostingError(f"training setting 'clip_norm' must be a finite number >= 0 (0: off), got {cmd.clip_norm!r}")
    if not (math.isfinite(cmd.time_budget_s) and cmd.time_budget_s >= 0):
        raise HostingError(f"training setting 'time_budget_s' must be a finite number >= 0 (0: none), got {cmd.time_budget_s!r}")
    if cmd.warmup_steps > cmd.total_steps > 0:
        raise HostingError(f"training setting 'warmup_steps' ({cmd.warmup_steps}) exceeds total_steps ({cmd.total_steps})")
    if cmd.batch_size % cmd.micro_batches:
        raise HostingError(f"batch_size {cmd.batch_size} is not a multiple of micro_batches {cmd.micro_batches}")
    try:
        get_method(cmd.method)
        check_schedule_name(cmd.schedule)
    except ValueError as exc:
        raise HostingError(f"training settings: {exc}") from exc
    return cmd


@dataclass(frozen=True, slots=True, kw_only=True)
class Preparation:
    """How a pipeline's stages train here, resolved from a PrepareRun: one object per seam."""

    finetune: Finetune  # what the stages train and what travels
    settings: FinetuneSettings  # what the finetune mode was set up with
    optimizer: str  # every stage's optimizer (autograd_bridge.optim)
    codec: str  # how this holder encodes its uploads (autograd_bridge.codecs); the density comes with each Upload
    codec_choice: CodecChoice  # the codec's value dtype and top-k scope
    error_feedback: bool  # keep what a sparse upload left out and add it to the next one
    method: TrainingMethod  # how the owner trains a step
    path: str = "relay"  # how activations travel between the stages (autograd_bridge.paths)
    compression: Compression = "none"  # of the activations and gradients between stages

    @property
    def key(self) -> tuple[Any, ...]:
        """What must match when the same pipeline is prepared twice."""
        return (self.finetune.name, self.optimizer, self.codec, self.codec_choice, self.error_feedback,
                self.method.name, self.settings)  # fmt: skip

    def upload_codec(self, density: float) -> UpdateCodec:
        """The codec of one upload, keeping ``density`` of each tensor where it is sparse."""
        try:
            return get_codec(self.codec, replace(self.codec_choice, density=density))
        except ValueError as exc:
            raise HostingError(f"the upload cannot be encoded: {exc}") from exc


def check_compression(name: str) -> Compression:
    """``name`` as a Compression of the frames, or ValueError naming the choices."""
    if name not in COMPRESSIONS:
        raise ValueError(f"activation_compression must be one of {', '.join(COMPRESSIONS)}, got {name!r}")
    return name  # type: ignore[return-value]


def prepare_from_command(cmd: PrepareRun) -> Preparation:
    """Resolve and check a PrepareRun (network input) into the objects the daemon keeps."""
    settings = FinetuneSettings(
        lora_r=cmd.lora.r, lora_alpha=cmd.lora.alpha, lora_targets=tuple(cmd.lora.targets), seed=cmd.seed,
        head_fraction=cmd.heads.fraction, head_choice=cmd.heads.choice, head_adapter=cmd.heads.adapter,
        head_key=cmd.heads.key, head_schedule=cmd.heads.schedule or "fixed",
    )  # fmt: skip
    if not all(cmd.lora.targets):
        raise HostingError("run setting 'lora targets' must be module names, not empty strings")
    try:
        finetune = get_finetune(cmd.finetune)
        finetune.check(settings)
        choice = CodecChoice(values=cmd.codec.values or "fp32", scope=cmd.codec.scope or "partition")
        get_codec(cmd.codec.name, choice)  # an unknown codec is refused now, not at the first upload
        return Preparation(
            finetune=finetune,
            settings=settings,
            optimizer=check_optimizer_name(cmd.optimizer),
            codec=cmd.codec.name,
            codec_choice=choice,
            error_feedback=cmd.codec.error_feedback,
            method=get_method(cmd.method, cmd.method_options),
            path=get_path(cmd.path).name,
            compression=check_compression(cmd.activation_compression),
        )
    except ValueError as exc:
        raise HostingError(f"run {cmd.run_id}: {exc}") from exc


class OwnerTrainer:
    """The owner's pipeline for one run: local end stages plus the hosts' middle stages."""

    def __init__(
        self,
        run_id: str,
        stages: Mapping[int, Any],
        peers: Sequence[PeerEndpoint],
        data: Path,
        settings: Train,
        optimizer: Any,
        method: TrainingMethod,
        *,
        path: str = "relay",
        compression: Compression = "none",
    ) -> None:
        from autograd_bridge.models import load_tokenizer
        from autograd_bridge.pipeline import Pipeline, PipelineSettings
        from autograd_bridge.remote import ClientSettings, StageClient
        from autograd_bridge.runtime import EventLoopThread

        from .data import DataSettings, OwnerDataset

        self.run_id = run_id
        self.method = method
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
                client = self.runtime.run(
                    StageClient.connect(
                        peer.url, run_id=run_id, stage=k, token=peer.token,
                        settings=ClientSettings(compression=compression), ssl=peer_context(peer.url, peer.cert_pem),
                    )
                )  # fmt: skip
                self.clients.append(client)
                chain.append(client)
        self.local_stages = [stages[k] for k in sorted(stages)]
        pipeline_settings = PipelineSettings(micro_batches=settings.micro_batches, path=path)
        self.pipeline = Pipeline(chain, self.runtime, pipeline_settings)
        # The optimizer of the owner's own stages (None: they train nothing), built by
        # build_owner_optimizer when the run is prepared, over stages tie_owner_stages tied,
        # so that a handed-over optimizer state can be loaded before round 1.
        self.optimizer: Any = optimizer
        self._last_evaluation_s: float | None = None  # how long the last round's evaluation took

    def train_round(
        self, settings: Train, on_step: Callable[[int, StepRecord], None] | None = None, *, received: float | None = None
    ) -> RoundReport:
        """Train ``settings.steps`` steps (or until its time budget is spent), then evaluate; what the owner reports (blocking).

        ``on_step(i, record)`` is called after step ``i`` (0-based, within the round) of the round.
        ``received`` (``time.perf_counter()``) is when the Train command arrived: a time budget
        counts from then, so what came before this call (building the trainer) is spent of it.
        """
        from functools import partial

        from autograd_bridge.optim import lr_at

        from .training import evaluate, run_steps

        schedule = partial(
            lr_at, settings.schedule, lr=settings.lr, warmup_steps=settings.warmup_steps,
            total_steps=settings.total_steps, min_lr=settings.min_lr,
        )  # fmt: skip
        began = time.perf_counter()
        self.pipeline.reset_stage_times()  # this round's steps only
        budget = None
        if settings.time_budget_s > 0:
            deadline = (received if received is not None else began) + settings.time_budget_s
            if self._last_evaluation_s is None:
                self._last_evaluation_s = self._first_evaluation_guess(settings.eval_batch_size)
            budget = max(deadline - time.perf_counter(), 1e-3)  # at least one step, whatever is left
        steps = run_steps(
            self.pipeline,
            self.dataset,
            steps=settings.steps,
            batch_size=settings.batch_size,
            start=settings.start,
            local_optimizer=self.optimizer,
            lr=settings.lr,
            method=self.method,
            peers=self.clients,
            schedule=schedule,
            clip_norm=settings.clip_norm or None,
            on_step=on_step,
            time_budget_s=budget,
            after_s=self._evaluation_seconds,
        )
        # Per stage, the owner's wait per step (transfers + the host's compute), before evaluation adds none.
        stage_seconds = tuple(self.pipeline.stage_seconds())
        step_seconds = self.pipeline.step_seconds()
        evaluation_began = time.perf_counter()
        val_loss, ppl = evaluate(self.pipeline, self.dataset, settings.eval_batch_size)
        self._last_evaluation_s = time.perf_counter() - evaluation_began
        val_tokens = sum(b.num_targets for b in self.dataset.validation_batches(settings.eval_batch_size))
        return RoundReport(
            round=settings.round,
            steps=tuple(steps),
            evaluation=Evaluation(loss=val_loss, perplexity=ppl, tokens=val_tokens),
            samples=len(steps) * settings.batch_size,  # sequences trained this round
            data_samples=self.dataset.num_samples,  # training sequences held: the FedAvg weight
            seconds=time.perf_counter() - began,
            stage_seconds=stage_seconds,
            step_seconds=step_seconds,
        )

    def _first_evaluation_guess(self, batch_size: int) -> float:
        """Before any evaluation was timed: one validation batch's forward pass, times the number of batches."""
        batches = list(self.dataset.validation_batches(batch_size))
        if not batches:
            return 0.0
        first = batches[0]
        began = time.perf_counter()
        self.pipeline.eval_loss(first.input_ids, first.attention_mask, first.labels)
        return (time.perf_counter() - began) * len(batches)

    def _evaluation_seconds(self, step_s: float) -> float:
        """What the evaluation after training will take: as long as the last one (or the first one's guess)."""
        return self._last_evaluation_s or 0.0

    def close(self) -> None:
        """Close the connections and the pipeline (blocking)."""
        for client in self.clients:
            try:
                self.runtime.run(client.close(), timeout=10)
            except Exception as exc:  # closing is best effort: the host may be gone already
                log.debug("closing a stage client: %s", exc)
        self.pipeline.close()
        self.runtime.close()


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


def trained_state(stage: Any, finetune: Finetune, optimizer: Any) -> dict[str, Any]:
    """What a holder uploads for one partition: what ``finetune`` trains, plus its optimizer's state for it.

    The optimizer state (``optimizer/<entry>/<name>`` tensors, see
    :mod:`autograd_bridge.optim_state`) lets the server hand a partition to the next owner
    in case 2, and resume a run, with AdamW's moments and step count intact.
    """
    from autograd_bridge.optim_state import optimizer_tensors

    tensors = finetune.trained_tensors(stage)
    tensors.update(optimizer_tensors(optimizer, stage.named_model_parameters()))
    return tensors


def load_trained_state(stage: Any, tensors: Mapping[str, Any], finetune: Finetune, optimizer: Any) -> None:
    """Load what the server sent for one partition: the tensors, and the optimizer state when it sent one.

    Without optimizer-state tensors the optimizer keeps its own state (case 3: every
    pipeline keeps its local moments across rounds).
    """
    from autograd_bridge.optim_state import load_optimizer_tensors, split_optimizer_tensors

    weights, state = split_optimizer_tensors(tensors)
    try:
        if state:
            load_optimizer_tensors(optimizer, stage.named_model_parameters(), state)
        finetune.load_tensors(stage, weights)
    except ValueError as exc:
        raise HostingError(f"partition {stage.spec.index}: {exc}") from exc


@dataclass(slots=True)
class Updates:
    """What a holder uploads for its partitions: their values, or their change since it last loaded them.

    A codec that sends changes (top-k) gets ``trained - start`` per tensor, ``start`` being
    what the partition held after the last PrepareRun or LoadPartitions; the server adds the
    mean change to its global tensors (FLoSS: the server sent ``P * mask``, the client sends
    its sparse change, the server steps ``P`` with the mean). With error feedback each
    partition keeps what its last sparse upload left out and adds it to the next change.
    """

    prepared: Preparation
    starts: dict[int, dict[str, Any]] = field(default_factory=dict)  # partition -> its tensors when last loaded
    seeded: dict[int, int] = field(default_factory=dict)  # partition -> its seeded steps (forward gradients) then
    residuals: dict[int, dict[str, Any]] = field(default_factory=dict)  # partition -> what sparse uploads left out

    def mark_start(self, index: int, stage: Any) -> None:
        """``stage`` (partition ``index``) now holds what the server sent: changes are measured from here."""
        from autograd_bridge.methods.perturbation import applied_steps

        self.starts[index] = {n: t.clone() for n, t in self.prepared.finetune.trained_tensors(stage).items()}
        self.seeded[index] = len(applied_steps(stage))

    def encode(self, index: int, stage: Any, optimizer: Any, upload: Upload) -> bytes:
        """The bytes partition ``index`` sends for ``upload`` (round 0: its starting values, whole)."""
        own = optimizer if upload.optimizer_state else None
        if upload.round == 0:
            return get_codec("dense").encode(trained_state(stage, self.prepared.finetune, own))
        codec = self.prepared.upload_codec(upload.density)
        if not codec.sends_changes:
            return codec.encode(trained_state(stage, self.prepared.finetune, own))
        from autograd_bridge.optim_state import optimizer_tensors

        seeded = self._seeded_upload(index, stage, codec, own)
        if seeded is not None:
            return seeded
        start, residual = self.starts[index], self.residuals.get(index, {})
        change = {n: t - start[n] + residual[n] if n in residual else t - start[n]
                  for n, t in self.prepared.finetune.trained_tensors(stage).items()}  # fmt: skip
        data = codec.encode({**change, **optimizer_tensors(own, stage.named_model_parameters())})
        if self.prepared.error_feedback:
            sent = decode_update(data)
            self.residuals[index] = {n: t - sent[n] for n, t in change.items()}
        return data

    def _seeded_upload(self, index: int, stage: Any, codec: UpdateCodec, optimizer: Any) -> bytes | None:
        """The seeds and coefficients of the steps since ``stage`` was loaded, when the codec sends
        them and every change since came from such steps; else None (the change goes as tensors)."""
        from autograd_bridge.methods.perturbation import applied_steps, replay
        from autograd_bridge.optim_state import optimizer_tensors

        encode_steps = getattr(codec, "encode_steps", None)
        steps = applied_steps(stage)[self.seeded.get(index, 0) :]
        if encode_steps is None or not steps:
            return None
        trained, start = self.prepared.finetune.trained_tensors(stage), self.starts[index]
        if any(not torch.equal(t, replay({n: start[n]}, steps)[n]) for n, t in trained.items()):
            return None  # something else changed the tensors too: the seeds alone would not rebuild them
        data: bytes = encode_steps(steps, trained, optimizer_tensors(optimizer, stage.named_model_parameters()))
        return data
