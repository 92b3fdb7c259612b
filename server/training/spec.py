"""What a training run is: :class:`RunSpec`, read from a TOML file plus flags.

A run file names the work; the model and its stages come from the server's ``[model]``
(the server plans for one model), so a run that names another model is refused::

    # run.toml
    case = 3                     # 1: one owner; 2: owners in turn; 3: owners in parallel
    finetune = "lora"            # or "full"
    rounds = 3
    steps_per_round = 10
    batch_size = 4
    seq_len = 128
    optimizer = "adamw"          # or "sgd": every stage, on the owners and the hosts
    lr = 1e-4
    seed = 0
    tokenizer = "/models/tiny"   # where each data owner loads the tokenizer ("" = the model)
    aggregator = "fedadam"       # case 3 only: fedavg (default), fedadam, fedyogi or fedadagrad
    server_lr = 0.01             # the server optimizer's step size (eta); unused by fedavg
    server_beta1 = 0.9           # its first-moment decay
    server_beta2 = 0.99          # its second-moment decay (fedadam, fedyogi)
    server_tau = 0.001           # its adaptivity: added to sqrt(v), and v starts at tau^2

In case 3 the owners' copies of each partition merge after every round: ``fedavg`` takes their
average weighted by the owners' training samples; a server optimizer (Reddi et al. 2021) takes
the round's starting state minus that average as a pseudo-gradient and makes one Adam, Yogi or
Adagrad step with it, its moments kept across rounds (and in checkpoints). Cases 1 and 2 train one model
in sequence, where the merge of one copy is that copy, so they take ``fedavg`` only.

The settings an owner needs for one round travel as JSON in the ``Train`` command
(:func:`train_settings`); the owner validates them again, as it must any network input.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from server.training.aggregation import AggregationSettings

Finetune = Literal["full", "lora"]
# The merges server.training.aggregation implements. Named again here (a test keeps the two equal) so
# that checking a run file in `titanic-server runs start` does not import torch.
AggregatorName = Literal["fedavg", "fedadam", "fedyogi", "fedadagrad"]
AGGREGATOR_NAMES: tuple[str, ...] = get_args(AggregatorName)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSpec:
    """One training run, as the operator describes it."""

    name: str = ""  # a label for the operator; the server gives the run its own id
    model: str = ""  # must be the server's model (or empty: the server's model)
    stages: int | None = None  # must match the server's stage count (None, or "auto" in a file: whatever the server plans)
    owners: tuple[str, ...] = ()  # client ids of the data owners (empty: every client with data)
    case: int = 1  # 1: one owner; 2: owners in turn on one pipeline; 3: owners in parallel
    rounds: int = 3  # rounds; a checkpoint is written after each
    steps_per_round: int = 10  # optimizer steps per owner per round
    batch_size: int = 4  # sequences per optimizer step
    seq_len: int = 128  # tokens per sequence
    micro_batches: int = 1  # the owner's pipeline splits each batch into this many micro-batches
    optimizer: str = "adamw"  # every stage's optimizer, on the owners and the hosts: "adamw" or "sgd" (weight decay 0)
    lr: float = 1e-4  # learning rate of every stage
    finetune: Finetune = "full"  # full fine-tuning, or LoRA adapters only
    lora_r: int = 8  # adapter rank (finetune = "lora")
    lora_alpha: int = 16  # adapter scale numerator (scale = alpha / r)
    lora_targets: tuple[str, ...] = ()  # module names to adapt (empty: autograd_bridge.lora's per-family default)
    aggregator: AggregatorName = "fedavg"  # how case 3 merges each partition's copies: fedavg or a server optimizer
    server_lr: float = 1e-2  # server optimizer step size (eta in Reddi et al.); unused by fedavg
    server_beta1: float = 0.9  # server optimizer first-moment decay, in [0, 1)
    server_beta2: float = 0.99  # second-moment decay of fedadam and fedyogi, in [0, 1)
    server_tau: float = 1e-3  # adaptivity, > 0: the step divides by sqrt(v) + tau, and v starts at tau^2
    seed: int = 0  # data split and batch order on every owner
    val_fraction: float = 0.1  # share of each owner's sequences held out for validation
    eval_batch_size: int = 8  # sequences per validation batch
    tokenizer: str = ""  # name or path each owner loads its tokenizer from ("": the model)

    def __post_init__(self) -> None:
        if self.case not in (1, 2, 3):
            raise ValueError(f"case must be 1, 2 or 3, got {self.case!r}")
        if self.finetune not in ("full", "lora"):
            raise ValueError(f"finetune must be 'full' or 'lora', got {self.finetune!r}")
        self._check_aggregation()
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd' (what every stage host can run), not {self.optimizer!r}")
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

    def _check_aggregation(self) -> None:
        if self.aggregator not in AGGREGATOR_NAMES:
            raise ValueError(f"aggregator must be one of {', '.join(AGGREGATOR_NAMES)}, got {self.aggregator!r}")
        if self.server_optimizer and self.case != 3:
            raise ValueError(
                f"aggregator {self.aggregator!r} needs case = 3: cases 1 and 2 train one model in sequence, "
                "where the merge of one copy is that copy; use aggregator = 'fedavg' or case = 3"
            )
        for name in ("server_lr", "server_tau"):
            value = getattr(self, name)
            if not _is_number(value) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("server_beta1", "server_beta2"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1) (0.9 and 0.99 are the usual), got {value!r}")

    @property
    def server_optimizer(self) -> bool:
        """Whether merging is a server optimizer step (it needs the state each round started from)."""
        return self.aggregator != "fedavg"

    def to_json(self) -> dict[str, Any]:
        """The spec as plain JSON values."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)}


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def aggregation_settings(spec: RunSpec) -> AggregationSettings:
    """How the server merges each partition's copies in ``spec``'s run (build() gives the aggregator)."""
    from server.training.aggregation import AggregationSettings

    return AggregationSettings(
        kind=spec.aggregator,
        server_lr=float(spec.server_lr),
        beta1=float(spec.server_beta1),
        beta2=float(spec.server_beta2),
        tau=float(spec.server_tau),
    )


def spec_from_mapping(values: Mapping[str, Any]) -> RunSpec:
    """A RunSpec from a parsed TOML table or JSON object; unknown keys are refused."""
    known = {f.name for f in dataclasses.fields(RunSpec)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown run setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    fixed: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    if fixed.get("stages") == "auto":
        fixed["stages"] = None
    stages = fixed.get("stages")
    if stages is not None and (isinstance(stages, bool) or not isinstance(stages, int) or stages < 2):
        raise ValueError(f'stages must be an integer >= 2 or "auto", got {stages!r}')
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
        "optimizer": spec.optimizer,
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
