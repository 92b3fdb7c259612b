"""The server's SQLite database in its state dir: one file, a schema version, and migrations.

Both persistent stores (:class:`server.control.sqlite_state.SqliteState` for clients, commands,
plans and uploads; :class:`server.training.sqlite_store.SqliteRunStore` for runs) share one
:class:`Database`. Its ``schema_version`` table holds the version the file was migrated to;
opening a file runs every migration above it, in order, each in one transaction, so a file
written by an older server is brought up to date and a newer file than this server knows is
refused (with what to do).

A migration is appended to :data:`MIGRATIONS`, never edited once released: version ``n`` is
``MIGRATIONS[n - 1]``.

The connection is shared between the event loop and the threads the server hands work to
(a merge reads uploads in a thread), so every statement runs under one lock.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["DATABASE_FILE", "MIGRATIONS", "Database", "DatabaseError"]

DATABASE_FILE = "titanic.sqlite3"  # its name in the state dir

# Each entry migrates version n-1 to n (version 0: an empty file).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE clients (
            client_id TEXT PRIMARY KEY,
            session_digest TEXT NOT NULL,
            status TEXT NOT NULL,
            record BLOB NOT NULL          -- JSON of the ClientRecord (profile and info as protobuf, base64)
        )""",
        "CREATE INDEX clients_by_session ON clients (session_digest)",
        """CREATE TABLE commands (
            command_id INTEGER PRIMARY KEY,
            client_id TEXT NOT NULL,
            command BLOB NOT NULL         -- the Command as protobuf bytes
        )""",
        """CREATE TABLE command_status (
            command_id INTEGER PRIMARY KEY,
            report BLOB NOT NULL          -- the latest StatusReport as protobuf bytes
        )""",
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "CREATE TABLE deployment (id INTEGER PRIMARY KEY CHECK (id = 1), deployment TEXT NOT NULL)",
        """CREATE TABLE uploads (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL,
            upload TEXT NOT NULL          -- JSON of the StoredUpload
        )""",
        "CREATE INDEX uploads_by_run ON uploads (run_id)",
        """CREATE TABLE runs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL UNIQUE,
            state TEXT NOT NULL,
            run TEXT NOT NULL,            -- JSON: spec, machine, history, checkpoints, traffic, signals
            aggregator BLOB NOT NULL      -- safetensors of the aggregator's tensors (its JSON rides in run)
        )""",
    ),
)


class DatabaseError(Exception):
    """The state dir's database cannot be used (its message says what to do)."""


class Database:
    """One SQLite file, migrated to the newest schema on open."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives a killed process
        self._migrate()

    @property
    def version(self) -> int:
        """The schema version of the file."""
        rows = self.rows("SELECT version FROM schema_version")
        return int(rows[0][0]) if rows else 0

    def _migrate(self) -> None:
        with self.transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                db.execute("INSERT INTO schema_version (version) VALUES (0)")
        current = self.version
        if current > len(MIGRATIONS):
            raise DatabaseError(
                f"{self.path} has schema version {current}, newer than this server's {len(MIGRATIONS)}; "
                "upgrade titanic, or start the server with another --state-dir"
            )
        for version in range(current + 1, len(MIGRATIONS) + 1):
            with self.transaction() as db:
                for statement in MIGRATIONS[version - 1]:
                    db.execute(statement)
                db.execute("UPDATE schema_version SET version = ?", (version,))

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection inside one transaction (committed on success, rolled back on an error)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> None:
        """Run one writing statement on its own (it commits at once)."""
        with self._lock:
            self._conn.execute(sql, parameters)

    def rows(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Every row of a query, read under the lock."""
        with self._lock:
            return list(self._conn.execute(sql, parameters).fetchall())

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._conn.close()
