"""The client daemon's settings: keyword-only dataclasses, filled from a TOML file and flags.

A config file has one table per dataclass below (every key optional, flags win)::

    [client]     server, name, token, key, data, cache_dir, capacity
    [tls]        ca, server_name, enabled
    [bridge]     host, port, advertise
    [profile]    quick, device, matmul_size, compute_seconds, link_seconds, pings, chunk_bytes
    [declare]    flops_per_s, memory_bytes, gpu_memory_bytes, upload_bytes_per_s,
                 download_bytes_per_s, rtt_s, max_micro_batch
                                                    (overrides for emulation; marked "declared")
    [reconnect]  initial_s, max_s, multiplier, jitter

An unknown table or key is an error that names the known ones.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autograd_bridge.config import read_toml, sections_from_mapping

MIB = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionSettings:
    """Who this client is and which server it joins."""

    server: str = ""  # HOST:PORT of the server's control plane
    name: str = dataclasses.field(default_factory=lambda: socket.gethostname().split(".")[0] or "client")
    token: str | None = None  # the server's join token
    key: str | None = None  # this client's own key, when the operator gave it one
    data: Path | None = None  # the training data this client owns; never leaves the device
    cache_dir: Path | None = None  # where partition weights are kept; default ~/.cache/titanic/<name>
    capacity: int = 1  # most partitions this client hosts at once

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError("[client] capacity must be at least 1")

    def check(self) -> None:
        """Checks that need the whole config (flags applied)."""
        host, sep, port = self.server.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"the server address must be HOST:PORT, got {self.server!r}; pass --server")
        if self.token is None and self.key is None:
            raise ValueError("the client needs the server's join token (--token) or its own key (--key)")
        if self.data is not None and not self.data.exists():
            raise ValueError(f"data path {self.data} does not exist")


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsSettings:
    """How the client checks the server's certificate."""

    enabled: bool = False  # use TLS; implied by ca
    ca: Path | None = None  # PEM file of the CA that signed the server's certificate; None uses system roots
    server_name: str | None = None  # name to verify instead of the host in the address

    @property
    def active(self) -> bool:
        """Whether the connection uses TLS."""
        return self.enabled or self.ca is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class BridgeSettings:
    """Where this client's stage host listens for peers."""

    host: str = "127.0.0.1"  # address to bind
    port: int = 0  # 0 picks a free port per run
    advertise: str | None = None  # address peers should use; default: host (or this machine's name for 0.0.0.0)

    @property
    def public_host(self) -> str:
        """The address peers are told to use."""
        if self.advertise:
            return self.advertise
        return socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host


@dataclass(frozen=True, slots=True, kw_only=True)
class ProfileSettings:
    """How the device is measured."""

    quick: bool = False  # tiny measurements (tests, demos): fast but noisy
    device: str = "auto"  # where training would run: auto, cpu or cuda
    matmul_size: int = 1024  # n of the n x n training matmul benchmark
    compute_seconds: float = 1.0  # how long the benchmark runs after a warm-up
    link_seconds: float = 2.0  # how long each bandwidth probe runs (sustained, after the first chunk)
    pings: int = 10  # round trips measured; the median is reported
    chunk_bytes: int = MIB // 4  # size of probe chunks; small enough for several per second on slow links

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"[profile] device must be auto, cpu or cuda, got {self.device!r}")
        if self.matmul_size < 16 or self.compute_seconds <= 0 or self.link_seconds <= 0 or self.pings < 1:
            raise ValueError("[profile] matmul_size >= 16, compute_seconds > 0, link_seconds > 0, pings >= 1")

    def effective(self) -> ProfileSettings:
        """These settings, shrunk when ``quick`` is set."""
        if not self.quick:
            return self
        return dataclasses.replace(
            self, matmul_size=min(self.matmul_size, 128), compute_seconds=0.05, link_seconds=0.15, pings=3
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DeclaredProfile:
    """Profile fields the operator sets instead of measuring (emulating a weaker device)."""

    flops_per_s: float | None = None
    memory_bytes: int | None = None
    gpu_memory_bytes: int | None = None
    upload_bytes_per_s: float | None = None
    download_bytes_per_s: float | None = None
    rtt_s: float | None = None
    # The largest micro-batch (sequences) this device trains at once; unset, the server
    # derives it from the memory above and the partitions the device holds.
    max_micro_batch: int | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and not value >= 0:
                raise ValueError(f"[declare] {f.name} must be a non-negative number, got {value}")
        if self.max_micro_batch is not None and (int(self.max_micro_batch) != self.max_micro_batch or self.max_micro_batch < 1):
            raise ValueError(f"[declare] max_micro_batch must be an integer >= 1, got {self.max_micro_batch}")

    def values(self) -> dict[str, float | int]:
        """The declared fields and their values."""
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconnectSettings:
    """Backoff between attempts to reach the server."""

    initial_s: float = 0.5  # first wait
    max_s: float = 30.0  # longest wait
    multiplier: float = 2.0  # growth per failed attempt
    jitter: float = 0.2  # +- this fraction, so many clients do not retry in step

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.max_s < self.initial_s or self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ValueError("[reconnect] needs 0 < initial_s <= max_s, multiplier >= 1, 0 <= jitter < 1")

    def delay(self, attempt: int, unit_random: float) -> float:
        """The wait before attempt ``attempt`` (0-based); ``unit_random`` is uniform in [0, 1)."""
        base = min(self.max_s, self.initial_s * self.multiplier**attempt)
        return base * (1 + self.jitter * (2 * unit_random - 1))


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    """Everything ``titanic-client run`` needs."""

    client: ConnectionSettings = ConnectionSettings()
    tls: TlsSettings = TlsSettings()
    bridge: BridgeSettings = BridgeSettings()
    profile: ProfileSettings = ProfileSettings()
    declare: DeclaredProfile = DeclaredProfile()
    reconnect: ReconnectSettings = ReconnectSettings()

    @property
    def cache_dir(self) -> Path:
        """Where partition weights are cached."""
        return self.client.cache_dir or Path.home() / ".cache" / "titanic" / self.client.name


_SECTIONS: dict[str, type] = {
    "client": ConnectionSettings,
    "tls": TlsSettings,
    "bridge": BridgeSettings,
    "profile": ProfileSettings,
    "declare": DeclaredProfile,
    "reconnect": ReconnectSettings,
}


def config_from_mapping(data: Mapping[str, Any]) -> ClientConfig:
    """A config from parsed TOML."""
    return ClientConfig(**sections_from_mapping(_SECTIONS, data, "client config"))


def load_config(path: Path) -> ClientConfig:
    """Read a TOML config file."""
    return config_from_mapping(read_toml(path, "config file"))
