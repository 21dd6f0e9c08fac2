"""One SQLite file in WAL mode, shared by every thread of a process: a connection per thread and
``BEGIN IMMEDIATE`` transactions. The job store, its totals and the webhook outbox all live in the same file.

The file's faults are mapped here, where they leave ``sqlite3``: a statement that meets a lock held too long,
a full disk, an I/O error or a damaged page raises ``DatabaseUnavailableError`` (a 503 for a request, never a
500 that also drops the client's keep-alive connection). How long a statement waits for another writer's lock
depends on who waits: a request waits ``request_lock_wait`` (seconds: it answers soon), background work
(worker slots, the reaper, webhook senders) ``BACKGROUND_LOCK_WAIT_S``.

The file itself is watched too:

- At start (``verify=True``, the job store's open): an existing file must be a whole SQLite database that passes
  ``PRAGMA quick_check``. A damaged one, or an empty one where a database was (truncated), stops the start
  with ``DatabaseDamagedError``, which names the file and how to recover; the file is left untouched, never
  replaced by a new empty database.
- While running: the path must still lead to the file opened at start (same device and inode). A file deleted
  or replaced under the server is reported by ``trouble()`` (``/health``: unavailable), logged loudly, and
  makes submissions 503; no new connection opens on whatever now lies at the path. A statement that finds the
  file damaged marks it so for good (damage does not heal).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, NoReturn

from imagen.errors import DatabaseDamagedError, DatabaseUnavailableError
from imagen.private_files import private_database, private_folder

log = logging.getLogger("imagen.jobs")

BACKGROUND_LOCK_WAIT_S = 30.0
# Set while a request is answered (``EmbeddedBackend.answering``): how long its statements wait for a lock.
_request_lock_wait_s: ContextVar[float | None] = ContextVar("request_lock_wait_s", default=None)

SQLITE_HEADER = b"SQLite format 3\x00"
# Primary result codes (``sqlite_errorcode & 0xFF``) that say the file cannot be used now, with what they mean.
# Any other error (a constraint, a bug in a statement) stays the ``sqlite3`` error it is.
_UNAVAILABLE = {
    5: "locked by another writer",  # SQLITE_BUSY: the busy timeout passed
    6: "locked",  # SQLITE_LOCKED
    8: "read-only",  # SQLITE_READONLY
    10: "disk I/O error",  # SQLITE_IOERR
    11: "damaged",  # SQLITE_CORRUPT
    13: "disk full",  # SQLITE_FULL
    14: "cannot be opened",  # SQLITE_CANTOPEN
    26: "damaged (not a database)",  # SQLITE_NOTADB
}
_DAMAGE = {11, 26}


@contextmanager
def request_lock_wait(seconds: float) -> Iterator[None]:
    """Inside: this context's statements (and the worker threads it hands calls to) wait at most ``seconds``
    for another connection's lock, then raise ``DatabaseUnavailableError``."""
    token = _request_lock_wait_s.set(seconds)
    try:
        yield
    finally:
        _request_lock_wait_s.reset(token)


class _Cursor(sqlite3.Cursor):
    """A cursor whose reads map the file's faults as ``_Connection`` does (a damaged page may show only when a
    later row is read). Plain ``try`` blocks: these run for every statement."""

    connection: _Connection

    def execute(self, sql: str, parameters: Any = (), /) -> _Cursor:
        try:
            super().execute(sql, parameters)
        except sqlite3.Error as exc:
            self.connection.file.raise_mapped(exc)
        return self

    def executemany(self, sql: str, seq_of_parameters: Any, /) -> _Cursor:
        try:
            super().executemany(sql, seq_of_parameters)
        except sqlite3.Error as exc:
            self.connection.file.raise_mapped(exc)
        return self

    def fetchone(self) -> Any:
        try:
            return super().fetchone()
        except sqlite3.Error as exc:
            self.connection.file.raise_mapped(exc)

    def fetchmany(self, size: int | None = 1) -> list[Any]:
        try:
            return super().fetchmany(size)
        except sqlite3.Error as exc:
            self.connection.file.raise_mapped(exc)

    def fetchall(self) -> list[Any]:
        try:
            return super().fetchall()
        except sqlite3.Error as exc:
            self.connection.file.raise_mapped(exc)

    def __next__(self) -> Any:
        try:
            return super().__next__()
        except sqlite3.Error as exc:
            self.connection.file.raise_mapped(exc)


class _Connection(sqlite3.Connection):
    """A connection whose statements raise ``DatabaseUnavailableError`` for the file's faults."""

    file: SqliteFile

    def cursor(self, factory: Any = None) -> _Cursor:  # type: ignore[override]
        return super().cursor(_Cursor)

    def execute(self, sql: str, parameters: Any = (), /) -> _Cursor:
        return super().cursor(_Cursor).execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> _Cursor:
        return super().cursor(_Cursor).executemany(sql, parameters)

    def executescript(self, sql_script: str, /) -> sqlite3.Cursor:
        try:
            return super().executescript(sql_script)
        except sqlite3.Error as exc:
            self.file.raise_mapped(exc)


class SqliteFile:
    def __init__(self, path: Path, schema: str, *, verify: bool = False) -> None:
        """Open (or create) the file and apply ``schema``. With ``verify``, an existing file is checked first
        (``DatabaseDamagedError`` when damaged): the first opener of a file in a process verifies it."""
        self.path = path
        self._local = threading.local()
        self._damage: str | None = None  # what a statement found, for good
        self._reported: str | None = None  # the trouble last logged
        private_folder(path.parent)  # every key's prompts and uploads: 0700 (private_files.py)
        if verify:
            check_database_file(path)
        # Only this first connection may create the file: later ones open what is there, or fail.
        first = self._connect(create=True)
        private_database(path)  # 0600, and so are the -wal and -shm files SQLite makes after it
        self._local.db = first
        self._local.wait_s = BACKGROUND_LOCK_WAIT_S
        self._identity = _identity(path)
        first.executescript(schema)

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (made on first use), waiting for locks as long as its context allows."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            trouble = self.trouble()
            if trouble is not None:  # never open whatever now lies at the path (or create a file there)
                raise DatabaseUnavailableError(self.path, trouble)
            db = self._connect(create=False)
            self._local.db = db
            self._local.wait_s = BACKGROUND_LOCK_WAIT_S
        wait_s = _request_lock_wait_s.get()
        wait_s = BACKGROUND_LOCK_WAIT_S if wait_s is None else wait_s
        if wait_s != self._local.wait_s:
            db.execute(f"PRAGMA busy_timeout = {int(wait_s * 1000)}")
            self._local.wait_s = wait_s
        return db

    def _connect(self, *, create: bool) -> sqlite3.Connection:
        uri = f"{self.path.resolve().as_uri()}?mode={'rwc' if create else 'rw'}"
        try:
            db = sqlite3.connect(
                uri,
                uri=True,
                timeout=BACKGROUND_LOCK_WAIT_S,
                isolation_level=None,
                check_same_thread=False,
                factory=_Connection,
            )
        except sqlite3.Error as exc:
            self.raise_mapped(exc)
        db.file = self
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives any crash of a process; a durable transaction (below) also waits
        # for the disk, so what it writes survives a power cut too. Other writes stay cheap.
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    @contextmanager
    def transaction(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception, a failed ``COMMIT`` included):
        one writer at a time."""
        db = self.connection()
        if durable:
            db.execute("PRAGMA synchronous=FULL")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                self._roll_back(db)
                raise
        finally:
            if durable and getattr(self._local, "db", None) is db:
                db.execute("PRAGMA synchronous=NORMAL")

    def _roll_back(self, db: sqlite3.Connection) -> None:
        """End the failed transaction (SQLite may have ended it already, after a full disk or an I/O error).
        A connection that cannot even roll back is dropped: the next use opens a fresh one."""
        if not db.in_transaction:
            return
        try:
            db.execute("ROLLBACK")
        except (sqlite3.Error, DatabaseUnavailableError):
            log.warning("job database %s: a failed transaction could not be rolled back; reconnecting", self.path)
            self.close()

    def ensure_in_place(self) -> None:
        """``DatabaseUnavailableError`` when the file is deleted, replaced or damaged: what is written now
        would be lost (called before accepting new work)."""
        trouble = self.trouble()
        if trouble is not None:
            raise DatabaseUnavailableError(self.path, trouble)

    def trouble(self) -> str | None:
        """Why the file cannot be trusted now, in a few words ("deleted", "replaced by another file",
        "damaged ..."); None when it is fine. Logged as an error the first time it is found."""
        trouble = self._damage
        if trouble is None:
            try:
                identity = _identity(self.path)
            except FileNotFoundError:
                trouble = "deleted while the server runs"
            except OSError as exc:
                trouble = f"cannot be read ({exc.strerror})"
            else:
                if identity != self._identity:
                    trouble = "replaced by another file while the server runs"
        if trouble is not None and trouble != self._reported:
            self._reported = trouble
            log.error(
                "job database %s: %s. New jobs are refused (503) and /health says unavailable; what the server "
                "writes now may be lost. Restore the file or restart the server.",
                self.path,
                trouble,
            )
        return trouble

    def raise_mapped(self, exc: sqlite3.Error) -> NoReturn:
        """Raise ``DatabaseUnavailableError`` for an error that says the file cannot be used, else ``exc``."""
        primary = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        reason = _UNAVAILABLE.get(primary)
        if reason is None:
            raise exc
        if primary in _DAMAGE:
            self._damage = reason
        raise DatabaseUnavailableError(self.path, f"{reason}: {exc}") from exc

    def close(self) -> None:
        """Close this thread's connection."""
        db = getattr(self._local, "db", None)
        if db is not None:
            self._local.db = None
            try:
                db.close()
            except sqlite3.Error:
                log.warning("job database %s: a connection did not close cleanly", self.path, exc_info=True)


def _identity(path: Path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def check_database_file(path: Path) -> None:
    """Raise ``DatabaseDamagedError`` unless ``path`` is absent (a new database) or a whole SQLite database
    that passes ``PRAGMA quick_check``. Reads only: the file is never changed here."""
    if not path.exists():
        return
    try:
        with path.open("rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise DatabaseDamagedError(_damaged_text(path, f"it cannot be read ({exc.strerror})")) from exc
    if not header:
        raise DatabaseDamagedError(_damaged_text(path, "the file is empty (truncated?)"))
    if header != SQLITE_HEADER:
        raise DatabaseDamagedError(_damaged_text(path, "it does not start with a SQLite header"))
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, isolation_level=None)
        try:
            found = [str(row[0]) for row in db.execute("PRAGMA quick_check").fetchmany(5)]
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise DatabaseDamagedError(_damaged_text(path, f"SQLite says: {exc}")) from exc
    if found != ["ok"]:
        raise DatabaseDamagedError(_damaged_text(path, "PRAGMA quick_check found: " + "; ".join(found)[:500]))


def _damaged_text(path: Path, what: str) -> str:
    files = f"{path}, {path}-wal and {path}-shm"
    return (
        f"The job database {path} is damaged: {what}. Imagen does not start over it and leaves it as it is. "
        f"To keep what it still holds: `sqlite3 {path} .recover | sqlite3 {path}.recovered`, move {files} "
        f"aside, then move {path}.recovered to {path}. To start with an empty queue instead (its jobs are "
        f"forgotten): move {files} aside."
    )
