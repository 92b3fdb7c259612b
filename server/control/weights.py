"""Partition weight files the server hands out and the uploads it receives.

Files are stored by content: ``<root>/blobs/<sha256>.safetensors``. A (run, partition) pair
points at a blob, so a partition that did not change between two plans is stored and
hashed once. Uploads land in ``<root>/uploads/<run>/`` only after their size and digest
check out.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

from proto.messages import WeightHeader, file_sha256
from server.errors import (
    ForbiddenError,
    IntegrityError,
    InvalidRequestError,
    LimitExceededError,
    NotFoundError,
)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredWeights:
    """One weight file on disk."""

    path: Path
    sha256: str  # hex digest of the file
    size: int  # bytes



class WeightStore:
    """Content-addressed partition files under ``root``."""

    def __init__(self, root: Path, *, chunk_bytes: int = 1 << 20) -> None:
        self.root = Path(root)
        self.chunk_bytes = chunk_bytes
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "uploads").mkdir(parents=True, exist_ok=True)
        self._index: dict[tuple[str, int], StoredWeights] = {}
        self._grants: dict[tuple[str, int], frozenset[str]] = {}

    def add(self, run_id: str, partition: int, source: Path, *, clients: Iterable[str]) -> StoredWeights:
        """Store ``source`` (moved) as the weights of ``partition`` of ``run_id`` for ``clients``."""
        sha = file_sha256(source)
        target = self.root / "blobs" / f"{sha}.safetensors"
        if target.exists():
            source.unlink()
        else:
            shutil.move(source, target)
        stored = StoredWeights(path=target, sha256=sha, size=target.stat().st_size)
        self.alias(run_id, partition, stored, clients=clients)
        return stored

    def alias(self, run_id: str, partition: int, stored: StoredWeights, *, clients: Iterable[str]) -> None:
        """Let (run, partition) use a stored file, and let ``clients`` download it."""
        self._index[(run_id, partition)] = stored
        self._grants[(run_id, partition)] = frozenset(clients)

    def stored_at(self, path: Path) -> StoredWeights:
        """The stored file at ``path`` (a blob this store wrote earlier)."""
        return StoredWeights(path=path, sha256=path.stem, size=path.stat().st_size)

    def forget_run(self, run_id: str) -> None:
        """Drop a run's entries (its files stay while another run uses them)."""
        for key in [k for k in self._index if k[0] == run_id]:
            del self._index[key]
            del self._grants[key]

    def get(self, run_id: str, partition: int, *, client_id: str | None = None) -> StoredWeights:
        """The weights of a partition; with ``client_id``, only if that client was given it."""
        stored = self._index.get((run_id, partition))
        if stored is None:
            raise NotFoundError(
                f"the server has no weights for partition {partition} of run {run_id!r}; "
                "the run may have been replaced by a newer plan"
            )
        if client_id is not None and client_id not in self._grants[(run_id, partition)]:
            raise ForbiddenError(
                f"partition {partition} of run {run_id!r} is not assigned to client {client_id!r}"
            )
        return stored

    async def read_chunks(self, stored: StoredWeights) -> AsyncIterator[bytes]:
        """The file's bytes in chunks of at most ``chunk_bytes``; reads happen off the event loop."""
        with stored.path.open("rb") as f:
            while chunk := await asyncio.to_thread(f.read, self.chunk_bytes):
                yield chunk

    async def receive_upload(
        self,
        header: WeightHeader,
        chunks: AsyncIterator[bytes],
        *,
        client_id: str,
        max_bytes: int,
    ) -> Path:
        """Write an upload to disk, checking size and digest; returns where it was kept."""
        if not _HEX64.match(header.sha256):
            raise InvalidRequestError("an upload's sha256 must be 64 lowercase hex digits")
        if not _SAFE_NAME.match(header.run_id) or not _SAFE_NAME.match(client_id):
            raise InvalidRequestError(f"run id {header.run_id!r} cannot name an upload; use [A-Za-z0-9._-]")
        if header.total_bytes > max_bytes:
            raise LimitExceededError(
                f"an upload of {header.total_bytes} bytes is over the server's limit of {max_bytes} bytes"
            )
        folder = self.root / "uploads" / header.run_id
        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        received = 0
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".incoming-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    received += len(chunk)
                    if received > header.total_bytes:
                        raise IntegrityError(
                            f"the upload sent more than the {header.total_bytes} bytes its header announced"
                        )
                    digest.update(chunk)
                    await asyncio.to_thread(out.write, chunk)
            if received != header.total_bytes:
                raise IntegrityError(
                    f"the upload ended after {received} of the {header.total_bytes} bytes it announced"
                )
            if digest.hexdigest() != header.sha256:
                raise IntegrityError("the uploaded bytes do not match their sha256; send them again")
            target = folder / f"p{header.partition}-r{header.round}-{client_id}.safetensors"
            tmp.replace(target)
            return target
        finally:
            tmp.unlink(missing_ok=True)
