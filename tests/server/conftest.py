"""Shared pieces of the server tests: a controllable clock, handlers, and typical inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from proto.messages import ClientInfo, DeviceProfile, Registration, StatusReport
from server.config import AuthSettings, ControlSettings
from server.control.handler import ControlHandler
from server.control.state import InMemoryState
from server.control.weights import WeightStore

JOIN_TOKEN = "join-token-for-tests"
ALICE_KEY = "alice-key-for-tests"


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingListener:
    """A ControlListener that remembers what it was told."""

    def __init__(self) -> None:
        self.changes = 0
        self.reports: list[tuple[str, StatusReport]] = []

    def membership_changed(self) -> None:
        self.changes += 1

    def status_reported(self, client_id: str, report: StatusReport) -> None:
        self.reports.append((client_id, report))


def compute_profile(flops: float = 1e10, memory: int = 8 << 30) -> DeviceProfile:
    """A profile as it arrives at registration: compute and memory, no link yet."""
    return DeviceProfile(flops_per_s=flops, memory_bytes=memory, capacity=1)


def full_profile(flops: float = 1e10, memory: int = 8 << 30, bandwidth: float = 1e8) -> DeviceProfile:
    """A complete profile with a measured link."""
    return DeviceProfile(
        flops_per_s=flops,
        memory_bytes=memory,
        upload_bytes_per_s=bandwidth,
        download_bytes_per_s=bandwidth,
        rtt_s=0.001,
        capacity=1,
    )


def registration(name: str = "c1", *, token: str | None = JOIN_TOKEN, key: str | None = None, owner: bool = False) -> Registration:
    """A registration request."""
    return Registration(
        name=name,
        join_token=token,
        client_key=key,
        info=ClientInfo(hostname=name, has_data=owner),
        profile=compute_profile(),
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def listener() -> RecordingListener:
    return RecordingListener()


@pytest.fixture
def handler(tmp_path: Path, clock: FakeClock, listener: RecordingListener) -> ControlHandler:
    settings = ControlSettings(heartbeat_interval_s=1.0, heartbeat_timeout_s=3.0, max_chunk_bytes=64 * 1024, probe_max_seconds=1.0, probe_max_bytes=1 << 20, max_upload_bytes=1 << 20)
    auth = AuthSettings(join_tokens=(JOIN_TOKEN,), client_keys={"alice": ALICE_KEY})
    return ControlHandler(
        InMemoryState(),
        settings=settings,
        auth=auth,
        weights=WeightStore(tmp_path / "weights", chunk_bytes=64 * 1024),
        listener=listener,
        clock=clock,
    )
