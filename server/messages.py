"""The control plane's messages as the server sees them: plain dataclasses, no protobuf.

``server/convert.py`` turns the wire types of ``proto/control.proto`` into these on entry
and back on exit; everything else in the server works with these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

PROTOCOL_VERSION = 1


class ClientStatus(enum.StrEnum):
    """Where a registered client stands."""

    MEASURING = "measuring"  # registered; its link to the server is being measured
    READY = "ready"  # profile complete; the planner may give it work
    LOST = "lost"  # silent for longer than the heartbeat timeout
    LEFT = "left"  # said goodbye


LIVE_STATUSES = frozenset({ClientStatus.MEASURING, ClientStatus.READY})


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
    client_key: str | None = None  # a key the server knows for exactly this name
    info: ClientInfo = field(default_factory=ClientInfo)
    profile: DeviceProfile = field(default_factory=DeviceProfile)  # compute and memory; the link comes later
    protocol_version: int = PROTOCOL_VERSION
    address: str = ""  # where the request came from, as the transport saw it


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistrationResult:
    """What a client learns when it is let in."""

    client_id: str
    session_token: str  # proves the session on every later call
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    max_chunk_bytes: int
    probe_max_seconds: float


class RunState(enum.StrEnum):
    """What a client is doing for a run."""

    PREPARING = "preparing"
    READY = "ready"
    SERVING = "serving"
    CONNECTED = "connected"
    TRAINING = "training"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True, kw_only=True)
class RunStatus:
    """A client's view of one run it takes part in."""

    run_id: str
    partitions: tuple[int, ...] = ()
    state: RunState = RunState.PREPARING
    bridge_url: str = ""  # where peers connect; empty when not serving
    message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """A client saying it is alive, and how its runs are going."""

    runs: tuple[RunStatus, ...] = ()
    free_memory_bytes: int = 0


class CommandState(enum.StrEnum):
    """How far a client got with a command."""

    ACCEPTED = "accepted"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusReport:
    """A client's progress on one command."""

    command_id: int
    state: CommandState
    message: str = ""
    run: RunStatus | None = None


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
    """Host these partitions of a run and let these peers in."""

    run_id: str
    model_config_json: str
    partitions: tuple[PartitionAssignment, ...]
    allowed_peers: tuple[AllowedPeer, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerEndpoint:
    """Where a data owner finds the host of one partition, and the token to show it."""

    partition: int
    client_id: str
    url: str
    token: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectPeers:
    """Connect to the hosts of the other partitions of a run."""

    run_id: str
    peers: tuple[PeerEndpoint, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Train:
    """Start training a run (the settings are the run's, as JSON)."""

    run_id: str
    settings_json: str = "{}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Upload:
    """Send the weights of these hosted partitions to the server."""

    run_id: str
    partitions: tuple[int, ...]
    round: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class StopRun:
    """Stop everything the client does for a run and drop its state."""

    run_id: str
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class PrepareRun:
    """Before a training run's first round: how its stages train (LoRA or full), as JSON."""

    run_id: str
    settings_json: str = "{}"


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadPartitions:
    """Replace these partitions' trained tensors with the server's merged ones."""

    run_id: str
    partitions: tuple[PartitionAssignment, ...]  # index, weights_sha256, weights_bytes
    round: int = 0


CommandBody = HostRun | ConnectPeers | Train | Upload | StopRun | PrepareRun | LoadPartitions


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


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadReceipt:
    """The server's confirmation of a stored upload."""

    sha256: str
    total_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredUpload:
    """An upload the server verified and kept."""

    client_id: str
    header: WeightHeader
    path: str
    received_at: float = field(default=0.0)  # wall-clock seconds since the epoch
