"""Measuring what this device can do: compute, memory, and its link to the server.

* **Compute**: a training-shaped matmul benchmark. ``y = x @ w`` with ``x`` (n, n) and
  ``w`` (n, n) both requiring grad, then ``y.backward(g)``: one forward and two backward
  matmuls, ``6 n^3`` FLOPs per step, timed for ``compute_seconds`` after a warm-up step.
* **Memory**: available host memory (``MemAvailable``), and the free memory of the GPU
  when training runs on one.
* **Link**: the median round trip of small calls on the already open connection; upload and
  download bandwidth from streams of incompressible chunks lasting ``link_seconds``, counted
  from the first chunk's arrival to the last's (so connection set-up and the first
  window's burst are left out, and what remains is the sustained rate).

Declared values (``[declare]``) replace measured ones and are listed in ``declared``; a
declared field is not measured at all.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from proto.messages import DeviceProfile

from .config import DeclaredProfile, ProfileSettings


@dataclass(frozen=True, slots=True, kw_only=True)
class ComputeMeasurement:
    """The result of the compute benchmark."""

    flops_per_s: float
    device: str  # "cpu" or "cuda"
    accelerator: str  # GPU name, or "" on CPU
    method: str  # what was run, for the operator


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkMeasurement:
    """The link to the server."""

    upload_bytes_per_s: float
    download_bytes_per_s: float
    rtt_s: float


class LinkProber(Protocol):
    """What measuring a link needs from a connection (``ControlChannel`` has it)."""

    async def rtt(self, count: int) -> float: ...

    async def probe_upload(self, seconds: float, chunk_bytes: int) -> tuple[int, float]: ...

    async def probe_download(self, seconds: float, chunk_bytes: int) -> tuple[int, float]: ...


def training_device(settings: ProfileSettings) -> str:
    """Where training runs: the configured device, or cuda when auto finds one."""
    if settings.device == "cpu":
        return "cpu"  # without importing torch: a client with declared compute starts in a blink
    import torch

    if settings.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("[profile] device = cuda, but torch finds no CUDA device; use auto or cpu")
    return settings.device


def measure_compute(settings: ProfileSettings) -> ComputeMeasurement:
    """Sustained FLOP/s of a training-shaped fp32 matmul (blocking; run it in a thread)."""
    import torch

    settings = settings.effective()
    device = training_device(settings)
    n = settings.matmul_size
    x = torch.randn(n, n, device=device, requires_grad=True)  # (n, n) activations
    w = torch.randn(n, n, device=device, requires_grad=True)  # (n, n) weights
    g = torch.randn(n, n, device=device)  # (n, n) upstream gradient

    def step() -> None:
        y = x @ w  # forward: 2 n^3
        y.backward(g)  # dL/dx = g w^T and dL/dw = x^T g: 4 n^3

    step()  # warm-up: allocations, kernel selection
    if device == "cuda":
        torch.cuda.synchronize()
    steps = 0
    start = time.perf_counter()
    while True:
        step()
        steps += 1
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed >= settings.compute_seconds:
            break
    flops = 6 * n**3 * steps / elapsed
    accelerator = torch.cuda.get_device_name() if device == "cuda" else ""
    method = f"fp32 matmul {n}x{n} forward+backward, {steps} steps in {elapsed:.2f} s on {device}"
    return ComputeMeasurement(flops_per_s=flops, device=device, accelerator=accelerator, method=method)


def available_memory_bytes() -> int:
    """Host memory available to a new process (``MemAvailable``; free pages elsewhere)."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_gpu_memory_bytes(device: str) -> int:
    """Free memory of the training GPU, or 0 when training runs on the CPU."""
    if device != "cuda":
        return 0
    import torch

    free, _total = torch.cuda.mem_get_info()
    return int(free)


async def measure_link(prober: LinkProber, settings: ProfileSettings, *, max_seconds: float) -> LinkMeasurement:
    """Round-trip time and sustained bandwidth both ways against the server."""
    settings = settings.effective()
    seconds = min(settings.link_seconds, max_seconds)
    rtt = await prober.rtt(settings.pings)
    up_bytes, up_seconds = await prober.probe_upload(seconds, settings.chunk_bytes)
    down_bytes, down_seconds = await prober.probe_download(seconds, settings.chunk_bytes)
    return LinkMeasurement(
        upload_bytes_per_s=_rate(up_bytes, up_seconds),
        download_bytes_per_s=_rate(down_bytes, down_seconds),
        rtt_s=rtt,
    )


def _rate(nbytes: int, seconds: float) -> float:
    # A probe so short that everything arrived at once says only "faster than we can tell":
    # report what one chunk per microsecond would be rather than dividing by zero.
    return nbytes / max(seconds, 1e-6)


def compute_profile(
    compute: ComputeMeasurement, declared: DeclaredProfile, *, capacity: int
) -> DeviceProfile:
    """The profile before the link is known: compute and memory, declared values applied."""
    profile = DeviceProfile(
        flops_per_s=compute.flops_per_s,
        memory_bytes=available_memory_bytes(),
        gpu_memory_bytes=free_gpu_memory_bytes(compute.device),
        device=compute.device,
        accelerator=compute.accelerator,
        capacity=capacity,
        flops_method=compute.method,
    )
    return apply_declared(profile, declared)


def with_link(profile: DeviceProfile, link: LinkMeasurement, declared: DeclaredProfile) -> DeviceProfile:
    """The complete profile: the measured link added, declared values still winning."""
    measured = dataclasses.replace(
        profile,
        upload_bytes_per_s=link.upload_bytes_per_s,
        download_bytes_per_s=link.download_bytes_per_s,
        rtt_s=link.rtt_s,
    )
    return apply_declared(measured, declared)


def link_declared(declared: DeclaredProfile) -> bool:
    """Whether every link field is declared, so nothing needs measuring."""
    values = declared.values()
    return all(k in values for k in ("upload_bytes_per_s", "download_bytes_per_s", "rtt_s"))


def apply_declared(profile: DeviceProfile, declared: DeclaredProfile) -> DeviceProfile:
    """``profile`` with the declared fields replaced and marked as declared."""
    values = declared.values()
    if not values:
        return profile
    return dataclasses.replace(profile, **values, declared=profile.declared | frozenset(values))  # type: ignore[arg-type]
