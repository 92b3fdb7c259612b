"""What a training run is: :class:`RunSpec`, read from a run file (TOML) plus flags.

This docstring is the reference of run files: the block below is a complete run file with
every key at its default (a test parses it and checks it against the dataclasses, so it
stays complete and true). The model and its stages come from the server's ``[model]``
(the server plans for one model), so a run that names another model is refused::

    name = ""              # a label for the operator; the server gives the run its own id
    model = ""             # must be the server's model ("": the server's model)
    stages = "auto"        # must match the server's stage count; "auto": whatever it plans (1: one stage, an owner holds the whole model)
    owners = []            # client ids of the data owners (empty: every client with data)
    rounds = 3             # rounds; a checkpoint is written after each
    seed = 0               # data split and batch order on every owner; LoRA adapters from the seed and each tensor's name
    tokenizer = ""         # name or path each owner loads its tokenizer from ("": the model)

    [participation]        # which owners train in a round, in what order (server.training.participation)
    mode = "single"        # single: one owner | sequential: owners in turn | parallel: owners at once
                           # | sampled: a subset of the owners at once, drawn each round with the seed
                           # (case = 1, 2 or 3 here or at the top is an alias of the first three)
    fraction = 0.0         # sampled: share of the owners training each round, in (0, 1], rounded up (0: unset)
    count = 0              # sampled: owners training each round, >= 1 (0: unset); set exactly one of the two

    [local_work]           # how much each owner trains in a round (server.training.local_work)
    mode = "steps"         # steps: a fixed number of optimizer steps | samples: the same sequences per owner
                           # | time: a wall-time budget per round, every owner trains until it is spent
    steps = 10             # optimizer steps per owner and round (steps); the steps a time budget is sized for (time)
    samples = 0            # samples: sequences per owner and round (0: steps x [training] batch_size)
    accumulate = true      # samples: steps of batch_size, micro-batched to each device's limit (true), or
                           # one step per micro-batch of the device's largest size (false: more steps on small devices)
    batch = "run"          # steps, time: each owner's batch is batch_size ("run", micro-batched to fit its
                           # device) or its device's largest micro-batch ("device")
    seconds = 0.0          # time: the budget per round, seconds (0: from the owners' profiles, then their measured steps)

    [training]             # how an owner's pipeline trains
    batch_size = 4         # sequences per optimizer step
    seq_len = 128          # tokens per sequence, >= 2
    micro_batches = 1      # the owner's pipeline splits each batch into this many (batch_size is a multiple)
    optimizer = "adamw"    # every stage's optimizer, on the owners and the hosts (autograd_bridge.optim): adamw | sgd
    lr = 1e-4              # learning rate of every stage (the schedule's peak)
    method = "backprop"    # how an owner trains a step over its pipeline (autograd_bridge.methods): backprop | forward_gradient
    methods = {}           # per owner, its own method: [training.methods] NAME = "forward_gradient" (mixed federations)
    schedule = "constant"  # learning rate over the whole run, continuing across rounds: constant | cosine
    warmup_steps = 0       # linear warm-up over each owner's first steps of the run
    schedule_steps = 0     # steps the schedule spans per owner (0: rounds x [local_work] steps)
    min_lr = 0.0           # the schedule's floor, in [0, lr]
    clip_norm = 0.0        # bound on the joint gradient norm of all stages of a pipeline (0: no clipping; Photon: 1.0)
    path = "relay"         # how activations travel (autograd_bridge.paths): relay: every boundary through the owner
                           # | chain: each host hands its output to the next stage's host (the hosts must reach each other)
                           # | auto: per pipeline, the path the plan estimates faster (est_step_s in `titanic-server plan`)
    activation_compression = "none"  # activations and gradients between stages: none | fp16 | int8 (a row scale per vector)

    [forward_gradient]     # method = "forward_gradient" (FwdLLM): gradients estimated from perturbed forwards only
    h = 0.01               # central-difference step: (L(p + h v) - L(p - h v)) / 2h, v ~ N(0, I) drawn from a seed
    perturbations = 4      # directions per step to start with (and added each time the variance rule asks)
    max_perturbations = 16 # the variance rule adds directions up to this many per step
    var_threshold = 0.0    # add directions while mean(d^2) / K exceeds this, d the directional derivatives (0: K fixed)
    sampler = false        # discriminative sampler: keep the best aligned with the last global update of candidates x K seeds
    candidates = 10        # seeds the sampler draws per direction it keeps

    [finetune]             # what a stage trains and what travels (autograd_bridge.finetune)
    mode = "full"          # full: every weight | lora: adapters only | heads: a share of every block's attention heads (SMHA)
    r = 8                  # adapter rank (lora; heads with adapter = "lora")
    alpha = 16             # adapter scale numerator, scale = alpha / r (lora; heads with adapter = "lora")
    targets = []           # module names to adapt (lora; empty: the model family's default)
    head_fraction = 1.0    # heads: share of each block's heads an owner's pipeline trains per round, in (0, 1] (ceil(x H), >= 1)
    head_choice = "random" # heads: random (drawn from seed, round, owner) | importance (largest gradient magnitude so far)
    adapter = "full"       # heads: train the heads' weight slices (full) or per-head LoRA adapters on them (lora)
    head_fraction_schedule = "fixed"  # heads: fixed ceil(x H) heads | redundancy: ceil(x H_eff), H_eff = H / (1 + (H - 1) R),
                           # R a block's mean |cosine| between its heads' output-projection slices (owners at 1.0 keep every head)
    head_fractions = {}    # heads, per owner: [finetune.head_fractions] NAME = x (smaller for slower owners);
                           # at least one owner of the run must train every head (1.0)

    [aggregation]          # how each partition's copies merge after a turn (server.training.aggregation)
    rule = "fedavg"        # fedavg | fedmom | fednesterov | fedadam | fedyogi | fedadagrad (all but fedavg at server_lr 1 need parallel participation)
    server_lr = "auto"     # the server step size, a finite number > 0; "auto": the rule's own, fedavg 1.0 (plain averaging), fedmom and fednesterov 0.7, the others 0.01
    server_momentum = 0.9  # momentum of fedmom and fednesterov, in [0, 1)
    server_beta1 = 0.9     # first-moment decay of fedadam, fedyogi, fedadagrad, in [0, 1)
    server_beta2 = 0.99    # second-moment decay of fedadam and fedyogi, in [0, 1)
    server_tau = 0.001     # adaptivity of those three, > 0: the step divides by sqrt(v) + tau, and v starts at tau^2

    [communication]        # how tensors travel between the server and the clients (server.training.communication)
    codec = "dense"        # dense: every tensor whole | topk: the largest entries by magnitude (FLoSS)
                           # | seeds: forward-gradient holders send (seed, coefficient) pairs, others their change dense
    upload_density = 1.0   # share of entries a sparse upload keeps (holders send their change since they loaded), in (0, 1]
    download_density = 1.0 # share of each global tensor a sparse download keeps (the rest arrives as zeros), in (0, 1]
    values = "fp32"        # the dtype sparse values travel in: fp32 | fp16 | bf16
    scope = "partition"    # top-k over a partition's tensors ranked together (as FLASC), or per "tensor"
    error_feedback = false # holders keep what a sparse upload left out and add it to the next (not in FLoSS)
    optimizer_state = true # uploads carry the optimizer state for an exact resume (always when it travels between owners)
    budget_s = 0.0         # > 0: seconds per round each direction may take; densities then follow each client's links
    clients = {}           # per client: [communication.clients.NAME] upload_density, download_density

    [evaluation]           # the validation each owner runs after every round
    val_fraction = 0.1     # share of each owner's sequences held out, in (0, 1), so owners can report perplexity
    eval_batch_size = 8    # sequences per validation batch

    [recovery]             # what the server does when it loses a client mid-round (server.training.recovery)
    retries = 3            # times one round is replayed (replanned, reloaded from its start, same batches) before the run fails
    owner_quorum = 0.0     # parallel owners: share of a round's owners that may finish it without a lost one, in [0, 1] (0: wait for every owner)
    owner_wait_s = 60.0    # how long a round waits for a lost data owner to come back before the run fails

``fedavg`` takes the copies' average weighted by the owners' training samples. A server
optimizer takes the round's starting state minus that average as a pseudo-gradient and
makes one step with it: ``fedavg`` with a ``server_lr`` other than 1 a plain SGD step (Photon
uses 0.7-1.0), ``fedmom`` and ``fednesterov`` an SGD step with heavy-ball or Nesterov momentum
(DiLoCo: ``server_lr = 0.7``, ``server_momentum = 0.9``), ``fedadam``, ``fedyogi`` and
``fedadagrad`` an Adam, Yogi or Adagrad step (Reddi et al. 2021; Photon's FedAdam is
``server_lr = 0.1``, ``server_beta2 = 0.95``); moments are kept across rounds (and in
checkpoints). Single and sequential participation train one model in sequence, where the
merge of one copy is that copy, so they take ``fedavg`` at ``server_lr`` 1 only.

Run files written before sections keep working: these flat keys at the top level are
aliases of section keys (:data:`FLAT_KEYS`), and ``titanic-server runs start`` flags use
the same names (``--case 3 --steps-per-round 20 --lr 1e-3``)::

    case             [participation] mode: 1 single, 2 sequential, 3 parallel
    steps_per_round  [local_work] steps
    batch_size, seq_len, micro_batches, optimizer, lr        [training] the same key
    finetune         [finetune] mode
    lora_r, lora_alpha, lora_targets                         [finetune] r, alpha, targets
    aggregator       [aggregation] rule
    server_lr, server_beta1, server_beta2, server_tau        [aggregation] the same key
    val_fraction, eval_batch_size                            [evaluation] the same key

A key given twice (as an alias and in its section) is refused; an unknown section or key is
refused with the list of known ones. :meth:`RunSpec.to_json` writes the sections, which
:func:`spec_from_mapping` reads back (the admin API and checkpoints carry specs so).

Checking a spec names each member it chooses in its registry; the registries that live
beside torch code are imported only then, so importing this module stays light.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autograd_bridge.config import read_toml, section_from_mapping
from proto.messages import CodecSettings, HeadSettings, LoraSettings, PrepareRun, Train
from server.training.local_work import LOCAL_WORK
from server.training.participation import CASES, PARTICIPATIONS

if TYPE_CHECKING:
    from autograd_bridge.finetune import FinetuneSettings
    from server.training.aggregation import AggregationSettings
    from server.training.local_work import Work


# ------------------------------------------------------------------------------ checks


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# The largest values a run may ask for: far beyond any real run, small enough that nothing
# downstream (a schedule, an allocation, a loop) is asked for the absurd.
MOST_COUNT = 10**9  # rounds, steps, seeds
MOST_BATCH = 1 << 16  # sequences in a batch, micro-batches, adapter rank
MOST_SEQ_LEN = 1 << 20  # tokens per sequence
MOST_LR = 10.0  # a learning rate (the owners' or the server's); above it nothing trains


def _check_count(where: str, name: str, value: object, least: int = 1, most: int = MOST_COUNT) -> None:
    if not _is_int(value) or not least <= value <= most:  # type: ignore[operator]
        raise ValueError(f"{where}{name} must be an integer >= {least} (and at most {most}), got {value!r}")


def _check_density(what: str, value: object) -> None:
    from autograd_bridge.codecs import MIN_DENSITY

    if not (_is_number(value) and MIN_DENSITY <= value <= 1):  # type: ignore[operator]
        raise ValueError(
            f"{what} must be a share of entries in [{MIN_DENSITY:g}, 1] (1: dense, 0.01: one in a hundred), got {value!r}"
        )


def _check_member(what: str, value: object, known: Mapping[str, object]) -> None:
    if not isinstance(value, str) or value not in known:
        raise ValueError(f"{what} must be one of {', '.join(known)}, got {value!r}")


# ------------------------------------------------------------------------------ sections


@dataclass(frozen=True, slots=True, kw_only=True)
class ParticipationSection:
    """``[participation]``: which owners train in a round, and in what order."""

    mode: str = "single"  # a name in server.training.participation.PARTICIPATIONS
    fraction: float = 0.0  # sampled: share of the owners that train each round, in (0, 1] (0: unset, count sizes it)
    count: int = 0  # sampled: how many owners train each round, >= 1 (0: unset, fraction sizes it)

    def __post_init__(self) -> None:
        _check_member("[participation] mode", self.mode, PARTICIPATIONS)
        if not (_is_number(self.fraction) and 0.0 <= self.fraction <= 1.0):
            raise ValueError(
                f"[participation] fraction must be a number in (0, 1], the share of the owners that train each round "
                f"(e.g. 0.5), got {self.fraction!r}"
            )
        _check_count("[participation] ", "count", self.count, least=0)
        PARTICIPATIONS[self.mode](self)  # the mode checks the settings it takes


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalWorkSection:
    """``[local_work]``: how much each owner trains in a round."""

    mode: str = "steps"  # a name in server.training.local_work.LOCAL_WORK
    steps: int = 10  # optimizer steps per owner and round (steps); the steps a time budget is sized for (time)
    samples: int = 0  # sequences per owner and round (samples); 0: steps x [training] batch_size
    accumulate: bool = True  # samples: the run's batch micro-batched to each device (2a), or device-sized steps (2b)
    batch: str = "run"  # steps, time: "run" ([training] batch_size) or "device" (each owner's largest micro-batch)
    seconds: float = 0.0  # time: the budget per round; 0: sized from the owners' profiles and measured steps

    def __post_init__(self) -> None:
        _check_member("[local_work] mode", self.mode, LOCAL_WORK)
        _check_count("[local_work] ", "steps", self.steps)
        _check_count("[local_work] ", "samples", self.samples, least=0)
        if not isinstance(self.accumulate, bool):
            raise ValueError(f"[local_work] accumulate must be true or false, got {self.accumulate!r}")
        if self.batch not in ("run", "device"):
            raise ValueError(f'[local_work] batch must be "run" or "device", got {self.batch!r}')
        if not (_is_number(self.seconds) and math.isfinite(self.seconds) and self.seconds >= 0):
            raise ValueError(f"[local_work] seconds must be a finite number >= 0 (0: sized by the server), got {self.seconds!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingSection:
    """``[training]``: how an owner's pipeline trains a step."""

    batch_size: int = 4  # sequences per optimizer step
    seq_len: int = 128  # tokens per sequence
    micro_batches: int = 1  # the owner's pipeline splits each batch into this many micro-batches
    optimizer: str = "adamw"  # every stage's optimizer, on the owners and the hosts (autograd_bridge.optim)
    lr: float = 1e-4  # learning rate of every stage (the schedule's peak)
    method: str = "backprop"  # the owner's training step (autograd_bridge.methods)
    schedule: str = "constant"  # learning rate over the whole run, continuing across rounds (autograd_bridge.optim.SCHEDULES)
    warmup_steps: int = 0  # linear warm-up over each owner's first steps of the run
    schedule_steps: int = 0  # steps the schedule spans per owner; 0: rounds x [local_work] steps
    min_lr: float = 0.0  # the schedule's floor, in [0, lr]
    clip_norm: float = 0.0  # bound on the joint gradient norm of all stages of a pipeline; 0: no clipping
    methods: Mapping[str, str] = dataclasses.field(default_factory=dict)  # owner id -> its own method (mixed runs)
    path: str = "relay"  # how activations travel: relay (through the owner) | chain (host to host) | auto (the plan's faster)
    activation_compression: str = "none"  # activations and gradients between stages: none | fp16 | int8

    def method_of(self, owner: str) -> str:
        """The method ``owner``'s pipeline trains with: its own when ``methods`` names one, else ``method``."""
        return self.methods.get(owner, self.method)

    def __post_init__(self) -> None:
        from autograd_bridge.frames import COMPRESSIONS
        from autograd_bridge.methods import METHODS
        from autograd_bridge.optim import OPTIMIZERS, SCHEDULES
        from autograd_bridge.paths import PATHS

        for name in ("batch_size", "micro_batches"):
            _check_count("[training] ", name, getattr(self, name), most=MOST_BATCH)
        _check_count("[training] ", "seq_len", self.seq_len, least=2, most=MOST_SEQ_LEN)
        if not (_is_number(self.lr) and math.isfinite(self.lr) and 0 < self.lr <= MOST_LR):
            raise ValueError(f"[training] lr must be a positive number up to {MOST_LR:g} (1e-4 is typical), got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            choices = " or ".join(repr(name) for name in OPTIMIZERS)
            raise ValueError(f"[training] optimizer must be {choices} (what every stage host can run), not {self.optimizer!r}")
        _check_member("[training] method", self.method, METHODS)
        if not isinstance(self.methods, Mapping):
            raise ValueError('[training.methods] must be a table of owner = "method"')
        for owner, method in self.methods.items():
            _check_member(f"[training.methods] {owner}", method, METHODS)
        if self.batch_size % self.micro_batches:
            raise ValueError(f"[training] batch_size {self.batch_size} must be a multiple of micro_batches {self.micro_batches}")
        _check_member("[training] schedule", self.schedule, SCHEDULES)
        for name in ("warmup_steps", "schedule_steps"):
            _check_count("[training] ", name, getattr(self, name), least=0)
        if not (_is_number(self.min_lr) and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"[training] min_lr must be a number in [0, lr], got {self.min_lr!r}")
        if not (_is_number(self.clip_norm) and math.isfinite(self.clip_norm) and self.clip_norm >= 0):
            raise ValueError(f"[training] clip_norm must be a finite number >= 0 (0: no clipping), got {self.clip_norm!r}")
        _check_member("[training] path", self.path, {**PATHS, "auto": None})
        _check_member("[training] activation_compression", self.activation_compression, dict.fromkeys(COMPRESSIONS))


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardGradientSection:
    """``[forward_gradient]``: how owners with method forward_gradient estimate gradients (FwdLLM)."""

    h: float = 0.01  # central-difference step: the perturbation is h * v
    perturbations: int = 4  # directions per step to start with (and added per round of the variance rule)
    max_perturbations: int = 16  # the variance rule stops adding directions here
    var_threshold: float = 0.0  # add directions while mean(d^2) / K exceeds this (0: K stays fixed)
    sampler: bool = False  # keep the seeds best aligned with the last global update, of candidates x K drawn
    candidates: int = 10  # seeds the sampler draws per direction it keeps

    def __post_init__(self) -> None:
        if not isinstance(self.sampler, bool):
            raise ValueError(f"[forward_gradient] sampler must be true or false, got {self.sampler!r}")
        for name in ("perturbations", "max_perturbations", "candidates"):
            _check_count("[forward_gradient] ", name, getattr(self, name))
        for name in ("h", "var_threshold"):
            if not _is_number(getattr(self, name)):
                raise ValueError(f"[forward_gradient] {name} must be a number, got {getattr(self, name)!r}")
        try:
            self.options()
        except ValueError as exc:
            raise ValueError(f"[forward_gradient] {str(exc).removeprefix('forward_gradient ')}") from exc

    def options(self) -> dict[str, str]:
        """The settings as PrepareRun ``method_options`` (checked by the method's own settings)."""
        from autograd_bridge.methods import ForwardGradientSettings

        settings = ForwardGradientSettings(
            h=float(self.h), perturbations=self.perturbations, max_perturbations=self.max_perturbations,
            var_threshold=float(self.var_threshold), sampler=self.sampler, candidates=self.candidates,
        )  # fmt: skip
        return settings.to_options()


@dataclass(frozen=True, slots=True, kw_only=True)
class FinetuneSection:
    """``[finetune]``: what a stage trains and what travels after a round."""

    mode: str = "full"  # a name in autograd_bridge.finetune.FINETUNES: full or lora
    r: int = 8  # adapter rank (lora)
    alpha: int = 16  # adapter scale numerator, scale = alpha / r (lora)
    targets: tuple[str, ...] = ()  # module names to adapt (lora; empty: the model family's default)
    head_fraction: float = 1.0  # heads: share of each block's heads trained per round by owners not in head_fractions
    head_choice: str = "random"  # heads: "random" (seed, round, owner) or "importance" (gradient magnitude so far)
    adapter: str = "full"  # heads: the heads' weight slices ("full") or per-head LoRA adapters on them ("lora")
    head_fraction_schedule: str = "fixed"  # heads: "fixed", or "redundancy" (fewer heads as a block's heads grow alike)
    head_fractions: Mapping[str, float] = dataclasses.field(default_factory=dict)  # heads: owner -> its own fraction

    def __post_init__(self) -> None:
        from autograd_bridge.finetune import FINETUNES

        _check_member("[finetune] mode", self.mode, FINETUNES)
        _check_count("[finetune] ", "r", self.r, most=MOST_BATCH)
        _check_count("[finetune] ", "alpha", self.alpha, most=MOST_SEQ_LEN)
        if not isinstance(self.targets, tuple) or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"[finetune] targets must be a list of module names, got {self.targets!r}")
        if not isinstance(self.head_fractions, Mapping):
            raise ValueError("[finetune.head_fractions] must be a table of owner = fraction")
        for owner, value in {"": self.head_fraction, **self.head_fractions}.items():
            where = f"[finetune.head_fractions] {owner}" if owner else "[finetune] head_fraction"
            if not (_is_number(value) and 0 < value <= 1):
                raise ValueError(f"{where} must be a share of the heads in (0, 1] (1: every head), got {value!r}")
        if self.mode == "heads" and self.head_fraction < 1 and not any(v == 1 for v in self.head_fractions.values()):
            raise ValueError(
                "[finetune] heads mode needs at least one owner that trains every head (SMHA converges only so): "
                "set head_fraction = 1.0, or give one owner 1.0 in [finetune.head_fractions]"
            )
        FINETUNES[self.mode]().check(self.settings())

    def fraction_of(self, owner: str) -> float:
        """The share of the heads ``owner``'s pipeline trains."""
        return float(self.head_fractions.get(owner, self.head_fraction))

    def check_owners(self, owners: Sequence[str]) -> None:
        """ValueError when heads mode trains no owner of ``owners`` on every head."""
        if self.mode == "heads" and owners and not any(self.fraction_of(o) == 1 for o in owners):
            fractions = ", ".join(f"{o}: {self.fraction_of(o):g}" for o in owners)
            raise ValueError(
                f"[finetune] heads mode needs one owner training every head, and this run's owners train {fractions}; "
                "give one of them 1.0 in [finetune.head_fractions]"
            )

    def settings(self, seed: int = 0, owner: str = "") -> FinetuneSettings:
        """What the finetune member is set up, checked and exported with (``owner``: whose pipeline)."""
        from autograd_bridge.finetune import FinetuneSettings

        return FinetuneSettings(lora_r=self.r, lora_alpha=self.alpha, lora_targets=tuple(self.targets), seed=seed,
                                head_fraction=self.fraction_of(owner), head_choice=self.head_choice,
                                head_adapter=self.adapter, head_key=owner,
                                head_schedule=self.head_fraction_schedule)  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class AggregationSection:
    """``[aggregation]``: how each partition's copies merge after a turn."""

    rule: str = "fedavg"  # a name in server.training.aggregation.AGGREGATORS
    # Server step size; None ("auto" in a file): the rule's own default, fedavg 1.0 (plain
    # averaging), fedmom and fednesterov 0.7, fedadam, fedyogi and fedadagrad 0.01.
    server_lr: float | None = None
    server_momentum: float = 0.9  # momentum of fedmom and fednesterov, in [0, 1)
    server_beta1: float = 0.9  # first-moment decay of fedadam, fedyogi and fedadagrad, in [0, 1)
    server_beta2: float = 0.99  # second-moment decay of fedadam and fedyogi, in [0, 1)
    server_tau: float = 1e-3  # adaptivity, > 0: the step divides by sqrt(v) + tau, and v starts at tau^2

    def __post_init__(self) -> None:
        from server.training.aggregation import AGGREGATORS

        _check_member("[aggregation] rule: the aggregator", self.rule, AGGREGATORS)
        if self.server_lr == "auto":
            object.__setattr__(self, "server_lr", None)  # frozen: normalise the file's spelling once
        if self.server_lr is not None:
            _check_positive("server_lr", self.server_lr, ' (or "auto": the rule\'s own)', most=MOST_LR)
        _check_positive("server_tau", self.server_tau, most=1.0)
        for name in ("server_momentum", "server_beta1", "server_beta2"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(
                    f"[aggregation] {name} must be a number in [0, 1) (0.9, and 0.99 for beta2, are the usual), got {value!r}"
                )

    def settings(self) -> AggregationSettings:
        """The aggregator's settings (its build() gives the aggregator)."""
        from server.training.aggregation import AggregationSettings

        return AggregationSettings(
            kind=self.rule,
            server_lr=None if self.server_lr is None else float(self.server_lr),
            momentum=float(self.server_momentum),
            beta1=float(self.server_beta1),
            beta2=float(self.server_beta2),
            tau=float(self.server_tau),
        )

    @property
    def steps_from_start(self) -> bool:
        """Whether the rule is a server optimizer: it steps from the state the copies started from."""
        return self.settings().build().steps_from_start


def _check_positive(name: str, value: object, hint: str = "", *, most: float) -> None:
    if not _is_number(value) or not (math.isfinite(value) and 0 < value <= most):  # type: ignore[arg-type, operator]
        raise ValueError(f"[aggregation] {name} must be a finite number > 0{hint} (and at most {most:g}), got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class CommunicationSection:
    """``[communication]``: how tensors travel between the server and the clients."""

    codec: str = "dense"  # a name in autograd_bridge.codecs.CODECS: partition tensors and uploads
    upload_density: float = 1.0  # share of entries a sparse codec keeps in each upload, in (0, 1]
    download_density: float = 1.0  # share of each global tensor a sparse codec sends to a pipeline, in (0, 1]
    values: str = "fp32"  # the dtype sparse values travel in: fp32 | fp16 | bf16
    scope: str = "partition"  # top-k over all of a partition's tensors ranked together (FLASC), or per tensor
    error_feedback: bool = False  # holders keep what a sparse upload left out and add it to the next one
    optimizer_state: bool = True  # uploads carry the optimizer state (exact resume); always when it travels between owners
    budget_s: float = 0.0  # > 0: per-round seconds each direction may take; densities follow each client's measured links
    clients: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)  # name -> its own densities

    def __post_init__(self) -> None:
        from autograd_bridge.codecs import CODECS

        _check_member("[communication] codec", self.codec, CODECS)
        for name in ("upload_density", "download_density"):
            _check_density(f"[communication] {name}", getattr(self, name))
        if self.values not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"[communication] values must be fp32, fp16 or bf16, got {self.values!r}")
        if self.scope not in ("tensor", "partition"):
            raise ValueError(f"[communication] scope must be 'tensor' or 'partition', got {self.scope!r}")
        for name in ("error_feedback", "optimizer_state"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"[communication] {name} must be true or false, got {getattr(self, name)!r}")
        if not (_is_number(self.budget_s) and math.isfinite(self.budget_s) and self.budget_s >= 0):
            raise ValueError(f"[communication] budget_s must be a finite number of seconds >= 0 (0: off), got {self.budget_s!r}")
        if not isinstance(self.clients, Mapping):
            raise ValueError("[communication.clients] must be a table of tables: [communication.clients.NAME]")
        for client, values in self.clients.items():
            if not isinstance(values, Mapping) or not set(values) <= {"upload_density", "download_density"}:
                raise ValueError(
                    f"[communication.clients.{client}] takes upload_density and download_density only, got {values!r}"
                )
            for name, value in values.items():
                _check_density(f"[communication.clients.{client}] {name}", value)


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluationSection:
    """``[evaluation]``: the validation every owner runs after each round."""

    val_fraction: float = 0.1  # share of each owner's sequences held out for validation, in (0, 1)
    eval_batch_size: int = 8  # sequences per validation batch

    def __post_init__(self) -> None:
        if not (_is_number(self.val_fraction) and 0.0 < self.val_fraction < 1.0):
            raise ValueError(
                f"[evaluation] val_fraction must be in (0, 1) so owners can report perplexity, got {self.val_fraction!r}"
            )
        _check_count("[evaluation] ", "eval_batch_size", self.eval_batch_size, most=MOST_BATCH)


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoverySection:
    """``[recovery]``: replaying a round after a client is lost (:mod:`server.training.recovery`)."""

    retries: int = 3  # replays of one round before the run fails (0: a lost client fails the run)
    owner_quorum: float = 0.0  # parallel owners: share that may finish a round without a lost one (0: all must)
    owner_wait_s: float = 60.0  # how long a round waits for a lost data owner before the run fails

    def __post_init__(self) -> None:
        _check_count("[recovery] ", "retries", self.retries, least=0)
        if not (_is_number(self.owner_quorum) and 0.0 <= self.owner_quorum <= 1.0):
            raise ValueError(f"[recovery] owner_quorum must be in [0, 1] (0: wait for every owner), got {self.owner_quorum!r}")
        if not (_is_number(self.owner_wait_s) and math.isfinite(self.owner_wait_s) and self.owner_wait_s > 0):
            raise ValueError(f"[recovery] owner_wait_s must be a number of seconds > 0, got {self.owner_wait_s!r}")


#: section name -> its dataclass (and the RunSpec field holding it)
SECTIONS: dict[str, type[Any]] = {
    "participation": ParticipationSection,
    "local_work": LocalWorkSection,
    "training": TrainingSection,
    "forward_gradient": ForwardGradientSection,
    "finetune": FinetuneSection,
    "aggregation": AggregationSection,
    "communication": CommunicationSection,
    "evaluation": EvaluationSection,
    "recovery": RecoverySection,
}

#: the keys at the top level of a run file (besides the sections and the flat keys)
TOP_LEVEL: tuple[str, ...] = ("name", "model", "stages", "owners", "rounds", "seed", "tokenizer")

#: flat key of run files written before sections -> (section, key) it now sets
FLAT_KEYS: dict[str, tuple[str, str]] = {
    "case": ("participation", "case"),
    "steps_per_round": ("local_work", "steps"),
    "batch_size": ("training", "batch_size"),
    "seq_len": ("training", "seq_len"),
    "micro_batches": ("training", "micro_batches"),
    "optimizer": ("training", "optimizer"),
    "lr": ("training", "lr"),
    "finetune": ("finetune", "mode"),
    "lora_r": ("finetune", "r"),
    "lora_alpha": ("finetune", "alpha"),
    "lora_targets": ("finetune", "targets"),
    "aggregator": ("aggregation", "rule"),
    "server_lr": ("aggregation", "server_lr"),
    "server_beta1": ("aggregation", "server_beta1"),
    "server_beta2": ("aggregation", "server_beta2"),
    "server_tau": ("aggregation", "server_tau"),
    "val_fraction": ("evaluation", "val_fraction"),
    "eval_batch_size": ("evaluation", "eval_batch_size"),
}


# ------------------------------------------------------------------------------ the run


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSpec:
    """One training run, as the operator describes it: top-level keys, then one field per section."""

    name: str = ""  # a label for the operator; the server gives the run its own id
    model: str = ""  # must be the server's model (or empty: the server's model)
    stages: int | None = None  # must match the server's stage count (None, "auto" in a file: whatever it plans)
    owners: tuple[str, ...] = ()  # client ids of the data owners (empty: every client with data)
    rounds: int = 3  # rounds; a checkpoint is written after each
    seed: int = 0  # data split and batch order on every owner; adapters' initialisation
    tokenizer: str = ""  # name or path each owner loads its tokenizer from ("": the model)
    participation: ParticipationSection = field(default_factory=ParticipationSection)
    local_work: LocalWorkSection = field(default_factory=LocalWorkSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    forward_gradient: ForwardGradientSection = field(default_factory=ForwardGradientSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    aggregation: AggregationSection = field(default_factory=AggregationSection)
    communication: CommunicationSection = field(default_factory=CommunicationSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    recovery: RecoverySection = field(default_factory=RecoverySection)

    def __post_init__(self) -> None:
        for key in ("name", "model", "tokenizer"):
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"{key} must be a string, got {getattr(self, key)!r}")
        if not isinstance(self.owners, tuple) or not all(isinstance(o, str) and o for o in self.owners):
            raise ValueError(f"owners must be a list of client ids, got {self.owners!r}")
        _check_count("", "rounds", self.rounds)
        _check_count("", "seed", self.seed, least=0)
        if self.stages is not None and (not _is_int(self.stages) or self.stages < 1):
            raise ValueError(f'stages must be an integer >= 1 or "auto" (whatever the server plans), got {self.stages!r}')
        for name, kind in SECTIONS.items():
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"{name} must be a {kind.__name__} (the [{name}] section), got {getattr(self, name)!r}")
        if self.aggregation.steps_from_start and not PARTICIPATIONS[self.participation.mode](self.participation).parallel:
            parallel = [name for name, mode in PARTICIPATIONS.items() if mode.parallel]
            raise ValueError(
                f"aggregator {self.aggregation.rule!r} needs case = 3 ([participation] mode = "
                f"{' or '.join(map(repr, parallel))}): participation {self.participation.mode!r} trains one model "
                "in sequence, where the merge of one copy is that copy; use [aggregation] rule = 'fedavg' at server_lr 1, or owners in parallel"
            )

    @property
    def server_optimizer(self) -> bool:
        """Whether merging is a server optimizer step (it needs the state each round started from)."""
        return self.aggregation.steps_from_start

    def to_json(self) -> dict[str, Any]:
        """The spec as plain JSON values: top-level keys and one object per section."""
        out: dict[str, Any] = {key: _plain(getattr(self, key)) for key in TOP_LEVEL}
        for name in SECTIONS:
            section = getattr(self, name)
            out[name] = {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section)}
        return out


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ------------------------------------------------------------------------------ reading


@dataclass(slots=True)
class _Sorted:
    """A run file's values sorted into the top level and the sections, with where each came from."""

    top: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, dict[str, Any]] = field(default_factory=lambda: {name: {} for name in SECTIONS})
    given: dict[tuple[str, str], str] = field(default_factory=dict)  # (section, key) -> how the file set it

    def place(self, section: str, key: str, value: Any, how: str, *, override: bool = False) -> None:
        if (section, key) == ("participation", "case"):
            key, value = "mode", _case_mode(value)
        if not override and (section, key) in self.given:
            raise ValueError(f"{self.given[(section, key)]} and {how} both set [{section}] {key}; keep one")
        self.given[(section, key)] = how
        self.tables[section][key] = value


def _case_mode(case: object) -> str:
    """The participation mode ``case = N`` means."""
    if not _is_int(case) or case not in CASES:
        numbers = [str(n) for n in CASES]
        raise ValueError(
            f"case must be {', '.join(numbers[:-1])} or {numbers[-1]}, got {case!r} "
            f"(or set [participation] mode = one of {', '.join(PARTICIPATIONS)})"
        )
    return CASES[case]  # type: ignore[index]


def _sort(values: Mapping[str, Any]) -> _Sorted:
    out = _Sorted()
    unknown = []
    for key, value in values.items():
        if key in SECTIONS and isinstance(value, Mapping):
            for sub, item in value.items():
                out.place(key, sub, item, f"[{key}] {sub}")
        elif key in SECTIONS and key not in FLAT_KEYS:
            raise ValueError(f"{key} must be a table ([{key}] and its keys), got {value!r}")
        elif key in TOP_LEVEL:
            out.top[key] = value
        elif key in FLAT_KEYS:
            out.place(*FLAT_KEYS[key], value, key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"unknown run setting(s) {', '.join(sorted(unknown))}; known: {', '.join(TOP_LEVEL)}, the sections "
            f"{', '.join(f'[{s}]' for s in SECTIONS)}, and the flat keys of older run files ({', '.join(FLAT_KEYS)})"
        )
    return out


def _build(values: _Sorted) -> RunSpec:
    top = dict(values.top)
    if top.get("stages") == "auto":
        top["stages"] = None
    if isinstance(top.get("owners"), list):
        top["owners"] = tuple(top["owners"])
    sections = {name: section_from_mapping(SECTIONS[name], table, name) for name, table in values.tables.items()}
    return RunSpec(**top, **sections)


def spec_from_mapping(values: Mapping[str, Any]) -> RunSpec:
    """A RunSpec from a parsed run file or a JSON object (what to_json gives); unknown keys are refused."""
    return _build(_sort(values))


def load_run_spec(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunSpec:
    """Read a run file and apply ``overrides`` (flags: top-level or flat keys; None values are ignored)."""
    values = _sort(read_toml(Path(path), "run file"))
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in TOP_LEVEL:
            values.top[key] = value
        elif key in FLAT_KEYS:
            values.place(*FLAT_KEYS[key], value, f"--{key.replace('_', '-')}", override=True)
        else:
            raise ValueError(f"no run setting {key!r} to override; flags name {', '.join((*TOP_LEVEL, *FLAT_KEYS))}")
    return _build(values)


# ------------------------------------------------------------------------------ what the run sends


def aggregation_settings(spec: RunSpec) -> AggregationSettings:
    """How the server merges each partition's copies in ``spec``'s run (build() gives the aggregator)."""
    return spec.aggregation.settings()


def chosen_path(path: str, estimates: Mapping[str, float] | None) -> str:
    """The data path of a pipeline: ``path``, or for ``auto`` the one of ``estimates`` (seconds per step) that is
    fastest (relay when the plan has no estimate)."""
    if path != "auto":
        return path
    return min(estimates, key=lambda p: estimates[p]) if estimates else "relay"


def prepare_command(spec: RunSpec, bridge_run: str, owner: str = "", *, path: str | None = None) -> PrepareRun:
    """How every holder of ``bridge_run`` (``owner``'s pipeline) sets its stages up before the first round (``path``: resolved ``auto``)."""
    finetune = spec.finetune
    heads = HeadSettings(fraction=finetune.fraction_of(owner), choice=finetune.head_choice, adapter=finetune.adapter,
                         key=owner, schedule=finetune.head_fraction_schedule)  # fmt: skip
    return PrepareRun(
        run_id=bridge_run,
        finetune=spec.finetune.mode,
        optimizer=spec.training.optimizer,
        lora=LoraSettings(r=spec.finetune.r, alpha=spec.finetune.alpha, targets=spec.finetune.targets),
        seed=spec.seed,
        codec=CodecSettings(name=spec.communication.codec, values=spec.communication.values,
                            scope=spec.communication.scope, error_feedback=spec.communication.error_feedback),
        method=spec.training.method_of(owner),
        method_options=spec.forward_gradient.options(),  # each method reads the options it knows
        heads=heads,
        path=path or chosen_path(spec.training.path, None),
        activation_compression=spec.training.activation_compression,
    )


def train_command(spec: RunSpec, *, bridge_run: str, round: int, work: Work, model: str, owner: str = "") -> Train:
    """What the owner of ``bridge_run`` trains in round ``round`` (1-based): ``work`` and the run's settings."""
    training, evaluation = spec.training, spec.evaluation
    return Train(
        run_id=bridge_run,
        round=round,
        steps=work.steps,
        start=work.start,
        batch_size=work.batch_size or training.batch_size,
        seq_len=training.seq_len,
        micro_batches=work.micro_batches or training.micro_batches,
        lr=float(training.lr),
        seed=spec.seed,
        val_fraction=float(evaluation.val_fraction),
        eval_batch_size=evaluation.eval_batch_size,
        tokenizer=spec.tokenizer or model,
        method=training.method_of(owner),
        schedule=training.schedule,
        warmup_steps=training.warmup_steps,
        total_steps=training.schedule_steps or spec.rounds * spec.local_work.steps,
        min_lr=float(training.min_lr),
        clip_norm=float(training.clip_norm),
        time_budget_s=float(work.time_budget_s),
    )
