"""Fetching partition weights into a cache keyed by their sha256.

A file is kept as ``<cache>/<sha256>.safetensors`` only after its bytes hash to that name, so
anything in the cache is known good; a partition that did not change between two plans is
not downloaded again.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Protocol

from proto.messages import PartitionAssignment, WeightHeader, file_sha256

from .errors import WeightsError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class WeightSource(Protocol):
    """What fetching needs from a connection (``ControlChannel`` has it)."""

    async def download_partition(self, run_id: str, partition: int, dest: Path) -> WeightHeader: ...



async def fetch_partition(
    source: WeightSource, run_id: str, assignment: PartitionAssignment, cache_dir: Path
) -> Path:
    """The weights of ``assignment``: from the cache, or downloaded and checked against its sha256."""
    expected = assignment.weights_sha256
    if not _HEX64.match(expected):
        raise WeightsError(f"partition {assignment.index} has no valid sha256 in its assignment: {expected!r}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{expected}.safetensors"
    if target.exists() and file_sha256(target) == expected:
        return target
    with tempfile.NamedTemporaryFile(dir=cache_dir, prefix=".download-", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        header = await source.download_partition(run_id, assignment.index, partial)
        if header.sha256 != expected or header.total_bytes != assignment.weights_bytes:
            raise WeightsError(
                f"the server sent partition {assignment.index} with sha256 {header.sha256[:12]}... "
                f"({header.total_bytes} bytes), but the command named {expected[:12]}... "
                f"({assignment.weights_bytes} bytes); the plan changed meanwhile"
            )
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target
