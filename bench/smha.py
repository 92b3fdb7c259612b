"""SMHA: step time and validation perplexity when a data owner trains 1/4, 1/2 or all of the attention heads.

One owner fine-tunes the same base model in several ways, side by side on the same batches:

* ``full``: every weight trains (the reference of full fine-tuning);
* ``heads_1``, ``heads_0.5``, ``heads_0.25``: heads mode (:mod:`autograd_bridge.finetune.heads`)
  with that share of every block's heads, drawn at random anew every ``steps_per_round``
  steps (one "round"), everything else frozen; ``--adapter lora`` trains per-head LoRA
  adapters instead of the heads' weight slices, ``--choice importance`` picks heads by
  gradient magnitude.

The modes take their steps in turn (step 1 of every mode, then step 2 ...), so the load of a
shared machine falls on all of them alike. The step time of a mode is the median wall time
of its steps after the first two (forward, backward, AdamW step with weight decay 0: the
owner's whole step as ``client.training.run_steps`` times it). Perplexity is on the owner's
held-out sequences after the last step.

The last line compares heads mode at 1/4 and 1/2 of the heads with heads mode at every
head: ``smha25_step_pct=<x> smha50_step_pct=<x> smha25_ppl_pct=<x> smha50_ppl_pct=<x>
full_step_pct=<x>`` (percent changes of the median step time and the final perplexity;
``full_step_pct`` is full fine-tuning's step time against heads mode at every head). The
poster's figures (wall time of a run, not one step): 1/4 of the heads -21.89% and +2.3%
perplexity, 1/2 -15.37% and +1.1%.

The tiny model of ``--quick`` reads UTF-8 bytes (vocabulary 256) so that the embedding and
the head do not dwarf the attention, and is warmed up by ``base_steps`` of full training
first, so the heads fine-tune a model that already knows something.

    python -m bench.smha --quick     # byte-level tiny Llama (4 x 128, 8 heads, 4 kv), 40 steps per mode: about a minute
    python -m bench.smha             # SmolLM2-135M (30 x 576, 9 heads, 3 kv) on KJV text, 8 steps of 2 x 64 per mode: ~7 min
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedModel

from autograd_bridge.finetune import FinetuneSettings, get_finetune
from autograd_bridge.models import load_causal_lm, load_tokenizer, tiny_config
from autograd_bridge.partition import StageModule, even_stage_specs, split_model
from autograd_bridge.pipeline import Pipeline
from autograd_bridge.runtime import EventLoopThread
from bench.pretrain import PretrainSettings, owner_texts, whole_stage
from client.data import DataSettings, OwnerDataset
from client.training import build_local_optimizer, evaluate, run_steps


@dataclass(frozen=True, slots=True, kw_only=True)
class SmhaSettings:
    """One comparison."""

    model: str = "smollm2"  # "tiny" (a byte-level Llama from a config), "smollm2", or a folder / .gguf file
    data: str | None = (
        None  # a .txt file or a folder of them (their text together); None: the KJV's first books
    )
    steps: int = 8  # optimizer steps per mode
    steps_per_round: int = 4  # heads are drawn anew every this many steps
    batch_size: int = 2  # sequences per step
    seq_len: int = 64  # tokens per sequence
    lr: float = 1e-4  # AdamW learning rate of every mode (weight decay 0)
    fractions: tuple[float, ...] = (
        1.0,
        0.5,
        0.25,
    )  # heads mode at these shares of the heads (1.0 is the reference)
    adapter: str = (
        "full"  # heads mode trains the heads' weight slices ("full") or per-head LoRA on them ("lora")
    )
    choice: str = "random"  # heads drawn at "random" every round, or by "importance"
    lora_r: int = 8  # per-head LoRA rank (adapter = "lora")
    max_chars: int = 60_000  # characters of text (KJV when --data is not given)
    val_fraction: float = 0.1  # share of the sequences held out for the perplexity
    eval_batch_size: int = 8
    seed: int = 0
    tiny_layers: int = 4  # the tiny model: blocks, width, heads, key/value heads
    tiny_width: int = 128
    tiny_heads: int = 8
    tiny_kv_heads: int = 4
    base_steps: int = 100  # full training of the tiny model before the comparison (0: none)
    base_lr: float = 3e-3


@dataclass(slots=True)
class Mode:
    """One way of fine-tuning, with its own copy of the model, optimizer and timings."""

    name: str
    finetune: str
    fraction: float = 1.0
    stage: Any = None
    holder: Any = None
    optimizer: Any = None
    pipeline: Any = None
    seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    ppl: float = math.nan

    @property
    def step_s(self) -> float:
        """Median step time after the first two steps."""
        return statistics.median(self.seconds[2:] or self.seconds)


@dataclass(frozen=True, slots=True, kw_only=True)
class SmhaResult:
    modes: list[Mode]
    seconds: float

    def by_name(self, name: str) -> Mode:
        return next(m for m in self.modes if m.name == name)

    def table(self) -> str:
        ref = self.by_name("heads_1")
        rows = [
            f"{'mode':<12} {'trained':>12} {'step s':>9} {'vs all':>8} {'first loss':>10} {'last loss':>10} {'val ppl':>9} {'vs all':>8}"
        ]
        for m in self.modes:
            trained = _trained_elements(m)
            rows.append(
                f"{m.name:<12} {trained:>12,} {m.step_s:>9.4f} {_pct(m.step_s, ref.step_s):>+7.2f}% "
                f"{m.losses[0]:>10.4f} {m.losses[-1]:>10.4f} {m.ppl:>9.3f} {_pct(m.ppl, ref.ppl):>+7.2f}%"
            )
        return "\n".join(rows)

    def summary_line(self) -> str:
        ref = self.by_name("heads_1")
        values = {}
        for share, key in ((0.25, "smha25"), (0.5, "smha50")):
            mode = self.by_name(f"heads_{share:g}")
            values[f"{key}_step_pct"] = _pct(mode.step_s, ref.step_s)
            values[f"{key}_ppl_pct"] = _pct(mode.ppl, ref.ppl)
        values["full_step_pct"] = _pct(self.by_name("full").step_s, ref.step_s)
        order = ("smha25_step_pct", "smha50_step_pct", "smha25_ppl_pct", "smha50_ppl_pct", "full_step_pct")
        return " ".join(f"{k}={values[k]:.2f}" for k in order)


def _trained_elements(mode: Mode) -> int:
    """Weights the mode trains in a round: its chosen slices in heads mode, every weight in full mode."""
    if mode.finetune != "heads":
        return sum(p.numel() for p in mode.stage.parameters() if p.requires_grad)
    state = mode.stage.model_state()
    return sum(
        len(part.blocks) * part.width * state[name].numel() // state[name].shape[part.dim]
        for name, part in mode.holder.trained_slices(mode.stage).items()
        if part.blocks
    )


def _pct(value: float, reference: float) -> float:
    return (value / reference - 1.0) * 100.0


def owner_dataset(settings: SmhaSettings, tokenizer: Any | None) -> OwnerDataset:
    """The owner's text (UTF-8 bytes when ``tokenizer`` is None), packed into sequences."""
    source = PretrainSettings(data=settings.data, owners=2, max_chars_per_owner=settings.max_chars // 2)
    texts = [t for owner in owner_texts(source) for t in owner]
    data = DataSettings(seq_len=settings.seq_len, val_fraction=settings.val_fraction, seed=settings.seed)
    if tokenizer is None:
        dataset = OwnerDataset(list("\n".join(texts).encode("utf-8")), settings=data)
    else:
        dataset = OwnerDataset.from_texts(texts, tokenizer, settings=data)
    if dataset.num_validation == 0 or dataset.num_samples < settings.batch_size:
        raise ValueError("the text holds out no validation sequence or has less than a batch; add text")
    return dataset


def base_model(settings: SmhaSettings, dataset: OwnerDataset) -> PreTrainedModel:
    """The model every mode starts from: loaded weights, or a tiny byte-level Llama warmed up on the data."""
    if settings.model != "tiny":
        return load_causal_lm(settings.model)
    torch.manual_seed(settings.seed)
    config = tiny_config(
        "llama", vocab_size=256, hidden_size=settings.tiny_width, intermediate_size=2 * settings.tiny_width,
        num_hidden_layers=settings.tiny_layers, num_attention_heads=settings.tiny_heads,
        num_key_value_heads=settings.tiny_kv_heads, max_position_embeddings=max(128, settings.seq_len),
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if settings.base_steps:
        stage = split_model(model, even_stage_specs(settings.tiny_layers, 1))[
            0
        ]  # shares ``model``'s parameters
        with EventLoopThread() as runtime:
            pipeline = Pipeline([stage], runtime)
            optimizer = build_local_optimizer([stage], lr=settings.base_lr)
            # Batches of a later epoch than the comparison reaches.
            run_steps(pipeline, dataset, steps=settings.base_steps, batch_size=settings.batch_size, start=10_000,
                      local_optimizer=optimizer)  # fmt: skip
            pipeline.close()
    return model.eval()


def _prepare(mode: Mode, base: PreTrainedModel, settings: SmhaSettings, runtime: EventLoopThread) -> None:
    mode.stage = whole_stage(base)
    mode.holder = get_finetune(mode.finetune)
    choice = FinetuneSettings(
        lora_r=settings.lora_r, lora_alpha=2 * settings.lora_r, seed=settings.seed, head_fraction=mode.fraction,
        head_choice=settings.choice, head_adapter=settings.adapter, head_key="owner",
    )  # fmt: skip
    stages: dict[int, StageModule] = {0: mode.stage}
    mode.holder.prepare(stages, choice)
    mode.optimizer = build_local_optimizer([mode.stage], lr=settings.lr)
    mode.pipeline = Pipeline([mode.stage], runtime)


def run_smha(settings: SmhaSettings, log: Callable[[str], None] | None = None) -> SmhaResult:
    """Every mode from the same base on the same batches, in turn; their step times and perplexities."""
    began = time.perf_counter()
    tokenizer = None if settings.model == "tiny" else load_tokenizer(settings.model)
    dataset = owner_dataset(settings, tokenizer)
    base = base_model(settings, dataset)
    modes = [Mode(name="full", finetune="full")]
    modes += [
        Mode(name=f"heads_{f:g}", finetune="heads", fraction=f)
        for f in sorted(settings.fractions, reverse=True)
    ]
    with EventLoopThread() as runtime:
        for mode in modes:
            _prepare(mode, base, settings, runtime)
        for step in range(settings.steps):
            if step and step % settings.steps_per_round == 0:  # a new round: heads mode draws new heads
                for mode in modes:
                    mode.holder.begin_round({0: mode.stage}, step // settings.steps_per_round + 1)
            for mode in modes:
                (record,) = run_steps(mode.pipeline, dataset, steps=1, batch_size=settings.batch_size, start=step,
                                      local_optimizer=mode.optimizer)  # fmt: skip
                mode.seconds.append(record.seconds)
                mode.losses.append(record.loss)
            if log is not None and (step + 1) % settings.steps_per_round == 0:
                log(f"step {step + 1}: " + " ".join(f"{m.name} {m.losses[-1]:.4f}" for m in modes))
        for mode in modes:
            mode.stage.eval()
            _, mode.ppl = evaluate(mode.pipeline, dataset, settings.eval_batch_size)
            mode.pipeline.close()
    return SmhaResult(modes=modes, seconds=time.perf_counter() - began)


def quick_settings() -> SmhaSettings:
    """``--quick``: byte-level tiny Llama (4 x 128, 8 heads, 4 kv, warmed up 100 steps), 40 steps of 4 x 128 per mode."""
    return SmhaSettings(model="tiny", steps=40, batch_size=4, seq_len=128, lr=1e-3, max_chars=60_000)


def _parse(argv: Sequence[str] | None) -> tuple[SmhaSettings, int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="byte-level tiny Llama (about a minute)")
    parser.add_argument(
        "--model", help="'tiny', 'smollm2', or a folder or .gguf file with pretrained weights"
    )
    parser.add_argument("--data", help="a .txt file or a folder of them")
    parser.add_argument("--steps", type=int, help="optimizer steps per mode")
    parser.add_argument(
        "--steps-per-round", type=int, dest="steps_per_round", help="heads are drawn anew this often"
    )
    parser.add_argument("--batch-size", type=int, dest="batch_size")
    parser.add_argument("--seq-len", type=int, dest="seq_len")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--adapter", choices=("full", "lora"))
    parser.add_argument("--choice", choices=("random", "importance"))
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    settings = quick_settings() if args.quick else SmhaSettings()
    names = {f.name for f in fields(SmhaSettings)}
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return replace(settings, **overrides), args.threads


def main(argv: Sequence[str] | None = None) -> int:
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    settings, threads = _parse(argv)
    torch.set_num_threads(threads)
    s = settings
    print(f"model={s.model} steps/mode={s.steps} heads redrawn every {s.steps_per_round} steps batch={s.batch_size}x"
          f"{s.seq_len} AdamW(lr={s.lr}, wd=0) adapter={s.adapter} choice={s.choice} seed={s.seed} threads={threads}",
          flush=True)  # fmt: skip
    result = run_smha(settings, log=lambda line: print(line, flush=True))
    print(
        "median step time after two steps, last training loss, validation perplexity; vs all: against heads_1"
    )
    print(result.table())
    print(f"total {result.seconds:.1f} s")
    print(result.summary_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
