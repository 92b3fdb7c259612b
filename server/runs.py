"""What a training run is: :class:`RunSpec`, read from a TOML file plus flags.

A run file names the work; the model and its stages come from the server's ``[model]``
(the server plans for one model), so a run that names another model is refused::

    # run.toml
    case = 3                     # 1: one owner; 2: owners in turn; 3: owners in parallel (FedAvg)
    finetune = "lora"            # or "full"
    rounds = 3
    steps_per_round = 10
    batch_size = 4
    seq_len = 128
    optimizer = "adamw"
    lr = 1e-4
    seed = 0
    tokenizer = "/models/tiny"   # where each data owner loads the tokenizer ("" = the model)

The settings an owner needs for one round travel as JSON in the ``Train`` command
(:func:`train_settings`); the owner validates them again, as it must any network input.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Finetune = Literal["full", "lora"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSpec:
    """One training run, as the operator describes it."""

    name: str = ""  # a label for the operator; the server gives the run its own id
    model: str = ""  # must be the server's model (or empty: the server's model)
    stages: int | None = None  # must match the server's stage count (None: whatever the server plans)
    owners: tuple[str, ...] = ()  # client ids of the data owners (empty: every client with data)
    case: int = 1  # 1: one owner; 2: owners in turn on one pipeline; 3: owners in parallel
    rounds: int = 3  # rounds; a checkpoint is written after each
    steps_per_round: int = 10  # optimizer steps per owner per round
    batch_size: int = 4  # sequences per optimizer step
    seq_len: int = 128  # tokens per sequence
    micro_batches: int = 1  # the owner's pipeline splits each batch into this many micro-batches
    optimizer: str = "adamw"  # the owner's and the hosts' optimizer (hosts run AdamW)
    lr: float = 1e-4  # learning rate of every stage
    finetune: Finetune = "full"  # full fine-tuning, or LoRA adapters only
    lora_r: int = 8  # adapter rank (finetune = "lora")
    lora_alpha: int = 16  # adapter scale numerator (scale = alpha / r)
    lora_targets: tuple[str, ...] = ()  # module names to adapt (empty: autograd_bridge.lora's per-family default)
    aggregator: str = "fedavg"  # how each partition's copies merge at a turn's end (case 3), weighted by samples
    seed: int = 0  # data split and batch order on every owner
    val_fraction: float = 0.1  # share of each owner's sequences held out for validation
    eval_batch_size: int = 8  # sequences per validation batch
    tokenizer: str = ""  # name or path each owner loads its tokenizer from ("": the model)

    def __post_init__(self) -> None:
        if self.case not in (1, 2, 3):
            raise ValueError(f"case must be 1, 2 or 3, got {self.case!r}")
        if self.finetune not in ("full", "lora"):
            raise ValueError(f"finetune must be 'full' or 'lora', got {self.finetune!r}")
        if self.aggregator != "fedavg":
            raise ValueError(f"aggregator must be 'fedavg' on the real system for now, not {self.aggregator!r}")
        if self.optimizer != "adamw":
            raise ValueError(f"stage hosts train with AdamW, so optimizer must be 'adamw', not {self.optimizer!r}")
        for name in ("rounds", "steps_per_round", "batch_size", "micro_batches", "eval_batch_size", "lora_r"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2, got {self.seq_len!r}")
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.val_fraction, int | float) and 0.0 < self.val_fraction < 1.0):
            raise ValueError(f"val_fraction must be in (0, 1) so owners can report perplexity, got {self.val_fraction!r}")
        if self.batch_size % self.micro_batches:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of micro_batches {self.micro_batches}")

    def to_json(self) -> dict[str, Any]:
        """The spec as plain JSON values."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)}


def spec_from_mapping(values: Mapping[str, Any]) -> RunSpec:
    """A RunSpec from a parsed TOML table or JSON object; unknown keys are refused."""
    known = {f.name for f in dataclasses.fields(RunSpec)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown run setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    fixed: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return RunSpec(**fixed)


def load_run_spec(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunSpec:
    """Read a run file (TOML) and apply ``overrides`` (flags; None values are ignored)."""
    try:
        values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read run file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"run file {path} is not valid TOML: {exc}") from exc
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return spec_from_mapping(values)


def prepare_settings(spec: RunSpec) -> dict[str, Any]:
    """How every holder sets its stages up before the first round: the JSON of PrepareRun."""
    return {
        "finetune": spec.finetune,
        "lora_r": spec.lora_r,
        "lora_alpha": spec.lora_alpha,
        "lora_targets": list(spec.lora_targets),
        "seed": spec.seed,
    }


def train_settings(spec: RunSpec, *, round: int, model: str) -> dict[str, Any]:
    """What an owner needs to train round ``round`` (1-based): the JSON of the Train command."""
    return {
        "round": round,
        "steps": spec.steps_per_round,
        "start": (round - 1) * spec.steps_per_round,  # batches of the owner's stream used before
        "batch_size": spec.batch_size,
        "seq_len": spec.seq_len,
        "micro_batches": spec.micro_batches,
        "optimizer": spec.optimizer,
        "lr": spec.lr,
        "seed": spec.seed,
        "val_fraction": spec.val_fraction,
        "eval_batch_size": spec.eval_batch_size,
        "tokenizer": spec.tokenizer or model,
    }
