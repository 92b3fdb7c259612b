"""The control plane's messages as plain dataclasses: the one set the server and the client share.

``proto/control.proto`` declares the wire; :mod:`proto.serde` converts between its generated
types and these, in both directions, so neither side touches protobuf. Nothing here imports
the rest of the project (``proto/`` is the bottom layer).

A *run* is a training run (``run-1``), the server's business. A *pipeline* is one data
owner's chain of stages; the stage hosts know it by its bridge run id, which is what the
``run_id`` field of every command means (``HostRun``, ``Train``, ``Upload``, ...).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

PROTOCOL_VERSION = 1


def file_sha256(path: Path, block: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in blocks: the digest weight transfers are checked against."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ joining


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceProfile:
    """What a client's device can do, as it reported it."""

    flops_per_s: float = 0.0  # sustained training FLOP/s
    memory_bytes: int = 0  # free host memory
    gpu_memory_bytes: int = 0  # free memory of the training GPU; 0 without one
    device: str = "cpu"  # where training runs: "cpu" or "cuda"
    accelerator: str = ""  # e.g. the GPU's name
    upload_bytes_per_s: float = 0.0  # client -> server; 0 until measured
    download_bytes_per_s: float = 0.0  # server -> client; 0 until measured
    rtt_s: float = 0.0  # round-trip time to the server; 0 until measured
    capacity: int = 1  # most partitions it hosts at once
    declared: frozenset[str] = frozenset()  # fields set by the operator rather than measured
    flops_method: str = ""  # how flops_per_s was measured
    max_micro_batch: int = 0  # largest micro-batch it trains at once, declared; 0: the server derives it

    @property
    def has_link(self) -> bool:
        """Whether the link to the server has been measured (or declared)."""
        return self.upload_bytes_per_s > 0 and self.download_bytes_per_s > 0

    @property
    def training_memory_bytes(self) -> int:
        """The memory training can use: the GPU's when it trains on one, else the host's."""
        return self.gpu_memory_bytes if self.device == "cuda" else self.memory_bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientInfo:
    """Facts about a client that the planner does not need but an operator does."""

    version: str = ""  # titanic version of the client
    hostname: str = ""
    platform: str = ""
    has_data: bool = False  # it owns training data (a data owner)
    data_bytes: int = 0  # size of that data on disk
    bridge_host: str = ""  # the address peers use to reach its stage host


@dataclass(frozen=True, slots=True, kw_only=True)
class Registration:
    """A client asking to join."""

    name: str  # the client's unique name, becomes its id
    join_token: str | None = None  # a token any client may present
    client_key: str | None = None  # a key the server knows for exactly this name (wins over join_token)
    info: ClientInfo = field(default_factory=ClientInfo)
    profile: DeviceProfile = field(default_factory=DeviceProfile)  # compute and memory; the link comes later
    protocol_version: int = PROTOCOL_VERSION
    address: str = ""  # where the request came from, as the server's transport saw it (not on the wire)


@dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    """What a client learns when it is let in."""

    client_id: str
    session_token: str  # proves the session on every later call
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    max_chunk_bytes: int
    probe_max_seconds: float


# ------------------------------------------------------------------------------ liveness


class RunState(enum.StrEnum):
    """What a client is doing for a pipeline."""

    PREPARING = "preparing"
    READY = "ready"
    SERVING = "serving"
    CONNECTED = "connected"
    TRAINING = "training"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True, kw_only=True)
class RunStatus:
    """A client's view of one pipeline it takes part in."""

    run_id: str  # the pipeline's bridge run id
    partitions: tuple[int, ...] = ()
    state: RunState = RunState.PREPARING
    bridge_url: str = ""  # where peers connect; empty when not serving
    message: str = ""
    bridge_cert_pem: str = ""  # PEM certificate the host at bridge_url serves wss:// with


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """A client saying it is alive, and how its pipelines are going."""

    runs: tuple[RunStatus, ...] = ()
    free_memory_bytes: int = 0


class CommandState(enum.StrEnum):
    """How far a client got with a command."""

    ACCEPTED = "accepted"
    DONE = "done"
    FAILED = "failed"


# ------------------------------------------------------------------------------ round reports


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerBytes:
    """Bridge bytes between the owner and one remote stage during a step."""

    stage: int
    sent: int = 0
    received: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class StepRecord:
    """One optimizer step of an owner's round."""

    loss: float
    tokens: int = 0  # target tokens the loss averaged over
    seconds: float = 0.0  # wall time of the whole step
    peers: tuple[PeerBytes, ...] = ()  # bridge traffic per remote stage
    lr: float = 0.0  # the learning rate the step used
    grad_norm: float = 0.0  # joint gradient norm before clipping; 0 when not clipped
    output_norm: float = 0.0  # mean L2 norm of the logits per position (a divergence signal)


@dataclass(frozen=True, slots=True, kw_only=True)
class Evaluation:
    """Validation after a round."""

    loss: float  # mean validation loss per token
    perplexity: float
    tokens: int = 0  # validation target tokens: this owner's weight in the all-owner figure


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundReport:
    """What an owner did in a round: every step, then the evaluation."""

    round: int
    steps: tuple[StepRecord, ...]
    evaluation: Evaluation
    samples: int = 0  # sequences trained this round
    data_samples: int = 0  # training sequences the owner holds: the FedAvg weight
    seconds: float = 0.0  # wall time of the round, evaluation included
    stage_seconds: tuple[float, ...] = ()  # per stage, the owner's mean wait per step
    step_seconds: float = 0.0  # mean seconds of a whole step

    @property
    def losses(self) -> list[float]:
        """The training loss of every step, in order."""
        return [s.loss for s in self.steps]


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundProgress:
    """How far a Train command got (sent with ACCEPTED while the round trains)."""

    round: int
    first_step: int  # the step (0-based, within the round) of losses[0]
    losses: tuple[float, ...]  # the losses of the steps since the last progress report
    steps: int  # steps the round has in all
    tokens: int = 0  # target tokens trained so far this round
    seconds: float = 0.0  # since the round began


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusReport:
    """A client's progress on one command."""

    command_id: int
    state: CommandState
    message: str = ""
    run: RunStatus | None = None
    round_report: RoundReport | None = None  # a finished Train command
    progress: RoundProgress | None = None  # a Train command under way
    lost_peer: str = ""  # a failed command: the client id of the stage host it lost (empty: none)


# ------------------------------------------------------------------------------ commands


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionAssignment:
    """One partition a client must host."""

    index: int  # 0-based partition (stage) number
    num_stages: int
    layer_start: int  # first decoder block, inclusive
    layer_end: int  # last decoder block, exclusive
    weights_sha256: str  # hex digest of its safetensors file
    weights_bytes: int
    local: bool = False  # used by the client's own pipeline, not served to peers


@dataclass(frozen=True, slots=True, kw_only=True)
class AllowedPeer:
    """A peer a host must accept; the host only learns the digest of its token."""

    client_id: str
    token_sha256: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HostRun:
    """Host these partitions of a pipeline and let these peers in."""

    run_id: str
    model_config: str  # the model's config.json, as transformers writes it
    partitions: tuple[PartitionAssignment, ...]
    allowed_peers: tuple[AllowedPeer, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerEndpoint:
    """Where a data owner finds the host of one partition, and the token to show it."""

    partition: int
    client_id: str
    url: str
    token: str
    cert_pem: str = ""  # the certificate the host reported for url: the only one to trust there


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectPeers:
    """Connect to the hosts of the other partitions of a pipeline."""

    run_id: str
    peers: tuple[PeerEndpoint, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainPeers:
    """To a host: where the partitions next to its own are hosted (the chained data path)."""

    run_id: str
    peers: tuple[PeerEndpoint, ...]  # token: this host's own for the run, shown to each neighbour


@dataclass(frozen=True, slots=True, kw_only=True)
class Train:
    """What a data owner trains in one round."""

    run_id: str  # the owner's pipeline
    round: int = 1  # 1-based round of the training run
    steps: int = 1  # optimizer steps this round
    start: int = 0  # first batch of the owner's stream this round
    batch_size: int = 1  # sequences per step
    seq_len: int = 2  # tokens per sequence
    micro_batches: int = 1  # micro-batches per step in the pipeline
    lr: float = 1e-4  # learning rate of every stage
    seed: int = 0  # data split and batch order
    val_fraction: float = 0.1  # held-out share of the owner's sequences
    eval_batch_size: int = 8  # sequences per validation batch
    tokenizer: str = ""  # name or path of the tokenizer to load on the owner
    method: str = "backprop"  # the training method, by name
    schedule: str = "constant"  # learning-rate schedule over the whole run (autograd_bridge.optim.SCHEDULES)
    warmup_steps: int = 0  # linear warm-up over the owner's first steps of the run
    total_steps: int = 0  # the run's steps per owner: where the schedule ends
    min_lr: float = 0.0  # the schedule's floor
    clip_norm: float = 0.0  # bound on the joint gradient norm of every stage; 0: no clipping
    time_budget_s: float = 0.0  # > 0: train until the round has taken this long (steps: the most)


@dataclass(frozen=True, slots=True, kw_only=True)
class Upload:
    """Send what these hosted partitions train to the server."""

    run_id: str
    partitions: tuple[int, ...]
    round: int = 0  # 0: the starting state (values, whole); else the round's update
    density: float = 1.0  # share of each tensor's entries a sparse codec keeps
    optimizer_state: bool = True  # also send the optimizer's state for the partitions


@dataclass(frozen=True, slots=True, kw_only=True)
class StopRun:
    """Stop everything the client does for a pipeline and drop its state."""

    run_id: str
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class LoraSettings:
    """LoRA adapters: rank, scale numerator, the modules they adapt."""

    r: int = 8  # adapter rank
    alpha: int = 16  # scale numerator (scale = alpha / r)
    targets: tuple[str, ...] = ()  # module names; empty: the family's default


@dataclass(frozen=True, slots=True, kw_only=True)
class HeadSettings:
    """Heads mode (SMHA): how a pipeline's holders choose the attention heads they train."""

    fraction: float = 1.0  # share of each block's heads trained per round, in (0, 1]
    choice: str = "random"  # "random" (seeded per round) or "importance" (gradient magnitude so far)
    adapter: str = "full"  # "full" (the heads' weight slices) or "lora" (per-head adapters)
    key: str = ""  # whose heads (the pipeline's owner): random draws differ per key
    schedule: str = "fixed"  # "fixed" or "redundancy": fewer heads as a block's heads grow alike


@dataclass(frozen=True, slots=True, kw_only=True)
class CodecSettings:
    """How a holder encodes what it uploads (autograd_bridge.codecs)."""

    name: str = "dense"  # a member of autograd_bridge.codecs.CODECS
    values: str = "fp32"  # the dtype sparse values travel in
    scope: str = "partition"  # top-k per "partition" (its tensors ranked together) or per "tensor"
    error_feedback: bool = False  # keep what a sparse upload left out and add it to the next one


@dataclass(frozen=True, slots=True, kw_only=True)
class PrepareRun:
    """Before a training run's first round: how a pipeline's stages train."""

    run_id: str
    finetune: str = "full"  # a member of autograd_bridge.finetune: what a stage trains and what travels
    optimizer: str = "adamw"  # every stage's optimizer (autograd_bridge.optim)
    lora: LoraSettings = field(default_factory=LoraSettings)
    seed: int = 0  # LoRA adapters start from the seed and each tensor's whole-model name (any cut, every copy)
    codec: CodecSettings = field(default_factory=CodecSettings)  # how this holder encodes its uploads
    method: str = "backprop"  # the training method (autograd_bridge.methods)
    heads: HeadSettings = field(default_factory=HeadSettings)  # finetune = "heads"
    method_options: Mapping[str, str] = field(default_factory=dict)  # its settings by name (forward_gradient's h, ...)
    path: str = "relay"  # how activations travel: relay (through the owner) | chain (host to host)
    activation_compression: str = "none"  # activations and gradients between stages: none | fp16 | int8


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadPartitions:
    """Replace these partitions' trained tensors with the server's merged ones."""

    run_id: str
    partitions: tuple[PartitionAssignment, ...]  # index, weights_sha256, weights_bytes
    round: int = 0


CommandBody = HostRun | ConnectPeers | Train | Upload | StopRun | PrepareRun | LoadPartitions | ChainPeers


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    """A command with the id that status reports refer to."""

    command_id: int
    body: CommandBody


# ------------------------------------------------------------------------------ data


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeResult:
    """What the server saw of an upload probe."""

    bytes: int  # bytes received after the first chunk
    seconds: float  # from the first chunk's arrival to the last's


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightHeader:
    """Announces the weights that follow in chunks."""

    run_id: str
    partition: int
    total_bytes: int
    sha256: str  # hex digest of the whole file
    round: int = 0  # uploads: the round these weights end
    num_samples: int = 0  # uploads: samples behind an update
    slices: tuple[TrainedSlices, ...] = ()  # uploads: the tensors trained only in parts (heads mode)


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainedSlices:
    """Tensor ``tensor`` cut along ``dim`` into slices of ``width`` elements: only ``blocks`` were trained.

    An empty ``blocks`` means none was (a frozen tensor). A tensor an upload does not name was
    trained whole.
    """

    tensor: str  # whole-model name
    dim: int = 0
    width: int = 1
    blocks: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadReceipt:
    """The server's confirmation of a stored upload."""

    sha256: str
    total_bytes: int
