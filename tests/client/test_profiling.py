"""Measuring the device and its link to a real server."""

from __future__ import annotations

from pathlib import Path

from client.channel import ControlChannel
from client.config import DeclaredProfile, ProfileSettings
from client.profiling import (
    LinkMeasurement,
    apply_declared,
    available_memory_bytes,
    compute_profile,
    measure_compute,
    measure_link,
    with_link,
)
from proto.messages import ClientInfo, DeviceProfile
from tests.server.support import JOIN_TOKEN, running_app, server_config


def test_compute_benchmark_reports_positive_flops() -> None:
    """The matmul benchmark gives a positive FLOP/s and says what it ran."""
    result = measure_compute(ProfileSettings(quick=True, device="cpu"))
    assert result.flops_per_s > 1e6 and result.device == "cpu"
    assert "128x128" in result.method


def test_available_memory_is_plausible() -> None:
    """Available host memory is positive and below the machine's total."""
    import os

    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < available_memory_bytes() <= total


def test_declared_fields_replace_and_are_marked() -> None:
    """A declared value wins over the measured one and is listed as declared."""
    measured = DeviceProfile(flops_per_s=5e9, memory_bytes=10, upload_bytes_per_s=3e8)
    declared = DeclaredProfile(upload_bytes_per_s=1e6)
    profile = apply_declared(measured, declared)
    assert profile.upload_bytes_per_s == 1e6 and profile.flops_per_s == 5e9
    assert profile.declared == frozenset({"upload_bytes_per_s"})


def test_link_keeps_declared_values() -> None:
    """Adding a measured link does not overwrite declared link fields."""
    from client.profiling import ComputeMeasurement

    compute = ComputeMeasurement(flops_per_s=1e9, device="cpu", accelerator="", method="m")
    declared = DeclaredProfile(rtt_s=0.05)
    base = compute_profile(compute, declared, capacity=2)
    full = with_link(base, LinkMeasurement(upload_bytes_per_s=1.0, download_bytes_per_s=2.0, rtt_s=0.001), declared)
    assert (full.upload_bytes_per_s, full.download_bytes_per_s, full.rtt_s) == (1.0, 2.0, 0.05)
    assert full.capacity == 2 and full.declared == frozenset({"rtt_s"})


async def test_link_measured_against_a_real_server(tmp_path: Path) -> None:
    """Bandwidth both ways and the round trip come out positive over loopback."""
    info = ClientInfo(version="t", hostname="h", platform="p", has_data=False, data_bytes=0, bridge_host="127.0.0.1")
    async with running_app(server_config(tmp_path)) as app, ControlChannel(app.control_address) as channel:
        await channel.register(name="c1", join_token=JOIN_TOKEN, client_key=None, info=info, profile=DeviceProfile(flops_per_s=1e9, memory_bytes=2**30))
        link = await measure_link(channel, ProfileSettings(quick=True), max_seconds=1.0)
    # Loopback moves at least tens of MB/s even on a loaded machine.
    assert link.upload_bytes_per_s > 1e7 and link.download_bytes_per_s > 1e7
    assert 0 < link.rtt_s < 0.5
