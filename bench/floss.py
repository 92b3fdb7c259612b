"""FLoSS: sparse top-k LoRA communication against dense federated LoRA, bytes and perplexity.

Every method fine-tunes LoRA adapters of the same base model on the same owners' data for
the same rounds and local steps. Each round every owner starts from what the server sends,
trains its adapters densely with a fresh local AdamW (weight decay 0), and uploads; the
server steps its global adapters ``P`` with FedAdam on the weighted mean change (the
project's :class:`~server.training.aggregation.FedAdam`: Reddi et al., no bias correction, no
weight decay; FLASC's code would add torch AdamW's default weight decay 0.01 to this step,
here it is 0). The methods:

* dense: LoRA at rank ``r``, every adapter whole both ways (``dense`` codec): the baseline;
* dense_r/4: the same at rank ``r / 4`` (alpha scaled with it, so alpha / r is unchanged);
* sparseadapter_D: round 1 as dense; then ``P`` is pruned once to the top ``D`` of each
  adapter tensor by magnitude, and from then on only that fixed mask trains (gradients
  outside it are zeroed) and travels (``topk`` codec at density ``D`` both ways). Per tensor,
  because ranking all adapters together prunes every ``lora_B`` entry: PEFT starts B at
  zero and A at +-1/sqrt(fan_in), so after one round all of B is below A's top quarter and a
  global magnitude mask keeps a LoRA that can never change the model (measured: the
  perplexity stays at its round-0 value);
* floss_DD/DU: FLoSS. Download: the top ``DD`` of ``|P|`` ranked over every adapter of the
  model together (``topk`` codec, ``scope = "partition"`` as FLASC; the mask is recomputed
  every round), so an owner starts from ``P * mask`` with zeros elsewhere. Upload: the top
  ``DU`` of the owner's change ``trained - start``. The server adds the FedAdam step of the
  weighted mean change to ``P`` (not to ``P * mask``). ``DD = 1`` is the dense codec;
* floss_ef_DD/DU: FLoSS with error feedback (each owner keeps what its sparse upload left
  out and adds it to its next change; not part of FLoSS).

Owners encode their uploads with the holders' own code (:class:`client.trainer.Updates`),
and the server's downloads and every upload are real codec encodings (fp32 values): the
bytes counted are ``len`` of what would cross the network, headers included. A download is
encoded once per round and counted once per owner.

Validation perplexity: the server's global adapters ``P`` (dense) on the union of the
owners' held-out sequences, token-weighted, before round 1 and after every round.

The last line: ``upload_reduction=<dense upload bytes / those of the sparsest sparse method
(smallest upload) whose final perplexity is within 2% of dense> download_reduction=<the
same for downloads> ppl_dense=<x> ppl_sparse=<x> ppl_increase_pct=<x>``. When no sparse
method is within 2%, a line says so and the figures are those of the sparse method with the
lowest final perplexity.

The tiny model of ``--quick`` reads UTF-8 bytes (vocabulary 256), not GPT-2 tokens: with
the 50257-row GPT-2 embedding and head frozen at random values, a 4 x 64 model's adapters
moved the perplexity by a few percent at most (measured), so there was nothing to compare.
It is warmed up by ``base_steps`` of full training on the owners' data first, so the
adapters fine-tune a model that already knows something, as LoRA is used.

    python -m bench.floss --quick    # byte-level tiny Llama, 3 owners, 20 rounds: about a minute on 1 core
    python -m bench.floss            # SmolLM2-135M, 4 owners (KJV by book), 8 rounds: about half an hour
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import transformers
from torch import Tensor
from transformers import AutoModelForCausalLM, PreTrainedModel

from autograd_bridge.codecs import CodecSettings, UpdateCodec, decode_update, get_codec
from autograd_bridge.finetune import FinetuneSettings, get_finetune
from autograd_bridge.methods import get_method
from autograd_bridge.models import load_causal_lm, load_tokenizer, tiny_config
from autograd_bridge.partition import StageModule, even_stage_specs, split_model
from autograd_bridge.pipeline import Pipeline
from autograd_bridge.runtime import EventLoopThread
from bench.pretrain import PretrainSettings, owner_texts, whole_stage
from client.data import DataSettings, OwnerDataset
from client.trainer import Preparation, Updates
from client.training import build_local_optimizer, evaluate, run_steps
from proto.messages import Upload
from server.training.aggregation import AggregationSettings, ClientUpdate

#: the share of dense LoRA's final perplexity a sparse method may lose and still count
PPL_TOLERANCE_PCT = 2.0
#: the tiny model reads UTF-8 bytes: its vocabulary
BYTE_VOCAB = 256
#: the server step of every method, every setting explicit: FedAdam (Reddi et al.: no bias
#: correction), and no weight decay (FLASC's torch AdamW would apply 0.01 unasked)
SERVER_STEP = AggregationSettings(kind="fedadam", server_lr=1e-2, beta1=0.9, beta2=0.99, tau=1e-3)


@dataclass(frozen=True, slots=True, kw_only=True)
class Method:
    """How one method trains and moves the adapters."""

    name: str
    rank_divisor: int = 1  # adapters of rank lora_r // rank_divisor, alpha scaled alike
    download: float = 1.0  # top-k density of what the server sends; 1: the dense codec
    upload: float = 1.0  # top-k density of what an owner sends; 1: the dense codec
    error_feedback: bool = False  # an owner adds what its last sparse upload left out to its next change
    fixed_mask: bool = False  # SparseAdapter: dense round 1, then P pruned once to its top `upload`
    scope: str = "partition"  # what top-k ranks together: every adapter of the model, or each tensor alone

    def __post_init__(self) -> None:
        if self.fixed_mask and self.download != self.upload:
            raise ValueError(f"{self.name}: a fixed mask has one density; set download == upload")

    @property
    def sparse(self) -> bool:
        """Whether a top-k codec carries either direction (the candidates of the last line)."""
        return self.download < 1.0 or self.upload < 1.0

    def describe(self, lora_r: int) -> str:
        """One line of what the method does, for the benchmark's header."""
        rank = f"r {lora_r // self.rank_divisor}"
        if not self.sparse:
            return f"{self.name}: {rank}, dense both ways"
        how = "dense round 1, then a fixed mask" if self.fixed_mask else "top-k"
        ef = ", error feedback" if self.error_feedback else ""
        ranked = "ranked per tensor" if self.scope == "tensor" else "ranked over every adapter"
        return f"{self.name}: {rank}, {how}, density down {self.download:g} up {self.upload:g}, {ranked}{ef}"

    def codecs(self, round_: int, values: str) -> tuple[UpdateCodec, UpdateCodec]:
        """The (download, upload) codecs of round ``round_`` (1-based)."""
        if self.fixed_mask and round_ == 1:
            return get_codec("dense"), get_codec("dense")
        return _codec(self.download, values, self.scope), _codec(self.upload, values, self.scope)


def _codec(density: float, values: str, scope: str) -> UpdateCodec:
    if density >= 1.0:
        return get_codec("dense")
    return get_codec("topk", CodecSettings(density=density, values=values, scope=scope))


#: the comparison of the issue, in the order it runs and prints
DEFAULT_METHODS: tuple[Method, ...] = (
    Method(name="dense"),
    Method(name="dense_r/4", rank_divisor=4),
    Method(name="sparseadapter_0.25", download=0.25, upload=0.25, fixed_mask=True, scope="tensor"),
    Method(name="floss_0.25/0.25", download=0.25, upload=0.25),
    Method(name="floss_1/0.05", upload=0.05),
    Method(name="floss_0.05/0.01", download=0.05, upload=0.01),
    Method(name="floss_ef_0.05/0.01", download=0.05, upload=0.01, error_feedback=True),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class FlossSettings:
    """One comparison run."""

    model: str = "tiny"  # "tiny" (a small Llama from a config, warmed up), "smollm2", or a folder/.gguf with weights
    data: str | None = None  # a .txt file (cut into `owners` parts) or a folder of them (one owner each); None: KJV
    owners: int = 4  # data owners (the KJV split by book among them); a --data folder sets it
    rounds: int = 8  # federated rounds
    steps: int = 5  # local optimizer steps per owner per round
    batch_size: int = 4  # sequences per step
    seq_len: int = 64  # tokens per sequence
    lr: float = 2e-3  # local AdamW learning rate (weight decay 0; a fresh optimizer each round)
    lora_r: int = 8  # adapter rank of the baseline (the r/4 method uses lora_r // 4)
    lora_alpha: int = 16  # adapter scale numerator at rank lora_r (scale alpha / r)
    lora_targets: tuple[str, ...] = ()  # module names LoRA adapts; empty: the family's default (q_proj, v_proj)
    server: AggregationSettings = SERVER_STEP  # the server's step on the mean change
    values: str = "fp32"  # dtype of the top-k values on the wire
    methods: tuple[Method, ...] = DEFAULT_METHODS  # what is compared; must hold 'dense'
    max_chars_per_owner: int | None = 60_000  # KJV text per owner, its first books (None: all of them)
    val_fraction: float = 0.1  # share of each owner's sequences held out (their union validates every method)
    eval_batch_size: int = 16  # sequences per validation batch
    tiny_layers: int = 4  # decoder blocks of the tiny model
    tiny_width: int = 64  # hidden size of the tiny model
    base_steps: int = 100  # tiny only: full-model AdamW steps on the owners' data before the adapters
    seed: int = 0  # model init, adapter init, data split and order

    def __post_init__(self) -> None:
        if min(self.owners, self.rounds, self.steps, self.batch_size) < 1:
            raise ValueError("owners, rounds, steps and batch_size must each be at least 1")
        if not any(m.name == "dense" for m in self.methods) or not any(m.sparse for m in self.methods):
            raise ValueError("methods need the 'dense' baseline and at least one sparse method")
        for method in self.methods:
            rank = self.lora_r // method.rank_divisor
            if rank < 1 or rank * method.rank_divisor != self.lora_r or (self.lora_alpha * rank) % self.lora_r:
                raise ValueError(
                    f"{method.name}: lora_r {self.lora_r} and lora_alpha {self.lora_alpha} must both be multiples "
                    f"of {method.rank_divisor} (e.g. r 8, alpha 16)"
                )


@dataclass(slots=True)
class Curve:
    """What one method measured."""

    ppl: list[float]  # validation perplexity before round 1 and after each round
    upload_bytes: int = 0  # every owner's uploads, every round, as encoded
    download_bytes: int = 0  # every owner's downloads, every round, as encoded
    parameters: int = 0  # adapter entries
    seconds: float = 0.0


@dataclass(slots=True)
class FlossResult:
    """Every method's curve and the figures of the last line."""

    curves: dict[str, Curve]
    chosen: str  # the sparse method the last line reports
    within: bool  # whether `chosen` is within PPL_TOLERANCE_PCT of dense
    seconds: float

    def increase_pct(self, name: str) -> float:
        """Final perplexity of ``name`` over dense's, in % of dense."""
        dense = self.curves["dense"].ppl[-1]
        return 100.0 * (self.curves[name].ppl[-1] - dense) / dense

    def summary_line(self) -> str:
        """The one ``key=value`` line the benchmark ends with."""
        dense, chosen = self.curves["dense"], self.curves[self.chosen]
        return (
            f"upload_reduction={dense.upload_bytes / chosen.upload_bytes:.2f} "
            f"download_reduction={dense.download_bytes / chosen.download_bytes:.2f} "
            f"ppl_dense={dense.ppl[-1]:.4f} ppl_sparse={chosen.ppl[-1]:.4f} "
            f"ppl_increase_pct={self.increase_pct(self.chosen):.2f}"
        )

    def table(self) -> str:
        """Validation perplexity per round (round 0: before training) and method."""
        names = list(self.curves)
        width = max(12, *(len(n) + 1 for n in names))
        lines = ["round " + "".join(f"{n:>{width}}" for n in names)]
        for r in range(len(self.curves[names[0]].ppl)):
            lines.append(f"{r:>5} " + "".join(f"{self.curves[n].ppl[r]:>{width}.3f}" for n in names))
        return "\n".join(lines)

    def traffic(self) -> str:
        """Bytes up and down per method, their reduction against dense, final perplexity."""
        dense = self.curves["dense"]
        width = max(20, *(len(n) + 1 for n in self.curves))
        lines = [f"{'method':<{width}}{'adapters':>10}{'upload B':>13}{'download B':>13}{'up x':>8}{'down x':>8}"
                 f"{'final ppl':>11}{'vs dense':>10}{'seconds':>9}"]  # fmt: skip
        for name, c in self.curves.items():
            lines.append(
                f"{name:<{width}}{c.parameters:>10,}{c.upload_bytes:>13,}{c.download_bytes:>13,}"
                f"{dense.upload_bytes / c.upload_bytes:>8.2f}{dense.download_bytes / c.download_bytes:>8.2f}"
                f"{c.ppl[-1]:>11.3f}{self.increase_pct(name):>+9.2f}%{c.seconds:>9.1f}"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------- model and data


def owner_datasets(settings: FlossSettings, tokenizer: Any | None) -> list[OwnerDataset]:
    """Each owner's text (KJV by book, or --data), tokenized (UTF-8 bytes when ``tokenizer`` is None) and packed."""
    source = PretrainSettings(data=settings.data, owners=settings.owners, max_chars_per_owner=settings.max_chars_per_owner)
    data = DataSettings(seq_len=settings.seq_len, val_fraction=settings.val_fraction, seed=settings.seed)
    datasets = [
        OwnerDataset.from_texts(texts, tokenizer, settings=data) if tokenizer is not None
        else OwnerDataset(list("\n".join(texts).encode("utf-8")), settings=data)
        for texts in owner_texts(source)
    ]  # fmt: skip
    if any(d.num_validation == 0 or d.num_samples < settings.batch_size for d in datasets):
        raise ValueError("an owner holds out no validation sequence or has less than a batch; add text")
    return datasets


def base_model(settings: FlossSettings, vocab_size: int, datasets: Sequence[OwnerDataset]) -> PreTrainedModel:
    """The frozen model under the adapters: loaded weights, or a tiny Llama warmed up on the owners' data.

    A random tiny model would make LoRA learn the token frequencies first, a regime unlike
    fine-tuning a pretrained model; ``base_steps`` of full training give it a start.
    """
    if settings.model != "tiny":
        return load_causal_lm(settings.model)
    torch.manual_seed(settings.seed)
    config = tiny_config(
        "llama", vocab_size=vocab_size, hidden_size=settings.tiny_width, intermediate_size=2 * settings.tiny_width,
        num_hidden_layers=settings.tiny_layers, max_position_embeddings=max(128, settings.seq_len),
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if settings.base_steps:
        # split_model shares the model's parameters: training the one stage trains ``model``.
        stage = split_model(model, even_stage_specs(settings.tiny_layers, 1))[0]
        runtime = EventLoopThread()
        pipeline = Pipeline([stage], runtime)
        optimizer = build_local_optimizer([stage], lr=3e-3, weight_decay=0.0)
        try:
            # Owner i % owners, batches of its training split from a later epoch than the adapters reach.
            for i in range(settings.base_steps):
                owner = datasets[i % len(datasets)]
                run_steps(pipeline, owner, steps=1, batch_size=settings.batch_size,
                          start=10_000 + i // len(datasets), local_optimizer=optimizer)  # fmt: skip
        finally:
            pipeline.close()
            runtime.close()
    return model.eval()


@contextmanager
def masked_gradients(stage: StageModule, mask: Mapping[str, Tensor] | None) -> Iterator[None]:
    """Zero every adapter gradient outside ``mask`` (name -> 0/1 tensor) while inside; no-op for None.

    With AdamW at weight decay 0 a parameter whose gradients are always zero never moves, so
    only the masked entries train.
    """
    if mask is None:
        yield
        return
    handles = [param.register_hook(lambda grad, keep=mask[name]: grad * keep)
               for name, param in stage.named_model_parameters() if name in mask]  # fmt: skip
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def top_mask(state: Mapping[str, Tensor], density: float, scope: str) -> dict[str, Tensor]:
    """1 where the topk codec keeps an entry of ``state`` at ``density`` and ``scope``, else 0."""
    kept = decode_update(_codec(density, "fp32", scope).encode(state))
    return {name: (kept[name] != 0).to(tensor.dtype) for name, tensor in state.items()}


# --------------------------------------------------------------------------- the methods


class _Bench:
    def __init__(self, settings: FlossSettings, base: PreTrainedModel, datasets: list[OwnerDataset]) -> None:
        self.s = settings
        self.base = base
        self.datasets = datasets
        self.finetune = get_finetune("lora")
        self.runtime = EventLoopThread()
        self.val_tokens = [sum(b.num_targets for b in d.validation_batches(settings.eval_batch_size)) for d in datasets]

    def ppl(self, pipeline: Pipeline) -> float:
        """Token-weighted perplexity over every owner's validation split."""
        losses = [evaluate(pipeline, d, self.s.eval_batch_size)[0] for d in self.datasets]
        return math.exp(sum(w * x for w, x in zip(self.val_tokens, losses, strict=True)) / sum(self.val_tokens))

    def _adapted(self, method: Method) -> tuple[StageModule, FinetuneSettings]:
        """A fresh copy of the base model as one stage with the method's (seeded) starting adapters."""
        rank = self.s.lora_r // method.rank_divisor
        alpha = self.s.lora_alpha * rank // self.s.lora_r
        lora = FinetuneSettings(lora_r=rank, lora_alpha=alpha, lora_targets=self.s.lora_targets, seed=self.s.seed)
        stage = whole_stage(self.base)
        self.finetune.prepare({0: stage}, lora)
        return stage, lora

    def run(self, method: Method) -> Curve:
        """Train ``method`` for every round; owners take turns on one model (only the adapters differ)."""
        started = time.perf_counter()
        torch.manual_seed(self.s.seed)
        stage, lora = self._adapted(method)
        pipeline = Pipeline([stage], self.runtime)
        global_state = self.finetune.trained_tensors(stage)  # P: name -> adapter tensor
        aggregator = self.s.server.build()
        residuals: list[dict[int, dict[str, Any]]] = [{} for _ in self.datasets]  # per owner, error feedback
        mask: dict[str, Tensor] | None = None
        curve = Curve(ppl=[self.ppl(pipeline)], parameters=sum(t.numel() for t in global_state.values()))
        for round_ in range(1, self.s.rounds + 1):
            download_codec, upload_codec = method.codecs(round_, self.s.values)
            download = download_codec.encode(global_state)
            start = decode_update(download)  # P, or P * top-k mask (zeros elsewhere)
            prepared = self._preparation(lora, upload_codec, method.scope, method.error_feedback)
            updates = []
            for k, dataset in enumerate(self.datasets):
                self.finetune.load_tensors(stage, start)
                holder = Updates(prepared=prepared, residuals=residuals[k])
                holder.mark_start(0, stage)
                optimizer = build_local_optimizer([stage], lr=self.s.lr, weight_decay=0.0)
                with masked_gradients(stage, mask):
                    run_steps(pipeline, dataset, steps=self.s.steps, batch_size=self.s.batch_size,
                              start=(round_ - 1) * self.s.steps, local_optimizer=optimizer)  # fmt: skip
                density = method.upload if upload_codec.sends_changes else 1.0
                upload = Upload(run_id="floss-bench", partitions=(0,), round=round_, density=density,
                                optimizer_state=False)  # fmt: skip
                data = holder.encode(0, stage, None, upload)
                curve.upload_bytes += len(data)
                curve.download_bytes += len(download)
                updates.append(ClientUpdate(state=decode_update(data), num_samples=dataset.num_samples,
                                            delta=upload_codec.sends_changes, client_id=f"owner{k}"))  # fmt: skip
            global_state = aggregator.aggregate(global_state, updates)
            if method.fixed_mask and mask is None:
                mask = top_mask(global_state, method.upload, method.scope)
            if mask is not None:  # SparseAdapter: the pruned entries stay zero (FedAdam's momentum would move them)
                global_state = {name: t * mask[name] for name, t in global_state.items()}
            self.finetune.load_tensors(stage, global_state)
            curve.ppl.append(self.ppl(pipeline))
        pipeline.close()
        curve.seconds = time.perf_counter() - started
        return curve

    def _preparation(self, lora: FinetuneSettings, codec: UpdateCodec, scope: str, error_feedback: bool) -> Preparation:
        """What a holder is told when a run is prepared: here, the upload codec of the round."""
        choice = CodecSettings(values=self.s.values, scope=scope)
        return Preparation(finetune=self.finetune, settings=lora, optimizer="adamw", codec=codec.name,
                           codec_choice=choice, error_feedback=error_feedback, method=get_method("backprop"))  # fmt: skip

    def close(self) -> None:
        self.runtime.close()


def choose(curves: Mapping[str, Curve], methods: Sequence[Method]) -> tuple[str, bool]:
    """``(sparse method the last line reports, whether it is within the tolerance)``.

    The sparse method with the smallest upload among those within PPL_TOLERANCE_PCT of dense's
    final perplexity; when none is, the sparse method with the lowest final perplexity.
    """
    dense = curves["dense"].ppl[-1]
    sparse = [m.name for m in methods if m.sparse]
    within = [n for n in sparse if curves[n].ppl[-1] <= dense * (1 + PPL_TOLERANCE_PCT / 100)]
    if within:
        return min(within, key=lambda n: (curves[n].upload_bytes, curves[n].ppl[-1])), True
    return min(sparse, key=lambda n: curves[n].ppl[-1]), False


def run_floss(
    settings: FlossSettings, *, tokenizer: Any | None = None, log: Callable[[str], None] | None = None
) -> FlossResult:
    """Train every method of ``settings`` and measure; ``tokenizer`` defaults to the model's (UTF-8 bytes for tiny)."""
    say = log or (lambda _line: None)
    started = time.perf_counter()
    if tokenizer is None and settings.model != "tiny":
        tokenizer = load_tokenizer(settings.model)
    datasets = owner_datasets(settings, tokenizer)
    say("owners: " + ", ".join(f"{d.num_samples} train / {d.num_validation} val sequences" for d in datasets))
    base = base_model(settings, BYTE_VOCAB if tokenizer is None else len(tokenizer), datasets)
    bench = _Bench(settings, base, datasets)
    curves: dict[str, Curve] = {}
    try:
        for method in settings.methods:
            curves[method.name] = curve = bench.run(method)
            say(f"{method.name}: {curve.seconds:.1f} s, ppl {' '.join(f'{p:.3f}' for p in curve.ppl)}, "
                f"up {curve.upload_bytes:,} B, down {curve.download_bytes:,} B")  # fmt: skip
    finally:
        bench.close()
    chosen, within = choose(curves, settings.methods)
    return FlossResult(curves=curves, chosen=chosen, within=within, seconds=time.perf_counter() - started)


# --------------------------------------------------------------------------- command line


def quick_settings() -> FlossSettings:
    """``--quick``: byte-level tiny Llama (4 x 64, warmed up 100 steps), 3 owners, 20 rounds x 5 steps, batch 4 x 64."""
    return FlossSettings(owners=3, rounds=20, steps=5, max_chars_per_owner=40_000)


def full_settings() -> FlossSettings:
    """The default: SmolLM2-135M, 4 owners of 40,000 KJV characters, 8 rounds x 3 steps, batch 4 x 64."""
    return FlossSettings(
        model="smollm2", owners=4, rounds=8, steps=3, lr=1e-3, max_chars_per_owner=40_000, val_fraction=0.05,
        eval_batch_size=8,
    )  # fmt: skip


def _parse(argv: Sequence[str] | None) -> tuple[FlossSettings, int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="byte-level tiny Llama, 3 owners (about a minute)")
    parser.add_argument("--model", help="'tiny', 'smollm2', or a folder or .gguf file with pretrained weights")
    parser.add_argument("--data", help="a .txt file (cut into --owners parts) or a folder of them (one owner each)")
    parser.add_argument("--owners", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--steps", type=int, help="local optimizer steps per owner per round")
    parser.add_argument("--lr", type=float, help="local AdamW learning rate")
    parser.add_argument("--server-lr", type=float, dest="server_lr", help="FedAdam's server learning rate")
    parser.add_argument("--seed", type=int)
    # One thread by default: the thread count changes float rounding, so a fixed default keeps
    # the last line reproducible; on the shared 2-core machines a second one gains little.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    settings = quick_settings() if args.quick else full_settings()
    names = {f.name for f in fields(FlossSettings)}
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.server_lr is not None:
        overrides["server"] = replace(settings.server, server_lr=args.server_lr)
    return replace(settings, **overrides), args.threads


def main(argv: Sequence[str] | None = None) -> int:
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    settings, threads = _parse(argv)
    torch.set_num_threads(threads)
    s, server = settings, settings.server
    print(f"model={s.model} owners={s.owners} rounds={s.rounds} steps/owner/round={s.steps} "
          f"batch={s.batch_size}x{s.seq_len} local=AdamW(lr={s.lr}, wd=0, fresh each round) "
          f"lora r={s.lora_r} alpha={s.lora_alpha} server={server.kind}(lr={server.server_lr}, b1={server.beta1}, "
          f"b2={server.beta2}, tau={server.tau}, wd=0) values={s.values} seed={s.seed} "
          f"threads={threads}", flush=True)  # fmt: skip
    for method in s.methods:
        print("  " + method.describe(s.lora_r))
    result = run_floss(settings, log=lambda line: print(line, flush=True))
    print("validation perplexity of the global adapters (round 0: before training; token-weighted over the owners)")
    print(result.table())
    print("bytes over every owner and round (encoded: what crosses the network); x: dense / this")
    print(result.traffic())
    print(f"total {result.seconds:.1f} s")
    if not result.within:
        print(f"no sparse method is within {PPL_TOLERANCE_PCT:g}% of dense LoRA's perplexity; the line reports the "
              f"one with the lowest perplexity, {result.chosen}")  # fmt: skip
    else:
        print(f"sparsest method within {PPL_TOLERANCE_PCT:g}% of dense: {result.chosen}")
    print(result.summary_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
