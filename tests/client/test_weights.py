"""Fetching partition weights into the sha256-keyed cache, from a real server."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from client.channel import ControlChannel
from client.errors import WeightsError
from client.weights import fetch_partition
from proto.messages import ClientInfo, DeviceProfile, PartitionAssignment
from tests.server.support import JOIN_TOKEN, running_app, server_config

INFO = ClientInfo(version="t", hostname="h", platform="p", has_data=False, data_bytes=0, bridge_host="127.0.0.1")


def assignment(data: bytes, index: int = 1) -> PartitionAssignment:
    return PartitionAssignment(
        index=index, num_stages=3, layer_start=0, layer_end=1,
        weights_sha256=hashlib.sha256(data).hexdigest(), weights_bytes=len(data), local=False,
    )


async def test_fetch_downloads_once_then_uses_the_cache(tmp_path: Path) -> None:
    """The first fetch downloads and checks; the second is served from the cache."""
    data = b"stage weights " * 5000
    async with running_app(server_config(tmp_path / "server")) as app, ControlChannel(app.control_address) as channel:
        await channel.register(name="c1", join_token=JOIN_TOKEN, client_key=None, info=INFO, profile=DeviceProfile(flops_per_s=1e9, memory_bytes=2**30))
        source = tmp_path / "stage.safetensors"
        source.write_bytes(data)
        assert app.handler is not None
        app.handler.weights.add("r1", 1, source, clients=["c1"])
        first = await fetch_partition(channel, "r1", assignment(data), tmp_path / "cache")
        app.handler.weights.forget_run("r1")  # a second download would now fail
        second = await fetch_partition(channel, "r1", assignment(data), tmp_path / "cache")
    assert first == second and first.read_bytes() == data
    assert first.name == f"{hashlib.sha256(data).hexdigest()}.safetensors"


async def test_fetch_refuses_weights_other_than_assigned(tmp_path: Path) -> None:
    """Weights whose digest differs from the command's are refused and not cached."""
    async with running_app(server_config(tmp_path / "server")) as app, ControlChannel(app.control_address) as channel:
        await channel.register(name="c1", join_token=JOIN_TOKEN, client_key=None, info=INFO, profile=DeviceProfile(flops_per_s=1e9, memory_bytes=2**30))
        source = tmp_path / "stage.safetensors"
        source.write_bytes(b"what the server has")
        assert app.handler is not None
        app.handler.weights.add("r1", 1, source, clients=["c1"])
        with pytest.raises(WeightsError, match="plan changed"):
            await fetch_partition(channel, "r1", assignment(b"what the command said"), tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
