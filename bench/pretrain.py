"""Federated pre-training from scratch (Photon, DiLoCo) against centralized training.

A small Llama is built from a config with a seeded random initialisation (the same start
for every method) and pre-trained with the GPT-2 tokenizer on the King James Bible, split
across ``owners`` data owners by book (non-IID) and, for the methods named in
``PretrainSettings.iid``, with the same training sequences shuffled across the owners
(IID). Every method trains on exactly the same number of tokens:

* centralized: one process, one model, every owner's batches interleaved
  (owner 0's batch 0, owner 1's batch 0, ..., owner 0's batch 1, ...), ``owners`` times
  as many optimizer steps as one owner does;
* dp: the data-parallel run the communication figure refers to (a reference, not in the
  last line): each step trains the owners' batches concatenated (batch ``owners * B``),
  as ``owners`` workers averaging their gradients every step would;
* fedavg, fednesterov, fedadam: each round every owner loads the global model, trains
  ``local_steps`` steps with its own AdamW (whose moments stay with the owner across
  rounds), and the server merges the copies with the project's aggregator
  (:mod:`server.training.aggregation`): FedAvg (plain weighted mean), FedNesterov
  (DiLoCo: server lr 0.7, momentum 0.9), FedAdam (Photon: server lr 0.1, betas 0.9/0.95);
* partial: fednesterov with half the owners per round, drawn by the project's ``sampled``
  participation with the run's seed, for twice as many rounds (the same tokens).

Owners train with the project's owner loop (:func:`client.training.run_steps`) over a
one-stage pipeline holding the whole model (a whole-model owner): AdamW, a cosine
schedule with linear warm-up that continues across rounds (:func:`autograd_bridge.optim.lr_at`,
indexed by the round's place in the run), gradient clipping at ``clip_norm``.

Validation perplexity is measured on one held-out set common to every method (the union
of the by-book owners' validation splits, never trained on), before training and after
every ``owners * local_steps`` batches of training (one round of full participation).

Bytes exchanged. Federated: per round, every participating owner downloads the global
model and uploads its trained copy; each transfer is counted as the length of the real
``dense`` codec encoding (safetensors of every trainable tensor, float32). Data-parallel
(the figure ``comm_reduction`` divides by)::

    dp_bytes = 2 * S * owners * steps_dp,     steps_dp = rounds * local_steps

with ``S`` the same encoded size of a full gradient (the trainable tensors' shapes and
dtype): at every step every owner uploads its gradient and downloads the averaged one
(parameter-server counting, as the federated transfers are counted; a ring all-reduce
moves ``2 (owners - 1) / owners * S`` each way per owner, 1.5 S each way at 4 owners, so
this is the smaller, conservative figure). With full participation the ratio is exactly
``local_steps``; half participation over twice the rounds moves the same bytes.

    python -m bench.pretrain --quick    # 2 x 64 tiny Llama, 4 x 8 steps per owner, about 2.5 minutes on 1 core
    python -m bench.pretrain            # 4 x 64, 12 rounds x 16 steps per owner, 15-20 minutes

The last line: ``ppl_centralized=... ppl_fedavg=... ppl_fednesterov=... ppl_fedadam=...
ppl_partial=... gap_pct=... comm_reduction=...``, where the ppl are after the last round
(by-book split) and ``gap_pct`` is ``100 * (best federated - centralized) / centralized``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from autograd_bridge.codecs import get_codec
from autograd_bridge.methods import get_method
from autograd_bridge.models import SMOLLM2_ALIAS, gpt2_tokenizer, resolve_model_source, tiny_config
from autograd_bridge.optim import lr_at
from autograd_bridge.partition import StageModule, even_stage_specs, split_model
from autograd_bridge.pipeline import Pipeline
from autograd_bridge.runtime import EventLoopThread
from bench.quality import load_trained_state, trained_state
from client.data import DataSettings, OwnerDataset, TokenBatch, load_texts
from client.training import build_local_optimizer, evaluate, run_steps
from server.training.aggregation import AggregationSettings, ClientUpdate
from server.training.participation import Sampled
from server.training.spec import ParticipationSection
from testbed.demo_data import write_owner_splits

#: the methods of the last line, in its order (by-book split)
FINAL = ("centralized", "fedavg", "fednesterov", "fedadam", "partial")
#: the federated methods: their outer optimizer and the share of the owners that trains each round
FEDERATED: dict[str, tuple[AggregationSettings, float]] = {
    "fedavg": (AggregationSettings(kind="fedavg", server_lr=1.0), 1.0),
    "fednesterov": (AggregationSettings(kind="fednesterov", server_lr=0.7, momentum=0.9), 1.0),
    "fedadam": (AggregationSettings(kind="fedadam", server_lr=0.1, beta1=0.9, beta2=0.95), 1.0),
    "partial": (AggregationSettings(kind="fednesterov", server_lr=0.7, momentum=0.9), 0.5),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class PretrainSettings:
    """One comparison run."""

    model: str = "tiny"  # "tiny" (tiny_config("llama")), a folder with config.json, or "smollm2" (its config)
    layers: int = 2  # decoder blocks (overrides a loaded config's num_hidden_layers too)
    width: int = 64  # hidden size of the tiny model (its MLP is 4x, its heads 16 wide)
    owners: int = 4  # data owners (the KJV split by book among them); a --data folder sets it
    rounds: int = 4  # rounds of full participation (partial runs twice as many)
    local_steps: int = 8  # optimizer steps per owner per round (K)
    batch_size: int = 4  # sequences per owner step (B)
    seq_len: int = 32  # tokens per sequence (T)
    lr: float = 3e-3  # peak AdamW learning rate of every client (and of centralized and dp)
    warmup: float = 0.1  # share of a run's steps spent warming up linearly
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the run's last step
    weight_decay: float = 0.1  # AdamW's decoupled weight decay
    clip_norm: float = 1.0  # bound on the gradient norm of every step
    max_chars_per_owner: int | None = 30_000  # KJV text per owner, its first books (None: all of its books)
    data: str | None = None  # a .txt file (cut into `owners` parts) or a folder of them (one owner each)
    val_fraction: float = 0.05  # share of each owner's sequences held out (their union validates every method)
    iid: tuple[str, ...] = ("fedavg",)  # federated methods also run on the IID split
    dp_baseline: bool = True  # also train the data-parallel reference (batch owners * B)
    eval_batch_size: int = 32  # sequences per validation batch
    seed: int = 0  # model init, data split and order, participation draws

    def __post_init__(self) -> None:
        if min(self.owners, self.rounds, self.local_steps, self.batch_size, self.layers) < 1:
            raise ValueError("owners, rounds, local_steps, batch_size and layers must each be at least 1")
        unknown = sorted(set(self.iid) - set(FEDERATED))
        if unknown:
            raise ValueError(f"iid names {unknown}; choose among {', '.join(FEDERATED)}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a share of the steps, in [0, 1), got {self.warmup}")


@dataclass(slots=True)
class Curve:
    """What one method measured."""

    ppl: dict[int, float]  # owner-steps of training (a multiple of owners * local_steps) -> validation ppl
    losses: list[float] = field(default_factory=list)  # training loss of every step, in order
    tokens: int = 0  # training tokens (label positions) seen
    bytes_exchanged: int = 0  # federated: downloads + uploads, encoded; 0 for the one-process runs
    seconds: float = 0.0  # wall time of training and evaluation


@dataclass(slots=True)
class PretrainResult:
    """Every method's curve and the communication figures."""

    curves: dict[str, Curve]  # method name (e.g. "fedavg", "fedavg_iid") -> its curve
    owners: int  # data owners that took part
    row_steps: int  # owner-steps between two table rows: owners * local_steps
    model_bytes: int  # S: encoded size of the trainable tensors (one transfer)
    parameters: int  # trainable parameters
    dp_bytes: int  # what a data-parallel run exchanges for the same tokens
    seconds: float  # wall time of every method together
    notes: list[str] = field(default_factory=list)

    def final(self, method: str) -> float:
        """The validation perplexity after all the training tokens."""
        curve = self.curves[method].ppl
        return curve[max(curve)]

    @property
    def gap_pct(self) -> float:
        """Best federated (by-book) against centralized, in % of centralized."""
        best = min(self.final(m) for m in FINAL[1:])
        return 100.0 * (best - self.final("centralized")) / self.final("centralized")

    @property
    def comm_reduction(self) -> float:
        """Data-parallel bytes over the bytes fedavg exchanged (the same for every full-participation rule)."""
        return self.dp_bytes / self.curves["fedavg"].bytes_exchanged

    def summary_line(self) -> str:
        """The one ``key=value`` line the benchmark ends with."""
        ppl = " ".join(f"ppl_{m}={self.final(m):.4f}" for m in FINAL)
        return f"{ppl} gap_pct={self.gap_pct:.2f} comm_reduction={self.comm_reduction:.2f}"

    def table(self) -> str:
        """Validation perplexity per round (round 0: before training) and method; '-' where not measured."""
        names = list(self.curves)
        width = max(12, *(len(n) + 1 for n in names))
        rows = sorted({steps for c in self.curves.values() for steps in c.ppl})
        lines = ["round " + "".join(f"{n:>{width}}" for n in names)]
        for steps in rows:
            cells = [self.curves[n].ppl.get(steps) for n in names]
            text = "".join(f"{v:>{width}.2f}" if v is not None else f"{'-':>{width}}" for v in cells)
            lines.append(f"{steps // self.row_steps:>5} {text}")
        return "\n".join(lines)

    def traffic(self) -> str:
        """Bytes exchanged and tokens per method."""
        lines = [f"{'method':<16}{'tokens':>12}{'bytes exchanged':>18}{'dp / this':>11}{'seconds':>9}"]
        for name, curve in self.curves.items():
            ratio = f"{self.dp_bytes / curve.bytes_exchanged:.2f}" if curve.bytes_exchanged else "-"
            sent = f"{curve.bytes_exchanged:,}" if curve.bytes_exchanged else "-"
            lines.append(f"{name:<16}{curve.tokens:>12,}{sent:>18}{ratio:>11}{curve.seconds:>9.1f}")
        lines.append(f"{'data-parallel':<16}{'':>12}{self.dp_bytes:>18,}{1.0:>11.2f}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- model


def model_config(settings: PretrainSettings, vocab_size: int, eos_id: int) -> PretrainedConfig:
    """The architecture to pre-train: tiny Llama, a config.json folder or SmolLM2's, with our vocabulary."""
    overrides: dict[str, Any] = {
        "vocab_size": vocab_size,
        "num_hidden_layers": settings.layers,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "tie_word_embeddings": True,  # as SmolLM2: the head is the embedding (half the bytes to move)
    }
    if settings.model == "tiny":
        config = tiny_config(
            "llama", hidden_size=settings.width, intermediate_size=4 * settings.width,
            num_attention_heads=max(1, settings.width // 16), num_key_value_heads=max(1, settings.width // 32),
            max_position_embeddings=max(128, settings.seq_len), **overrides,
        )  # fmt: skip
        return config
    if settings.model == SMOLLM2_ALIAS:
        source, gguf_file = resolve_model_source(SMOLLM2_ALIAS)
        config = AutoConfig.from_pretrained(source, gguf_file=gguf_file)
    elif (Path(settings.model).expanduser() / "config.json").is_file():
        config = AutoConfig.from_pretrained(Path(settings.model).expanduser())
    else:
        raise ValueError(f"--model must be 'tiny', 'smollm2' or a folder holding config.json, got {settings.model!r}")
    for key, value in overrides.items():
        setattr(config, key, value)
    config.max_position_embeddings = max(int(config.max_position_embeddings), settings.seq_len)
    return config


def initial_model(config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """A randomly initialised model, the same for a given seed."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()


def whole_stage(base: PreTrainedModel) -> StageModule:
    """A fresh copy of ``base`` as one pipeline stage holding every block (a whole-model owner)."""
    model = type(base)(base.config)
    model.load_state_dict(base.state_dict())
    model.train()
    return split_model(model, even_stage_specs(int(model.config.num_hidden_layers), 1))[0]


# --------------------------------------------------------------------------- data


def _cut_text(text: str, parts: int) -> list[str]:
    """``text`` in ``parts`` contiguous pieces of about equal length, cut at line ends."""
    pieces, start = [], 0
    for k in range(1, parts + 1):
        end = len(text) if k == parts else text.find("\n", k * len(text) // parts)
        end = len(text) if end < 0 else end
        pieces.append(text[start:end])
        start = end
    return pieces


def owner_texts(settings: PretrainSettings) -> list[list[str]]:
    """Each owner's documents: the KJV by book, a folder's files (one owner each) or a file in parts."""
    if settings.data is None:
        with tempfile.TemporaryDirectory(prefix="titanic-pretrain-") as tmp:
            splits = write_owner_splits(tmp, settings.owners, max_chars_per_owner=settings.max_chars_per_owner)
            return [load_texts(split.path) for split in splits]
    path = Path(settings.data).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
        if len(files) < 2:
            raise ValueError(f"{path} holds {len(files)} .txt file(s); federated training needs one per owner, 2 or more")
        return [load_texts(p) for p in files]
    if path.suffix != ".txt" or not path.is_file():
        raise ValueError(f"--data must be a .txt file or a folder of them, got {path}")
    return [[piece] for piece in _cut_text("\n".join(load_texts(path)), settings.owners)]


def _training_set(sequences: torch.Tensor, settings: PretrainSettings) -> OwnerDataset:
    """Training sequences (N, T) as an owner's dataset, cut to whole batches so every step trains B * T tokens."""
    whole = sequences.shape[0] - sequences.shape[0] % settings.batch_size
    if whole == 0:
        raise ValueError(f"an owner has {sequences.shape[0]} training sequences, fewer than a batch; add text")
    data = DataSettings(seq_len=settings.seq_len, val_fraction=0.0, seed=settings.seed)
    # Whole blocks of seq_len tokens: packing their concatenation gives the same blocks back.
    return OwnerDataset(sequences[:whole].flatten().tolist(), settings=data)


@dataclass(frozen=True, slots=True)
class Splits:
    """The owners' data: one validation set for every method, and two ways to deal out the training sequences."""

    validation: list[OwnerDataset]  # the by-book owners' datasets; only their validation splits are used
    book: list[OwnerDataset]  # owner k's training sequences (its books), in whole batches
    iid: list[OwnerDataset]  # the same sequences shuffled (seeded) and dealt out evenly


def build_splits(settings: PretrainSettings, tokenizer: Any) -> Splits:
    """Tokenize and pack every owner's text, hold out validation, and build the by-book and IID training sets."""
    data = DataSettings(seq_len=settings.seq_len, val_fraction=settings.val_fraction, seed=settings.seed)
    validation = [OwnerDataset.from_texts(texts, tokenizer, settings=data) for texts in owner_texts(settings)]
    if any(d.num_validation == 0 for d in validation):
        raise ValueError("an owner holds out no validation sequence; raise val_fraction or add text")
    trains = [d.train_sequences for d in validation]  # (N_k, T) each
    everything = torch.cat(trains)
    order = np.random.default_rng([settings.seed, 2]).permutation(everything.shape[0])
    return Splits(
        validation=validation,
        book=[_training_set(t, settings) for t in trains],
        iid=[_training_set(everything[np.sort(part)], settings) for part in np.array_split(order, len(trains))],
    )


# --------------------------------------------------------------------------- the methods


class _Bench:
    def __init__(self, settings: PretrainSettings, base: PreTrainedModel, splits: Splits) -> None:
        self.s = settings
        self.base = base
        self.splits = splits
        self.owners = len(splits.book)
        self.runtime = EventLoopThread()
        self.codec = get_codec("dense")
        self.method = get_method("backprop")
        self.evaluator = whole_stage(base)
        self.eval_pipeline = Pipeline([self.evaluator], self.runtime)
        self.val_weights = [d.num_validation for d in splits.validation]  # validation sequences are whole
        self.start_ppl = self.ppl(self.eval_pipeline)  # the common random start

    # -- shared pieces

    def ppl(self, pipeline: Pipeline) -> float:
        """Validation perplexity of ``pipeline``'s model over every owner's validation split (token-weighted)."""
        losses = [evaluate(pipeline, d, self.s.eval_batch_size)[0] for d in self.splits.validation]
        mean = sum(w * x for w, x in zip(self.val_weights, losses, strict=True)) / sum(self.val_weights)
        return math.exp(mean)

    def global_ppl(self, state: dict[str, torch.Tensor]) -> float:
        """:meth:`ppl` of the merged ``state``, loaded into the evaluator."""
        load_trained_state(self.evaluator, state, False)
        return self.ppl(self.eval_pipeline)

    def lr(self, step: int, total: int) -> float:
        """The run's schedule at ``step`` of ``total`` (warm-up, then cosine to lr * min_lr_ratio)."""
        return lr_at("cosine", step, lr=self.s.lr, warmup_steps=round(self.s.warmup * total), total_steps=total,
                     min_lr=self.s.lr * self.s.min_lr_ratio)

    def optimizer(self, stage: StageModule) -> torch.optim.Optimizer:
        return build_local_optimizer([stage], lr=self.s.lr, weight_decay=self.s.weight_decay)

    # -- one process

    def one_process(self, *, batches_per_step: int) -> Curve:
        """One model on every owner's batches: ``batches_per_step`` 1 interleaves them (centralized),
        ``owners`` concatenates one of each per step (data-parallel, batch owners * B)."""
        stage = whole_stage(self.base)
        pipeline = Pipeline([stage], self.runtime)
        optimizer = self.optimizer(stage)
        streams = [d.stream(self.s.batch_size) for d in self.splits.book]
        total = self.owners * self.s.rounds * self.s.local_steps // batches_per_step
        curve = Curve(ppl={0: self.start_ppl})
        row = self.owners * self.s.local_steps  # owner batches per table row
        done = 0  # owner batches trained
        for step in range(total):
            # (batches_per_step * B, T): owner done % owners's next batch, and the following owners'
            batch = _concatenate([next(streams[(done + i) % self.owners]) for i in range(batches_per_step)])
            outcome = self.method.step(pipeline, batch, optimizer, lr=self.lr(step, total), clip_norm=self.s.clip_norm)
            curve.losses.append(outcome.loss)
            curve.tokens += outcome.tokens
            done += batches_per_step
            if done % row == 0:
                curve.ppl[done] = self.ppl(pipeline)
        pipeline.close()
        return curve

    # -- federated

    def federated(self, rule: AggregationSettings, fraction: float, datasets: Sequence[OwnerDataset]) -> Curve:
        """Owners train local_steps from the global model each round; ``rule`` merges the copies."""
        names = [f"owner-{k}" for k in range(self.owners)]
        sampled = Sampled(ParticipationSection(mode="sampled", fraction=fraction), seed=self.s.seed)
        per_round = sampled.size(self.owners)
        if (self.s.rounds * self.owners) % per_round:
            raise ValueError(
                f"{per_round} of {self.owners} owners per round cannot train exactly as many tokens as "
                f"{self.s.rounds} rounds of all of them; choose rounds as a multiple of {per_round}"
            )
        rounds = self.s.rounds * self.owners // per_round
        total = rounds * self.s.local_steps  # the schedule runs over the rounds, whoever trains them
        stages = [whole_stage(self.base) for _ in datasets]
        pipelines = [Pipeline([stage], self.runtime) for stage in stages]
        optimizers = [self.optimizer(stage) for stage in stages]  # each owner's AdamW moments stay with it
        positions = [0] * self.owners  # batches each owner has trained on so far
        aggregator = rule.build()
        global_state = trained_state(stages[0], False)
        curve = Curve(ppl={0: self.start_ppl})
        owner_steps = 0
        for r in range(rounds):
            download = len(self.codec.encode(global_state))
            updates = []
            (turn,) = sampled.turns(r + 1, names)
            for k in (names.index(name) for name in turn):
                load_trained_state(stages[k], global_state, False)
                first, offset = positions[k], r * self.s.local_steps

                def schedule(i: int, first: int = first, offset: int = offset) -> float:
                    return self.lr(offset + i - first, total)  # batch i of the owner's stream

                records = run_steps(
                    pipelines[k], datasets[k], steps=self.s.local_steps, batch_size=self.s.batch_size, start=first,
                    local_optimizer=optimizers[k], schedule=schedule, clip_norm=self.s.clip_norm,
                )  # fmt: skip
                positions[k] += self.s.local_steps
                state = trained_state(stages[k], False)
                curve.bytes_exchanged += download + len(self.codec.encode(state))
                curve.losses += [record.loss for record in records]
                curve.tokens += sum(record.tokens for record in records)
                updates.append(ClientUpdate(state=state, num_samples=datasets[k].num_samples, client_id=names[k]))
            global_state = aggregator.aggregate(global_state, updates)
            owner_steps += len(turn) * self.s.local_steps
            if owner_steps % (self.owners * self.s.local_steps) == 0:
                curve.ppl[owner_steps] = self.global_ppl(global_state)
        for pipeline in pipelines:
            pipeline.close()
        return curve

    def run(self, name: str) -> Curve:
        """The method a table column names: centralized, dp, a FEDERATED name, or one with ``_iid``."""
        if name == "centralized":
            return self.one_process(batches_per_step=1)
        if name == "dp":
            return self.one_process(batches_per_step=self.owners)
        method, _, split = name.partition("_")
        rule, fraction = FEDERATED[method]
        return self.federated(rule, fraction, self.splits.iid if split == "iid" else self.splits.book)

    def close(self) -> None:
        self.eval_pipeline.close()
        self.runtime.close()


def _concatenate(batches: Sequence[TokenBatch]) -> TokenBatch:
    return TokenBatch(
        input_ids=torch.cat([b.input_ids for b in batches]),
        attention_mask=torch.cat([b.attention_mask for b in batches]),
        labels=torch.cat([b.labels for b in batches]),
    )


def method_names(settings: PretrainSettings) -> list[str]:
    """The columns of a run, in order: centralized, dp, the federated ones, then the IID ones."""
    names = ["centralized", *(["dp"] if settings.dp_baseline else []), *FEDERATED]
    return names + [f"{m}_iid" for m in FEDERATED if m in settings.iid]


def run_pretrain(
    settings: PretrainSettings, *, tokenizer: Any | None = None, log: Callable[[str], None] | None = None
) -> PretrainResult:
    """Pre-train every method from the same random start on the same tokens and measure."""
    say = log or (lambda _line: None)
    tokenizer = tokenizer if tokenizer is not None else gpt2_tokenizer()
    splits = build_splits(settings, tokenizer)
    settings = replace(settings, owners=len(splits.book))
    say("owners: train sequences by book " + ", ".join(str(d.num_samples) for d in splits.book)
        + "; IID " + ", ".join(str(d.num_samples) for d in splits.iid)
        + "; validation " + ", ".join(str(d.num_validation) for d in splits.validation))
    config = model_config(settings, len(tokenizer), int(tokenizer.eos_token_id))
    bench = _Bench(settings, initial_model(config, settings.seed), splits)
    state = trained_state(bench.evaluator, False)
    model_bytes = len(bench.codec.encode(state))
    parameters = sum(t.numel() for t in state.values())
    say(f"model: {parameters:,} trainable parameters, {model_bytes:,} bytes encoded; start ppl {bench.start_ppl:.2f}")
    curves: dict[str, Curve] = {}
    started = time.perf_counter()
    try:
        for name in method_names(settings):
            began = time.perf_counter()
            curve = curves[name] = bench.run(name)
            curve.seconds = time.perf_counter() - began
            say(f"{name}: {curve.seconds:.1f} s, ppl {curve.ppl[max(curve.ppl)]:.2f}")
    finally:
        bench.close()
    dp_bytes = 2 * model_bytes * settings.owners * settings.rounds * settings.local_steps
    return PretrainResult(
        curves=curves, owners=settings.owners, row_steps=settings.owners * settings.local_steps,
        model_bytes=model_bytes, parameters=parameters, dp_bytes=dp_bytes, seconds=time.perf_counter() - started,
    )  # fmt: skip


# --------------------------------------------------------------------------- command line


def quick_settings() -> PretrainSettings:
    """``--quick``: 2 x 64 tiny Llama, 4 owners, 4 rounds of 8 steps, batch 4 x 32 (about 2.5 minutes)."""
    return PretrainSettings()


def full_settings() -> PretrainSettings:
    """The default: 4 x 64 tiny Llama, 4 owners of 200,000 characters, 12 rounds of 16 steps, batch 4 x 32."""
    return PretrainSettings(
        layers=4, rounds=12, local_steps=16, max_chars_per_owner=200_000, val_fraction=0.02,
    )  # fmt: skip


def _parse(argv: Sequence[str] | None) -> tuple[PretrainSettings, int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny model, few rounds (about 2.5 minutes)")
    parser.add_argument("--model", help="'tiny' (default), 'smollm2' or a folder with config.json (fresh weights)")
    parser.add_argument("--data", help="a .txt file (cut into --owners parts) or a folder of them (one owner each)")
    parser.add_argument("--owners", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--local-steps", type=int, dest="local_steps")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int)
    # One thread by default: on the shared 2-core machines a second one slows the tiny model down,
    # and the thread count changes float rounding, so a fixed default keeps the last line reproducible.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    settings = quick_settings() if args.quick else full_settings()
    names = {f.name for f in fields(PretrainSettings)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return replace(settings, **overrides), args.threads


def main(argv: Sequence[str] | None = None) -> int:
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    settings, threads = _parse(argv)
    torch.set_num_threads(threads)
    s = settings
    print(f"model={s.model} layers={s.layers} width={s.width} owners={s.owners} rounds={s.rounds} "
          f"local_steps={s.local_steps} batch={s.batch_size}x{s.seq_len} lr={s.lr} warmup={s.warmup} "
          f"clip={s.clip_norm} wd={s.weight_decay} seed={s.seed} threads={threads}", flush=True)
    result = run_pretrain(settings, log=lambda line: print(line, flush=True))
    print(f"validation perplexity (round r: after r * {result.row_steps} owner-steps of training, the tokens of "
          "r rounds of full participation; partial runs two rounds per row; dp is a reference)")
    print(result.table())
    print(result.traffic())
    print(f"total {result.seconds:.1f} s")
    print(result.summary_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
