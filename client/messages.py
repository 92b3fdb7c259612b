"""The control plane's messages as the client sees them: plain dataclasses, no protobuf.

``client/convert.py`` turns the wire types of ``proto/control.proto`` into these and back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

PROTOCOL_VERSION = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceProfile:
    """What this device can do, as reported to the server."""

    flops_per_s: float  # sustained training FLOP/s
    memory_bytes: int  # free host memory
    gpu_memory_bytes: int = 0  # free memory of the training GPU; 0 without one
    device: str = "cpu"  # where training runs: "cpu" or "cuda"
    accelerator: str = ""  # e.g. the GPU's name
    upload_bytes_per_s: float = 0.0  # to the server; 0 until measured
    download_bytes_per_s: float = 0.0  # from the server; 0 until measured
    rtt_s: float = 0.0  # round-trip time to the server; 0 until measured
    capacity: int = 1  # most partitions this client hosts at once
    declared: frozenset[str] = frozenset()  # fields the operator declared instead of measuring
    flops_method: str = ""  # how flops_per_s was measured


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientInfo:
    """Facts about this client for the operator."""

    version: str
    hostname: str
    platform: str
    has_data: bool  # this client owns training data
    data_bytes: int  # size of that data on disk
    bridge_host: str  # the address peers use to reach this client's stage host


@dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    """What the server granted at registration."""

    client_id: str
    token: str
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    max_chunk_bytes: int
    probe_max_seconds: float


class RunState(enum.StrEnum):
    """What this client is doing for a run."""

    PREPARING = "preparing"
    READY = "ready"
    SERVING = "serving"
    CONNECTED = "connected"
    TRAINING = "training"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True, kw_only=True)
class RunStatus:
    """This client's view of one run."""

    run_id: str
    partitions: tuple[int, ...] = ()
    state: RunState = RunState.PREPARING
    bridge_url: str = ""
    message: str = ""


class CommandState(enum.StrEnum):
    """How far this client got with a command."""

    ACCEPTED = "accepted"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusReport:
    """Progress on one command."""

    command_id: int
    state: CommandState
    message: str = ""
    run: RunStatus | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionAssignment:
    """One partition to host."""

    index: int  # 0-based partition (stage) number
    num_stages: int
    layer_start: int  # first decoder block, inclusive
    layer_end: int  # last decoder block, exclusive
    weights_sha256: str  # hex digest of its safetensors file
    weights_bytes: int
    local: bool  # for this client's own pipeline; not served to peers


@dataclass(frozen=True, slots=True, kw_only=True)
class AllowedPeer:
    """A peer to accept: the digest of the token it will present."""

    client_id: str
    token_sha256: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HostRun:
    """Host these partitions of a run and let these peers in."""

    run_id: str
    model_config_json: str
    partitions: tuple[PartitionAssignment, ...]
    allowed_peers: tuple[AllowedPeer, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerEndpoint:
    """The host of one partition, and the token to show it."""

    partition: int
    client_id: str
    url: str
    token: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectPeers:
    """Connect to the hosts of a run's other partitions."""

    run_id: str
    peers: tuple[PeerEndpoint, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Train:
    """Train a run."""

    run_id: str
    settings_json: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Upload:
    """Send these hosted partitions' weights to the server."""

    run_id: str
    partitions: tuple[int, ...]
    round: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StopRun:
    """Stop a run and drop its state."""

    run_id: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PrepareRun:
    """Before a training run's first round: how its stages train (LoRA or full), as JSON."""

    run_id: str
    settings_json: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadPartitions:
    """Replace these partitions' trained tensors with the server's merged ones."""

    run_id: str
    partitions: tuple[PartitionAssignment, ...]  # index, weights_sha256, weights_bytes
    round: int


CommandBody = HostRun | ConnectPeers | Train | Upload | StopRun | PrepareRun | LoadPartitions


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    """A command from the server."""

    command_id: int
    body: CommandBody


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightHeader:
    """Announces weights sent in chunks."""

    run_id: str
    partition: int
    total_bytes: int
    sha256: str
    round: int = 0
    num_samples: int = 0
