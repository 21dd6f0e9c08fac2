"""One SQLite file in WAL mode, shared by every thread of a process: a connection per thread and
``BEGIN IMMEDIATE`` transactions. The job store and the webhook outbox both live in the same file."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from imagen.private_files import private_database, private_folder


class SqliteFile:
    def __init__(self, path: Path, schema: str) -> None:
        self.path = path
        self._local = threading.local()
        private_folder(path.parent)  # every key's prompts and uploads: 0700 (private_files.py)
        self.connection().executescript(schema)
        private_database(path)  # 0600, and so are the -wal and -shm files SQLite makes after it

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (made on first use)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives any crash of a process; a durable transaction (below) also waits
            # for the disk, so what it writes survives a power cut too. Other writes stay cheap.
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    @contextmanager
    def transaction(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception): one writer at a time."""
        db = self.connection()
        if durable:
            db.execute("PRAGMA synchronous=FULL")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            if durable:
                db.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        """Close this thread's connection."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
