"""Forward gradients (FwdLLM) against backprop for federated LoRA: client memory, upload bytes, perplexity.

Two measurements, the same model family, data and settings for every method:

Training memory of a client (each method in a fresh process, ``--probe``)
    The model (``memory_model``, SmolLM2-135M by default, also in ``--quick``) is loaded in
    fp32 and LoRA added; then the resident set after loading is read (``VmRSS``), the
    high-water mark is reset (``/proc/self/clear_refs`` 5) and ``memory_steps`` training steps
    run on a ``memory_batch x memory_seq`` batch (8 x 256 tokens). Training memory is the
    high-water mark (``VmHWM``) minus the resident set after loading: what training adds, the
    interpreter and the weights being the same for every method. The tokens are drawn at
    random from the vocabulary (memory does not depend on them). Methods: ``bp`` (forward,
    backward, AdamW), ``bp_ckpt`` (the same with activation checkpointing of every decoder
    block, ``activation_checkpointing_enable``, non-reentrant) and ``fwd`` (central differences
    under ``torch.no_grad``: nothing is kept for a backward; ``memory_perturbations``
    directions per step, which changes the time, not the memory). All three run on the same
    transformers model object, so only the training step differs.

Federated quality (one process)
    Every owner holds its own copy of the base model with the same seeded LoRA adapters. Each
    round every owner loads the global adapters, trains ``steps`` local steps on its data and
    uploads its change through the ``seeds`` codec (:class:`client.trainer.Updates`, the
    holders' own code): a forward-gradient owner's upload is its (seed, coefficient) pairs, a
    backprop owner's its dense change (what dense LoRA uploads). The server averages the
    changes by samples (FedAvg, server lr 1; the rebuild of a seeds upload is the server's
    real decode). Methods: ``bp`` (AdamW at ``lr_bp``, fresh each round, as bench/floss.py),
    ``fwd_fixed`` (K = ``perturbations`` directions per step), ``fwd_adaptive`` (the variance
    rule, up to ``max_perturbations``), ``fwd_sampler`` (adaptive plus the discriminative
    sampler, ``candidates`` x K seeds drawn). Forward-gradient steps are SGD at ``lr_fwd`` on
    the estimate clipped to ``clip_fwd``. Validation perplexity: the global adapters on the
    union of the owners' held-out sequences (token-weighted), before round 1 and after each.
    Activation checkpointing computes the same numbers as ``bp``, so it has no curve of its own.

The last line: ``mem_reduction=<1 - fwd / bp training memory> mem_reduction_vs_ckpt=<1 - fwd /
bp_ckpt> upload_reduction=<bp upload bytes per round / those of the reported forward method>
ppl_base=<round 0> ppl_bp=<bp's final> ppl_fwd=<the reported forward method's final>
rounds_to_bp=<the first round the reported forward method reaches bp's final perplexity, or
none>``. The reported forward method is the one with the lowest final perplexity.

    python -m bench.forward_gradient --quick   # quality: byte-level tiny Llama; memory: SmolLM2-135M at 8 x 256
    python -m bench.forward_gradient           # quality and memory on SmolLM2-135M (KJV by book)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel

from autograd_bridge.codecs import CodecSettings, decode_update
from autograd_bridge.finetune import FinetuneSettings, get_finetune
from autograd_bridge.methods import ForwardGradientSettings, TrainingMethod, get_method
from autograd_bridge.methods.forward_gradient import ForwardGradient
from autograd_bridge.methods.perturbation import ParameterSpace
from autograd_bridge.partition import causal_lm_loss
from autograd_bridge.pipeline import Pipeline
from autograd_bridge.runtime import EventLoopThread
from bench.floss import BYTE_VOCAB, FlossSettings, base_model, owner_datasets
from bench.pretrain import whole_stage
from client.data import OwnerDataset
from client.trainer import Preparation, Updates
from client.training import build_local_optimizer, evaluate, run_steps
from proto.messages import Upload
from server.training.aggregation import AggregationSettings, ClientUpdate

REPO_ROOT = Path(__file__).resolve().parents[1]
PROBES = ("bp", "bp_ckpt", "fwd")
METHODS = ("bp", "fwd_fixed", "fwd_adaptive", "fwd_sampler")


@dataclass(frozen=True, slots=True, kw_only=True)
class FwdBenchSettings:
    """One comparison."""

    model: str = "tiny"  # quality runs on: "tiny" (byte-level Llama, warmed up), "smollm2", or a folder/.gguf
    data: str | None = None  # a .txt file or a folder of them (one owner each); None: KJV by book
    owners: int = 3
    rounds: int = 10
    steps: int = 5  # local steps per owner and round
    batch_size: int = 4
    seq_len: int = 64
    lr_bp: float = 2e-3  # backprop: local AdamW (weight decay 0, fresh each round)
    lr_fwd: float = 0.3  # forward gradients: SGD on the estimate
    clip_fwd: float = 5.0  # forward gradients: the estimate's norm is clipped to this
    h: float = 0.01  # central-difference step
    perturbations: int = 8  # K of fwd_fixed, and the start (and increment) of the adaptive methods
    max_perturbations: int = 32  # the adaptive methods' ceiling
    var_threshold: float = 0.01  # the variance rule's threshold on mean(d^2) / K
    candidates: int = 10  # the sampler draws candidates x K seeds
    lora_r: int = 8
    lora_alpha: int = 16
    max_chars_per_owner: int | None = 40_000
    val_fraction: float = 0.1
    eval_batch_size: int = 16
    tiny_layers: int = 4
    tiny_width: int = 64
    base_steps: int = 100  # tiny only: full AdamW steps on the owners' data before the adapters
    seed: int = 0
    memory_model: str = "smollm2"  # the model of the memory probes
    memory_batch: int = 8
    memory_seq: int = 256
    memory_steps: int = 1  # the peak comes within the first step; later steps repeat its allocations
    memory_perturbations: int = 1  # directions per probe step (time, not memory)
    methods: tuple[str, ...] = METHODS  # which quality curves run (bp and one fwd at least)

    def __post_init__(self) -> None:
        if "bp" not in self.methods or not any(m.startswith("fwd") for m in self.methods):
            raise ValueError("methods need 'bp' and at least one forward-gradient method")
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")

    def forward_settings(self, name: str, seed: int) -> ForwardGradientSettings:
        """The forward-gradient settings of method ``name`` for an owner seeded ``seed``."""
        adaptive = name != "fwd_fixed"
        return ForwardGradientSettings(
            h=self.h, perturbations=self.perturbations,
            max_perturbations=self.max_perturbations if adaptive else self.perturbations,
            var_threshold=self.var_threshold if adaptive else 0.0, sampler=name == "fwd_sampler",
            candidates=self.candidates, seed=seed,
        )  # fmt: skip


# --------------------------------------------------------------------------- memory


def _status(field: str) -> int:
    """A ``/proc/self/status`` entry in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def probe(method: str, settings: FwdBenchSettings) -> int:
    """Bytes ``method``'s training adds to this process's resident high-water mark (run in a fresh process)."""
    from autograd_bridge.lora import add_lora
    from autograd_bridge.models import load_causal_lm

    torch.manual_seed(settings.seed)
    model = load_causal_lm(settings.memory_model)
    add_lora(model, r=settings.lora_r, alpha=settings.lora_alpha)
    if method == "bp_ckpt":
        if hasattr(model, "activation_checkpointing_enable"):  # the name transformers 5.x gives it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(settings.seed)
    ids = torch.randint(3, vocab, (settings.memory_batch, settings.memory_seq), generator=generator)
    mask = torch.ones_like(ids)
    gc.collect()
    loaded = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from the current RSS
    if method == "fwd":
        space = ParameterSpace(model.named_parameters())
        fwd = ForwardGradient(
            replace(settings, perturbations=settings.memory_perturbations).forward_settings("fwd_fixed", 0)
        )

        def loss() -> float:
            with torch.no_grad():
                return float(causal_lm_loss(model(input_ids=ids, attention_mask=mask).logits, ids))

        for _ in range(settings.memory_steps):
            estimate = fwd.estimate([space], loss)
            k = len(estimate.seeds)
            space.apply(
                [(s, -settings.lr_fwd * d / k) for s, d in zip(estimate.seeds, estimate.slopes, strict=True)]
            )
    else:
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=settings.lr_bp, weight_decay=0.0
        )
        for _ in range(settings.memory_steps):
            causal_lm_loss(model(input_ids=ids, attention_mask=mask).logits, ids).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return _status("VmHWM") - loaded


#: the settings a memory figure depends on: a --memory-file is reused only when they match
MEMORY_KEYS = ("memory_model", "memory_batch", "memory_seq", "memory_steps", "memory_perturbations", "lora_r",
               "lora_alpha", "h", "seed")  # fmt: skip


def measure_memory(
    settings: FwdBenchSettings,
    log: Callable[[str], None],
    record: Path | None = None,
    only: Sequence[str] = PROBES,
) -> dict[str, int]:
    """Each probe in a fresh interpreter; bytes of training memory by method.

    With ``record``, probes it already holds for the same memory settings are reused, and each
    new one is written to it as soon as it is measured (a slow machine can measure them in
    separate invocations, each within its time limit).
    """
    key = {k: getattr(settings, k) for k in MEMORY_KEYS}
    saved = json.loads(record.read_text()) if record is not None and record.exists() else {}
    out: dict[str, int] = dict(saved.get("bytes", {})) if saved.get("settings") == key else {}
    for method in only:
        if method in out:
            log(
                f"memory {method}: {out[method] / 2**20:,.1f} MiB added by training (measured earlier, {record})"
            )
            continue
        began = time.perf_counter()
        command = [sys.executable, "-m", "bench.forward_gradient", "--probe", method,
                   "--settings-json", json.dumps(_plain(settings))]  # fmt: skip
        done = subprocess.run(
            command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"memory probe {method} failed:\n{done.stderr[-3000:]}")
        out[method] = int(done.stdout.strip().splitlines()[-1].removeprefix("probe_bytes="))
        if record is not None:
            record.write_text(json.dumps({"settings": key, "bytes": out}, indent=1))
        log(
            f"memory {method}: {out[method] / 2**20:,.1f} MiB added by training ({time.perf_counter() - began:.0f} s)"
        )
    return out


def _plain(settings: FwdBenchSettings) -> dict[str, Any]:
    return {
        f.name: (list(v) if isinstance(v := getattr(settings, f.name), tuple) else v)
        for f in fields(settings)
    }


# --------------------------------------------------------------------------- quality


@dataclass(slots=True)
class Curve:
    """What one method measured over the rounds."""

    ppl: list[float]  # before round 1 and after each round
    upload_bytes: int = 0  # every owner's uploads, every round, as encoded
    directions: int = 0  # forward methods: perturbations used, all owners and steps
    seconds: float = 0.0


class _Owner:
    """One data owner: its own model copy, pipeline, method and upload holder."""

    def __init__(
        self, base: PreTrainedModel, lora: FinetuneSettings, method: TrainingMethod, runtime: EventLoopThread
    ) -> None:
        self.finetune = get_finetune("lora")
        self.stage = whole_stage(base)
        self.finetune.prepare({0: self.stage}, lora)
        self.pipeline = Pipeline([self.stage], runtime)
        self.method = method
        prepared = Preparation(finetune=self.finetune, settings=lora, optimizer="adamw", codec="seeds",
                               codec_choice=CodecSettings(), error_feedback=False, method=method)  # fmt: skip
        self.updates = Updates(prepared=prepared)


def run_quality(
    settings: FwdBenchSettings,
    base: PreTrainedModel,
    datasets: Sequence[OwnerDataset],
    name: str,
    log: Callable[[str], None],
) -> Curve:
    """Federated rounds of method ``name``; the global adapters' validation perplexity after each."""
    began = time.perf_counter()
    torch.manual_seed(settings.seed)
    lora = FinetuneSettings(lora_r=settings.lora_r, lora_alpha=settings.lora_alpha, seed=settings.seed)
    runtime = EventLoopThread()
    owners = []
    for k in range(len(datasets)):
        method = (
            get_method("backprop")
            if name == "bp"
            else ForwardGradient(settings.forward_settings(name, 1000 + k))
        )
        owners.append(_Owner(base, lora, method, runtime))
    finetune = owners[0].finetune
    global_state = finetune.trained_tensors(owners[0].stage)
    aggregator = AggregationSettings(kind="fedavg", server_lr=1.0).build()
    val_tokens = [
        sum(b.num_targets for b in d.validation_batches(settings.eval_batch_size)) for d in datasets
    ]

    def ppl() -> float:
        finetune.load_tensors(owners[0].stage, global_state)
        losses = [evaluate(owners[0].pipeline, d, settings.eval_batch_size)[0] for d in datasets]
        return math.exp(sum(w * x for w, x in zip(val_tokens, losses, strict=True)) / sum(val_tokens))

    curve = Curve(ppl=[ppl()])
    try:
        for round_ in range(1, settings.rounds + 1):
            updates = []
            for k, (owner, data) in enumerate(zip(owners, datasets, strict=True)):
                finetune.load_tensors(owner.stage, global_state)
                owner.updates.mark_start(0, owner.stage)
                forward = name != "bp"
                optimizer = (
                    None
                    if forward
                    else build_local_optimizer([owner.stage], lr=settings.lr_bp, weight_decay=0.0)
                )
                before = len(getattr(owner.method, "applied", []))
                run_steps(owner.pipeline, data, steps=settings.steps, batch_size=settings.batch_size,
                          start=(round_ - 1) * settings.steps, local_optimizer=optimizer, method=owner.method,
                          lr=settings.lr_fwd if forward else settings.lr_bp,
                          clip_norm=settings.clip_fwd if forward else None)  # fmt: skip
                if forward:
                    curve.directions += sum(len(p) for p in owner.method.applied[before:])  # type: ignore[attr-defined]
                upload = Upload(run_id="fwd-bench", partitions=(0,), round=round_, optimizer_state=False)
                sent = owner.updates.encode(0, owner.stage, None, upload)
                curve.upload_bytes += len(sent)
                updates.append(ClientUpdate(state=decode_update(sent), num_samples=data.num_samples, delta=True,
                                            client_id=f"owner{k}"))  # fmt: skip
            global_state = aggregator.aggregate(global_state, updates)
            curve.ppl.append(ppl())
            log(f"  {name} round {round_}: ppl {curve.ppl[-1]:.3f}")
    finally:
        for owner in owners:
            owner.pipeline.close()
        runtime.close()
    curve.seconds = time.perf_counter() - began
    return curve


# --------------------------------------------------------------------------- the comparison


@dataclass(slots=True)
class FwdResult:
    memory: dict[str, int]
    curves: dict[str, Curve]
    rounds: int

    @property
    def reported(self) -> str:
        """The forward method with the lowest final perplexity."""
        return min((n for n in self.curves if n != "bp"), key=lambda n: self.curves[n].ppl[-1])

    def rounds_to_bp(self) -> int | None:
        target = self.curves["bp"].ppl[-1]
        return next((r for r, p in enumerate(self.curves[self.reported].ppl) if r > 0 and p <= target), None)

    def summary_line(self) -> str:
        bp, fwd = self.curves["bp"], self.curves[self.reported]
        m = self.memory
        reached = self.rounds_to_bp()
        return (
            f"mem_reduction={1 - m['fwd'] / m['bp']:.3f} mem_reduction_vs_ckpt={1 - m['fwd'] / m['bp_ckpt']:.3f} "
            f"upload_reduction={bp.upload_bytes / fwd.upload_bytes:.1f} ppl_base={bp.ppl[0]:.4f} "
            f"ppl_bp={bp.ppl[-1]:.4f} ppl_fwd={fwd.ppl[-1]:.4f} rounds_to_bp={'none' if reached is None else reached}"
        )

    def table(self) -> str:
        names = list(self.curves)
        lines = ["round" + "".join(f"{n:>14}" for n in names)]
        for r in range(self.rounds + 1):
            lines.append(f"{r:>5}" + "".join(f"{self.curves[n].ppl[r]:>14.3f}" for n in names))
        return "\n".join(lines)


def run_comparison(
    settings: FwdBenchSettings,
    *,
    log: Callable[[str], None] = lambda _l: None,
    memory_file: Path | None = None,
) -> FwdResult:
    """Memory probes (fresh processes), then every quality curve."""
    memory = measure_memory(settings, log, memory_file)
    from autograd_bridge.models import load_tokenizer

    tokenizer = None if settings.model == "tiny" else load_tokenizer(settings.model)
    source = FlossSettings(
        model=settings.model, data=settings.data, owners=settings.owners, batch_size=settings.batch_size,
        seq_len=settings.seq_len, max_chars_per_owner=settings.max_chars_per_owner, val_fraction=settings.val_fraction,
        tiny_layers=settings.tiny_layers, tiny_width=settings.tiny_width, base_steps=settings.base_steps,
        seed=settings.seed, eval_batch_size=settings.eval_batch_size,
    )  # fmt: skip
    datasets = owner_datasets(source, tokenizer)
    base = base_model(source, BYTE_VOCAB if tokenizer is None else len(tokenizer), datasets)
    curves = {}
    for name in settings.methods:
        curves[name] = curve = run_quality(settings, base, datasets, name, log)
        per_round = curve.upload_bytes / settings.rounds / len(datasets)
        log(f"{name}: {curve.seconds:.1f} s, {per_round:,.0f} upload bytes per owner and round"
            + (f", {curve.directions / settings.rounds / settings.steps / len(datasets):.1f} directions per step"
               if name != "bp" else ""))  # fmt: skip
    return FwdResult(memory=memory, curves=curves, rounds=settings.rounds)


def quick_settings() -> FwdBenchSettings:
    """``--quick``: quality on a byte-level tiny Llama (4 x 64, warmed up), 3 owners, 6 rounds x 4 steps, K 4 (adaptive
    up to 16); memory on SmolLM2-135M at 8 x 256."""
    return FwdBenchSettings(rounds=6, steps=4, perturbations=4, max_perturbations=16)


def full_settings() -> FwdBenchSettings:
    """SmolLM2-135M for both: 3 owners of 20,000 KJV characters, 4 rounds x 3 steps, batch 4 x 64."""
    return FwdBenchSettings(
        model="smollm2", rounds=4, steps=3, lr_bp=1e-3, max_chars_per_owner=20_000, val_fraction=0.05, eval_batch_size=8,
    )  # fmt: skip


def _parse(argv: Sequence[str] | None) -> tuple[FwdBenchSettings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="tiny model for the quality curves (memory stays SmolLM2)"
    )
    parser.add_argument(
        "--model", help="quality and memory model: 'tiny' (quality only), 'smollm2', or a folder/.gguf"
    )
    parser.add_argument("--data", help="a .txt file or a folder of them (one owner each)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads of the quality runs (default 1)"
    )
    parser.add_argument(
        "--memory-file", type=Path, help="JSON file: reuse the probes it holds, add the ones measured"
    )
    parser.add_argument(
        "--memory-only", action="store_true", help="measure the memory probes (into --memory-file) and stop"
    )
    parser.add_argument(
        "--probes", default=",".join(PROBES), help="with --memory-only: which probes to measure"
    )
    parser.add_argument("--probe", choices=PROBES, help=argparse.SUPPRESS)  # internal: one memory probe
    parser.add_argument("--settings-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.settings_json:
        values = json.loads(args.settings_json)
        values["methods"] = tuple(values["methods"])
        return FwdBenchSettings(**values), args
    settings = quick_settings() if args.quick else full_settings()
    overrides = {
        k: v
        for k, v in vars(args).items()
        if k in {"model", "data", "rounds", "steps", "seed"} and v is not None
    }
    if args.model and args.model != "tiny":
        overrides["memory_model"] = args.model
    return replace(settings, **overrides), args


def main(argv: Sequence[str] | None = None) -> int:
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    settings, args = _parse(argv)
    if args.probe:
        print(f"probe_bytes={probe(args.probe, settings)}")
        return 0
    torch.set_num_threads(args.threads)
    s = settings
    print(f"quality: model={s.model} owners={s.owners} rounds={s.rounds} steps={s.steps} batch={s.batch_size}x{s.seq_len} "
          f"lora r={s.lora_r} alpha={s.lora_alpha}; bp AdamW lr={s.lr_bp}; fwd SGD lr={s.lr_fwd} clip={s.clip_fwd} h={s.h} "
          f"K={s.perturbations} (adaptive up to {s.max_perturbations}, threshold {s.var_threshold}, sampler "
          f"{s.candidates}x); server FedAvg of changes; uploads through the seeds codec")  # fmt: skip
    print(f"memory: model={s.memory_model} batch={s.memory_batch}x{s.memory_seq} steps={s.memory_steps}, "
          f"each method in a fresh process (VmHWM - VmRSS after loading)", flush=True)  # fmt: skip
    if args.memory_only:
        only = [p for p in args.probes.split(",") if p]
        if not set(only) <= set(PROBES):
            parser_error = f"--probes takes {', '.join(PROBES)}, got {args.probes!r}"
            raise SystemExit(parser_error)
        memory = measure_memory(settings, lambda line: print(line, flush=True), args.memory_file, only)
        print(" ".join(f"{k}={v}" for k, v in memory.items()))
        return 0
    result = run_comparison(settings, log=lambda line: print(line, flush=True), memory_file=args.memory_file)
    print("training memory (MiB added over the loaded model): " + ", ".join(
        f"{k} {v / 2**20:,.1f}" for k, v in result.memory.items()))  # fmt: skip
    print("validation perplexity of the global adapters (round 0: before training)")
    print(result.table())
    per_round = {n: c.upload_bytes / s.rounds / s.owners for n, c in result.curves.items()}
    print("upload bytes per owner and round: " + ", ".join(f"{n} {b:,.0f}" for n, b in per_round.items()))
    print(f"reported forward method: {result.reported}")
    print(result.summary_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
