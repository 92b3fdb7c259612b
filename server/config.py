"""The server's settings: keyword-only dataclasses, filled from a TOML file and flags.

A config file has one table per dataclass below (every key optional)::

    [server]      host, port, admin_host, admin_port, state_dir
    [auth]        join_tokens, admin_token, and a [auth.client_keys] table of name = "key"
    [tls]         cert, key          (both, or neither)
    [control]     heartbeat_interval_s, heartbeat_timeout_s, max_chunk_bytes, ...
    [model]       path, stages
    [planning]    settle_s, transfer_weight, compute_weight, seq_len, batch_tokens, ...

An unknown table or key is an error that names the known ones, so a typo never passes silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autograd_bridge.config import read_toml, sections_from_mapping

MIB = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenSettings:
    """Where the server listens."""

    host: str = "127.0.0.1"  # address of the gRPC control plane
    port: int = 50051  # its port; 0 picks a free one (the server prints it)
    admin_host: str = "127.0.0.1"  # address of the admin HTTP API; keep it private
    admin_port: int = 8750  # its port; 0 picks a free one
    state_dir: Path = Path("titanic-server")  # weights, uploads, generated tokens

    def __post_init__(self) -> None:
        for name in ("port", "admin_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ValueError(f"[server] {name} must be a port number in 0..65535, got {value}")


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthSettings:
    """Who may join, and who may use the admin API."""

    join_tokens: tuple[str, ...] = ()  # any client presenting one of these may join, under any name
    client_keys: Mapping[str, str] = field(default_factory=dict)  # name -> key for named clients
    admin_token: str = ""  # bearer token of the admin API; generated into state_dir when empty

    def __post_init__(self) -> None:
        for token in self.join_tokens:
            if len(token) < 8:
                raise ValueError("[auth] join tokens must be at least 8 characters; make them long and random")
        for name, key in self.client_keys.items():
            if len(key) < 8:
                raise ValueError(f"[auth.client_keys] the key of {name!r} must be at least 8 characters")


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsSettings:
    """The server's certificate; clients verify it against their CA."""

    cert: Path  # PEM certificate chain
    key: Path  # PEM private key

    def __post_init__(self) -> None:
        for name in ("cert", "key"):
            path = getattr(self, name)
            if not Path(path).is_file():
                raise ValueError(f"[tls] {name} file {path} does not exist")


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlSettings:
    """Liveness and transfer limits of the control plane."""

    heartbeat_interval_s: float = 2.0  # how often clients send a heartbeat
    heartbeat_timeout_s: float = 6.0  # silent this long, a client is lost and the plan is redone
    max_chunk_bytes: int = MIB  # largest data chunk in a stream, far below gRPC's 4 MiB message limit
    probe_max_seconds: float = 5.0  # longest bandwidth probe the server serves
    probe_max_bytes: int = 4096 * MIB  # most bytes one probe may move
    max_upload_bytes: int = 64 * 1024 * MIB  # largest weight upload accepted
    max_streams_per_client: int = 4  # probes and uploads one client may have open at once
    forget_after_s: float = 600.0  # a lost or departed client leaves the registry after this long

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0:
            raise ValueError("[control] heartbeat_interval_s must be positive")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                "[control] heartbeat_timeout_s must be longer than heartbeat_interval_s "
                "(three intervals is a good choice), or every client would be lost between beats"
            )
        if not 1024 <= self.max_chunk_bytes <= 3 * MIB:
            raise ValueError("[control] max_chunk_bytes must be in 1 KiB..3 MiB (gRPC's limit is 4 MiB)")
        if self.probe_max_seconds <= 0 or self.probe_max_bytes <= 0:
            raise ValueError("[control] probe_max_seconds and probe_max_bytes must be positive")
        if self.max_streams_per_client < 1:
            raise ValueError("[control] max_streams_per_client must be at least 1")
        if not self.forget_after_s >= 0:
            raise ValueError("[control] forget_after_s must be a number of seconds >= 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSettings:
    """The model the server plans for."""

    path: str  # a Hugging Face model directory (or hub name) the server can load; with init = "random", its config.json
    stages: int | None = None  # partitions per pipeline (1: each data owner holds the whole model); None: the planner chooses
    init: str = "pretrained"  # "pretrained": the weights at path; "random": pre-train from scratch, weights drawn from init_seed
    init_seed: int = 0  # the seed of a random initialisation (the server draws it once, every client gets the same)

    def __post_init__(self) -> None:
        if self.init not in ("pretrained", "random"):
            raise ValueError(f"[model] init must be 'pretrained' (load the weights) or 'random' (from scratch), got {self.init!r}")
        if isinstance(self.init_seed, bool) or not isinstance(self.init_seed, int) or self.init_seed < 0:
            raise ValueError(f"[model] init_seed must be an integer >= 0, got {self.init_seed!r}")
        if self.stages is not None and (isinstance(self.stages, bool) or not isinstance(self.stages, int) or self.stages < 1):
            raise ValueError(
                f"[model] stages must be an integer >= 1 (1: each data owner trains the whole model alone), "
                f"or left out to let the planner choose; got {self.stages!r}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanningSettings:
    """When the server replans, and what it tells the planner (see server/planner)."""

    settle_s: float = 1.0  # wait this long after the last change of clients before replanning
    transfer_weight: float = 1.0  # a in d = a*D + b*T: weight of transfer seconds in the cost
    compute_weight: float = 1.0  # b: weight of compute seconds
    seq_len: int = 512  # sequence length the model is profiled at
    batch_tokens: int = 4096  # tokens per training step of one pipeline (batch x sequence length)
    micro_batches: int = 1  # micro-batches per step
    forward_passes: int = 0  # > 0: pipelines train with forward gradients, this many forwards per step and no backward
    steps_per_round: int = 1  # steps between two weight exchanges with the server
    max_step_time_s: float | None = None  # clients slower than this per step get no stage
    solver: str = "auto"  # "cvxpy", "matching" or "auto"
    serve_timeout_s: float = 120.0  # a planned host not serving by then is left out and the plan redone

    def __post_init__(self) -> None:
        if self.settle_s < 0:
            raise ValueError("[planning] settle_s must not be negative")
        if not self.serve_timeout_s > 0:
            raise ValueError("[planning] serve_timeout_s must be a positive number of seconds")
        if self.seq_len < 1 or self.batch_tokens < 1 or self.micro_batches < 1 or self.steps_per_round < 1:
            raise ValueError("[planning] seq_len, batch_tokens, micro_batches and steps_per_round must be >= 1")
        if isinstance(self.forward_passes, bool) or not isinstance(self.forward_passes, int) or self.forward_passes < 0:
            raise ValueError(f"[planning] forward_passes must be an integer >= 0 (0: backprop), got {self.forward_passes!r}")
        if self.solver not in ("auto", "cvxpy", "matching"):
            raise ValueError(f"[planning] solver must be auto, cvxpy or matching, got {self.solver!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """Everything ``titanic-server run`` needs."""

    server: ListenSettings = ListenSettings()
    auth: AuthSettings = AuthSettings()
    tls: TlsSettings | None = None  # None serves plaintext (trusted networks and tests only)
    control: ControlSettings = ControlSettings()
    model: ModelSettings | None = None  # None runs the registry without planning
    planning: PlanningSettings = PlanningSettings()


_SECTIONS: dict[str, type] = {
    "server": ListenSettings,
    "auth": AuthSettings,
    "tls": TlsSettings,
    "control": ControlSettings,
    "model": ModelSettings,
    "planning": PlanningSettings,
}


def config_from_mapping(data: Mapping[str, Any]) -> ServerConfig:
    """A config from parsed TOML."""
    return ServerConfig(**sections_from_mapping(_SECTIONS, data, "server config"))


def load_config(path: Path) -> ServerConfig:
    """Read a TOML config file."""
    return config_from_mapping(read_toml(path, "config file"))
