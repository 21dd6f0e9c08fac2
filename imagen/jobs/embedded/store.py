"""The durable job store of the embedded backend: one SQLite file in WAL mode.

Jobs are claimed inside ``BEGIN IMMEDIATE`` so two workers never take the same job; which waiting job is
next is the fair queue's decision (``jobs.fairness``: round-robin across API keys, oldest first within a
key), taken in that same transaction, which records the key's turn (table ``key_turns``). ``submit`` checks
``max_queue`` and then the per-key waiting limit in its own transaction, and records in ``output_owners``
which key's job names the output file (kept after the job record expires). A running job carries
its owner (a ``lifecycle.OwnerToken``) and a heartbeat. How an attempt ends without an image is not decided
here: the store reads the running job under an owner guard, asks the ``lifecycle.AttemptPolicy`` for a
``Verdict`` (back to the queue, or FAILURE with which text) and writes it in the same transaction. Jobs of
a dead owner (``lifecycle.owner_is_dead``) go the same way, so a job that got a job_id always ends in
SUCCESS or FAILURE (or REVOKED: ``cancel`` applies ``lifecycle.cancel_verdict`` the same way).

Uploads (``POST /uploads``) are kept as sent, with their size: the owner's quota (``types.UploadQuota``) is
checked in the transaction that stores one. The file runs with ``auto_vacuum = INCREMENTAL`` (an older file
is converted once at start), so the space of expired jobs, their input images and expired uploads goes back
to the file system when ``purge_expired`` deletes them; without it a SQLite file never shrinks.

The fair queue is indexed so that no call reads the whole queue (``jobs.fairness``): ``key_turns`` holds, for
each key, its last turn, how many of its jobs wait and its oldest waiting job's ``seq``, kept by triggers on
``jobs`` (so every write that moves a job in or out of the queue keeps them, whoever makes it), with
``queue_length`` the total. The next job is the first row of the partial index ``keys_in_fair_order``; a
position reads the keys with jobs waiting and counts the job's index within its key on ``jobs_waiting_by_key``
(from the nearer end of its key's queue). A database made before these indexes is indexed once at start.

Every write that changes a job calls ``on_change(job_id)`` once it is committed: the API process's live
streams (``jobs/changes.py``) hear of it there, whoever wrote it (a worker slot, the reaper, a route).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imagen.errors import KeyQueueFullError, QueueFullError
from imagen.jobs import fairness
from imagen.jobs.affinity import LOOKAHEAD, Affinity, Candidate, pick
from imagen.jobs.embedded.sqlite import SqliteFile
from imagen.jobs.embedded.stats import SqliteStats
from imagen.jobs.lifecycle import (
    CANCELLED_BY_CLIENT,
    AttemptPolicy,
    OwnerToken,
    Verdict,
    cancel_verdict,
    owner_is_dead,
)
from imagen.jobs.types import JobRecord, JobState, NewJob, Submitted, Upload, UploadQuota

log = logging.getLogger("imagen.jobs")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    task TEXT NOT NULL,
    output_name TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    heartbeat_at REAL,
    progress_step TEXT,
    progress INTEGER,
    result TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
CREATE INDEX IF NOT EXISTS jobs_by_finish ON jobs (finished_at);
-- The fair queue (jobs.fairness): the turn at which each API key was last served (0: never), how many of
-- its jobs wait and the seq of its oldest waiting job (NULL: none), the last two kept by QUEUE_INDEX's triggers.
CREATE TABLE IF NOT EXISTS key_turns (
    key_name TEXT PRIMARY KEY,
    turn INTEGER NOT NULL,
    waiting INTEGER NOT NULL DEFAULT 0,
    oldest_seq INTEGER
);
-- Which key's job named each output file: kept as long as the file may be (job records expire sooner).
CREATE TABLE IF NOT EXISTS output_owners (
    output_name TEXT PRIMARY KEY,
    key_name TEXT NOT NULL
);
-- A job's input images (img2img, inpainting, IP-Adapter reference), purged with the job.
CREATE TABLE IF NOT EXISTS job_inputs (
    job_id TEXT NOT NULL,
    role TEXT NOT NULL,
    png BLOB NOT NULL,
    PRIMARY KEY (job_id, role)
);
-- Images sent to POST /uploads, as sent (size: bytes of data), until they expire.
CREATE TABLE IF NOT EXISTS uploads (
    upload_id TEXT PRIMARY KEY,
    key_name TEXT NOT NULL,
    data BLOB NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    size INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS uploads_by_key ON uploads (key_name, expires_at);
"""
# Columns added since the first release, for databases created before them.
ADDED_COLUMNS = {
    "denoising": "TEXT",  # JSON, written with each progress report
    "key_name": "TEXT NOT NULL DEFAULT ''",  # the API key that submitted the job ("": no keys configured)
}
ADDED_KEY_COLUMNS = {"waiting": "INTEGER NOT NULL DEFAULT 0", "oldest_seq": "INTEGER"}

_PENDING = JobState.PENDING.value
# A job joins or leaves the queue: its key's count and oldest job, and the queue's length. The oldest job
# of a key is read again (one lookup on jobs_waiting_by_key) only when the one that leaves was it.
_JOINS = """
    INSERT OR IGNORE INTO key_turns (key_name, turn) VALUES (NEW.key_name, 0);
    UPDATE key_turns SET waiting = waiting + 1,
        oldest_seq = CASE WHEN waiting = 0 OR oldest_seq > NEW.seq THEN NEW.seq ELSE oldest_seq END
        WHERE key_name = NEW.key_name;
    UPDATE queue_length SET waiting = waiting + 1;
"""
_LEAVES = f"""
    UPDATE key_turns SET waiting = waiting - 1,
        oldest_seq = CASE WHEN oldest_seq = OLD.seq THEN
            (SELECT MIN(seq) FROM jobs WHERE key_name = OLD.key_name AND state = '{_PENDING}')
            ELSE oldest_seq END
        WHERE key_name = OLD.key_name;
    UPDATE queue_length SET waiting = waiting - 1;
"""
QUEUE_INDEX = f"""
CREATE INDEX IF NOT EXISTS jobs_waiting_by_key ON jobs (key_name, state, seq);
CREATE INDEX IF NOT EXISTS key_turns_by_turn ON key_turns (turn);
CREATE INDEX IF NOT EXISTS keys_in_fair_order ON key_turns (turn, oldest_seq) WHERE waiting > 0;
CREATE TABLE IF NOT EXISTS queue_length (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    waiting INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS queue_on_insert AFTER INSERT ON jobs WHEN NEW.state = '{_PENDING}'
BEGIN {_JOINS} END;
CREATE TRIGGER IF NOT EXISTS queue_on_requeue AFTER UPDATE OF state ON jobs
    WHEN NEW.state = '{_PENDING}' AND OLD.state <> '{_PENDING}'
BEGIN {_JOINS} END;
CREATE TRIGGER IF NOT EXISTS queue_on_start AFTER UPDATE OF state ON jobs
    WHEN OLD.state = '{_PENDING}' AND NEW.state <> '{_PENDING}'
BEGIN {_LEAVES} END;
CREATE TRIGGER IF NOT EXISTS queue_on_delete AFTER DELETE ON jobs WHEN OLD.state = '{_PENDING}'
BEGIN {_LEAVES} END;
"""
# Counting the jobs of a key that wait before one (its index) from the end nearer to it: a few index entries
# for a job near either end of its key's queue (the one just submitted, the next to start).
_COUNT_BEFORE = f"SELECT COUNT(*) FROM jobs WHERE key_name = ? AND state = '{_PENDING}' AND seq < ?"
_NEWEST = f"SELECT seq FROM jobs WHERE key_name = ? AND state = '{_PENDING}' ORDER BY seq DESC LIMIT 1"
_COUNT_AFTER = f"SELECT COUNT(*) FROM jobs WHERE key_name = ? AND state = '{_PENDING}' AND seq > ?"
# For a position: how many jobs of the other keys start before the job at index ? of a key ranking ?
# (jobs.fairness): each other key with jobs waiting starts that many of its jobs, one more when it ranks
# before the job's own key, never more than it has waiting. One pass over the keys with jobs waiting, inside
# SQLite (its rank is fairness.key_rank's formula: the last turn, or the oldest seq minus NEVER_SERVED_OFFSET).
_AHEAD_IN_OTHER_KEYS = (
    "SELECT COALESCE(SUM(MIN(waiting, ?1 + ((CASE WHEN turn > 0 THEN turn "
    f"ELSE oldest_seq - {int(fairness.NEVER_SERVED_OFFSET)} END) < ?2))), 0) "
    "FROM key_turns INDEXED BY keys_in_fair_order WHERE waiting > 0 AND key_name != ?3"
)
# A key's oldest waiting jobs with their model, for model affinity (``jobs.affinity``): LOOKAHEAD index entries.
_OLDEST_OF_KEY = (
    f"SELECT seq, job_id, json_extract(task, '$.model') AS model, created_at FROM jobs INDEXED BY jobs_waiting_by_key "
    f"WHERE key_name = ? AND state = '{_PENDING}' ORDER BY seq LIMIT ?"
)

# Pages the reaper's pass gives back to the file system at most (``incremental_vacuum``): a pass holds the
# write lock while it moves pages, so a large backlog is returned over several passes (64 MiB each at 4 KiB).
VACUUM_PAGES_PER_PASS = 16384

RUNNING = (JobState.STARTED.value, JobState.PROGRESS.value)
COLUMNS = (
    "job_id, state, task, output_name, attempts, progress_step, progress, denoising, result, error, "
    "created_at, started_at, finished_at, key_name"
)
# Every write of a running job names the owner that claimed it: a late owner (one whose job was taken
# back and claimed again) changes nothing.
OWNED = "job_id = ? AND owner = ? AND state IN (?, ?)"


class SqliteJobStore:
    def __init__(
        self,
        path: Path,
        *,
        policy: AttemptPolicy,
        result_ttl_s: float,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[str], None] = lambda job_id: None,
    ) -> None:
        self.path = path
        self.on_change = on_change
        self.policy = policy
        self.result_ttl_s = result_ttl_s
        self.clock = clock
        self.file = SqliteFile(path, SCHEMA, verify=True)  # a damaged file stops the start (sqlite.py)
        db = self.file.connection()
        present = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
        for column, kind in ADDED_COLUMNS.items():
            if column not in present:
                db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
        _index_queue(self.file)
        _upgrade_uploads(db)
        _use_incremental_vacuum(db, path)
        self.stats = SqliteStats(path)  # outcome totals (jobs/stats.py), added after each ending write

    # -- API side ------------------------------------------------------------------------------
    def submit(self, job: NewJob, max_queue: int, key_max_waiting: int | None = None) -> Submitted:
        """Queue the job (and record who owns its output), all in one durable transaction. ``QueueFullError``
        when ``max_queue`` jobs wait (checked first), ``KeyQueueFullError`` when ``key_max_waiting`` jobs of
        the job's key do. The position is its place in the fair order. ``DatabaseUnavailableError`` when the
        file was deleted, replaced or damaged under the server: the job would be lost."""
        self.file.ensure_in_place()
        with self.file.transaction(durable=True) as db:
            # Same connection: everything below is read inside this transaction.
            ahead = self.count_waiting()
            if ahead >= max_queue:
                raise QueueFullError(f"{ahead} jobs waiting (max {max_queue})")
            if key_max_waiting is not None:
                row = db.execute("SELECT waiting FROM key_turns WHERE key_name = ?", (job.key_name,)).fetchone()
                mine = 0 if row is None else int(row[0])
                if fairness.key_is_full(mine, key_max_waiting):
                    raise KeyQueueFullError(mine, key_max_waiting)
            db.execute(
                "INSERT INTO jobs (job_id, state, task, output_name, created_at, key_name) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    job.job_id, JobState.PENDING.value, json.dumps(job.task), job.output_name, self.clock(),
                    job.key_name,
                ),
            )
            db.executemany(
                "INSERT OR REPLACE INTO output_owners (output_name, key_name) VALUES (?, ?)",
                [(name, job.key_name) for name in job.all_output_names()],
            )
            db.executemany(
                "INSERT INTO job_inputs (job_id, role, png) VALUES (?, ?, ?)",
                [(job.job_id, role, png) for role, png in job.inputs.items()],
            )
            position = self.position(job.job_id)
        assert position is not None
        return Submitted(job_id=job.job_id, position=position)

    def output_owner(self, output_name: str) -> str | None:
        """The key whose job named this output file; None when no job did."""
        row = (
            self.file.connection()
            .execute("SELECT key_name FROM output_owners WHERE output_name = ?", (output_name,))
            .fetchone()
        )
        return None if row is None else str(row["key_name"])

    def get(self, job_id: str) -> JobRecord | None:
        row = self.file.connection().execute(f"SELECT {COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        record = _record(row)
        if record.finished_at is not None and self.clock() - record.finished_at > self.result_ttl_s:
            return None
        return record

    def cancel(self, job_id: str) -> JobState | None:
        """Apply ``lifecycle.cancel_verdict`` in one transaction: the job's state afterwards, or None when
        unknown. A running job loses its owner, so its worker's next write is refused and it stops."""
        with self.file.transaction() as db:
            record = self.get(job_id)  # same connection: read inside this transaction
            if record is None:
                return None
            verdict = cancel_verdict(record.state)
            if verdict.write:
                db.execute(
                    "UPDATE jobs SET state = ?, error = ?, finished_at = ?, owner = NULL, progress_step = NULL, "
                    "progress = NULL WHERE job_id = ?",
                    (verdict.state.value, CANCELLED_BY_CLIENT, self.clock(), job_id),
                )
        if verdict.write:
            self.on_change(job_id)
            self.stats.record(self.get, job_id)
        return verdict.state

    def count_waiting(self) -> int:
        row = self.file.connection().execute("SELECT waiting FROM queue_length").fetchone()
        return 0 if row is None else int(row[0])

    def count_running(self) -> int:
        row = self.file.connection().execute("SELECT COUNT(*) FROM jobs WHERE state IN (?, ?)", RUNNING)
        return int(row.fetchone()[0])

    def position(self, job_id: str) -> int | None:
        """The job's place in the fair order (1 = next to start); None if it is not waiting."""
        db = self.file.connection()
        while True:
            job = db.execute("SELECT seq, key_name, state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if job is None or job["state"] != _PENDING:
                return None
            seq, key_name = int(job["seq"]), str(job["key_name"])
            own = db.execute(
                f"SELECT turn, waiting, oldest_seq, ({_NEWEST}) AS newest FROM key_turns WHERE key_name = ?",
                (key_name, key_name),
            ).fetchone()
            if own is None or not own["waiting"] or own["oldest_seq"] is None or own["newest"] is None:
                continue  # read outside a transaction: another process started the job meanwhile; read again
            oldest, newest = int(own["oldest_seq"]), int(own["newest"])
            if seq - oldest <= newest - seq:
                index = int(db.execute(_COUNT_BEFORE, (key_name, seq)).fetchone()[0])
            else:
                index = int(own["waiting"]) - 1 - int(db.execute(_COUNT_AFTER, (key_name, seq)).fetchone()[0])
            index = max(0, index)
            rank = fairness.key_rank(int(own["turn"]), oldest)
            ahead = db.execute(_AHEAD_IN_OTHER_KEYS, (index, rank, key_name)).fetchone()[0]
            return index + int(ahead) + 1

    # -- worker side -----------------------------------------------------------------------------
    def claim_next(self, owner: OwnerToken, affinity: Affinity | None = None) -> JobRecord | None:
        """The next waiting job for ``owner``, now STARTED by it (its attempt counted, its key's turn recorded):
        the fair queue's next key (``jobs.fairness``), and within it the job ``jobs.affinity`` picks for the
        models the worker holds (``affinity``; None: the key's oldest job). None if none waits, or if the
        worker leaves the waiting ones to an idle worker that holds their model."""
        now = self.clock()
        with self.file.transaction() as db:
            # The lowest (turn, oldest) among the keys with jobs waiting: key_rank's order, on its index.
            chosen = db.execute(
                "SELECT key_name, oldest_seq FROM key_turns INDEXED BY keys_in_fair_order WHERE waiting > 0 "
                "ORDER BY turn, oldest_seq LIMIT 1"
            ).fetchone()
            if chosen is None:
                return None
            seq = chosen["oldest_seq"]
            if affinity is not None:
                rows = db.execute(_OLDEST_OF_KEY, (chosen["key_name"], LOOKAHEAD)).fetchall()
                seqs = {str(row["job_id"]): int(row["seq"]) for row in rows}
                candidates = [
                    Candidate(str(row["job_id"]), str(row["model"] or ""), float(row["created_at"])) for row in rows
                ]
                picked = pick(candidates, affinity, now)
                if picked is None:
                    return None
                seq = seqs[picked.job_id]
            db.execute(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, owner = ?, heartbeat_at = ?, "
                "started_at = ?, progress_step = NULL, progress = NULL WHERE seq = ?",
                (JobState.STARTED.value, str(owner), now, now, seq),
            )
            db.execute(
                "UPDATE key_turns SET turn = (SELECT MAX(turn) FROM key_turns) + 1 WHERE key_name = ?",
                (chosen["key_name"],),
            )
            claimed = db.execute(f"SELECT {COLUMNS} FROM jobs WHERE seq = ?", (seq,)).fetchone()
        record = _record(claimed)
        self.on_change(record.job_id)
        return record

    def report_progress(
        self, job_id: str, owner: OwnerToken, step: str, progress: int, denoising: dict[str, Any] | None = None
    ) -> bool:
        """``denoising`` is only read while ``progress_step`` is set: the writes that clear that leave it."""
        cursor = self.file.connection().execute(
            "UPDATE jobs SET state = ?, progress_step = ?, progress = ?, denoising = ?, heartbeat_at = ? "
            f"WHERE {OWNED}",
            (
                JobState.PROGRESS.value, step, progress, json.dumps(denoising) if denoising else None, self.clock(),
                job_id, str(owner), *RUNNING,
            ),
        )
        return self._changed(job_id, cursor.rowcount)

    def heartbeat(self, job_id: str, owner: OwnerToken) -> bool:
        cursor = self.file.connection().execute(
            f"UPDATE jobs SET heartbeat_at = ? WHERE {OWNED}", (self.clock(), job_id, str(owner), *RUNNING)
        )
        return cursor.rowcount == 1

    def complete(self, job_id: str, owner: OwnerToken, result: dict[str, Any]) -> bool:
        cursor = self.file.connection().execute(
            "UPDATE jobs SET state = ?, result = ?, error = NULL, finished_at = ?, owner = NULL, "
            f"progress_step = NULL, progress = NULL WHERE {OWNED}",
            (JobState.SUCCESS.value, json.dumps(result), self.clock(), job_id, str(owner), *RUNNING),
        )
        if not self._changed(job_id, cursor.rowcount):
            return False
        self.stats.record(self.get, job_id)
        return True

    def fail_attempt(self, job_id: str, owner: OwnerToken, error: str, *, retryable: bool) -> Verdict | None:
        """The attempt ended with ``error``: the policy's verdict (retry or FAILURE), or None if the job is
        no longer this owner's."""
        return self._end_attempt(
            job_id,
            owner,
            lambda row: self.policy.after_failure(attempts=row["attempts"], error=error, retryable=retryable),
        )

    def time_out(self, job_id: str, owner: OwnerToken) -> Verdict | None:
        """The attempt ran past the timeout (its process was killed)."""
        return self._end_attempt(job_id, owner, lambda row: self.policy.after_timeout())

    def release(self, job_id: str, owner: OwnerToken) -> bool:
        """Give a running job back to the queue without counting the attempt (clean shutdown)."""
        cursor = self.file.connection().execute(
            "UPDATE jobs SET state = ?, owner = NULL, attempts = MAX(attempts - 1, 0), progress_step = NULL, "
            f"progress = NULL WHERE {OWNED}",
            (JobState.PENDING.value, job_id, str(owner), *RUNNING),
        )
        return self._changed(job_id, cursor.rowcount)

    def recover_orphans(self, me: OwnerToken, *, silent_after_s: float) -> dict[str, Verdict]:
        """Running jobs whose owner is dead (``lifecycle.owner_is_dead``, as seen by ``me``) get the policy's
        verdict for a lost owner: back to the queue, or FAILURE (attempts used up, or past the timeout)."""
        now = self.clock()
        verdicts = {}
        with self.file.transaction() as db:
            rows = db.execute(
                "SELECT job_id, owner, heartbeat_at, attempts, started_at FROM jobs WHERE state IN (?, ?)",
                RUNNING,
            ).fetchall()
            for row in rows:
                if owner_is_dead(
                    row["owner"] or "", me=me, heartbeat_at=row["heartbeat_at"], now=now, silent_after_s=silent_after_s
                ):
                    verdict = self.policy.after_owner_lost(
                        attempts=row["attempts"], started_at=row["started_at"], now=now
                    )
                    self._apply(db, row["job_id"], verdict, now)
                    verdicts[row["job_id"]] = verdict
        for job_id, verdict in verdicts.items():
            self.on_change(job_id)
            self.stats.record(self.get, job_id, verdict)
        return verdicts

    def _end_attempt(self, job_id: str, owner: OwnerToken, decide: Callable[[sqlite3.Row], Verdict]) -> Verdict | None:
        with self.file.transaction() as db:
            row = db.execute(f"SELECT attempts FROM jobs WHERE {OWNED}", (job_id, str(owner), *RUNNING)).fetchone()
            if row is None:
                return None
            verdict = decide(row)
            self._apply(db, job_id, verdict, self.clock())
        self.on_change(job_id)
        self.stats.record(self.get, job_id, verdict)
        return verdict

    def _changed(self, job_id: str, rowcount: int) -> bool:
        """After a one-row write: whether it applied (and then, say so)."""
        if rowcount != 1:
            return False
        self.on_change(job_id)
        return True

    @staticmethod
    def _apply(db: sqlite3.Connection, job_id: str, verdict: Verdict, now: float) -> None:
        """Write a verdict on a running job (inside the transaction that read it)."""
        db.execute(
            "UPDATE jobs SET state = ?, error = ?, finished_at = ?, owner = NULL, progress_step = NULL, "
            "progress = NULL WHERE job_id = ?",
            (verdict.state.value, verdict.error, None if verdict.requeue else now, job_id),
        )

    def job_inputs(self, job_id: str) -> dict[str, bytes]:
        """The job's input images by role (PNG bytes); empty when it has none."""
        rows = self.file.connection().execute("SELECT role, png FROM job_inputs WHERE job_id = ?", (job_id,))
        return {str(row["role"]): bytes(row["png"]) for row in rows}

    def save_upload(self, upload: Upload, quota: UploadQuota | None = None) -> None:
        """Keep the upload; with a ``quota``, first check (in the same transaction) that it fits beside its
        owner's live uploads, else ``UploadQuotaError`` and nothing is stored."""
        now = self.clock()
        self.file.ensure_in_place()
        with self.file.transaction(durable=True) as db:
            if quota is not None:
                count, total, oldest = db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(expires_at) FROM uploads "
                    "WHERE key_name = ? AND expires_at > ?",
                    (upload.key_name, now),
                ).fetchone()
                quota.check(int(count), int(total), len(upload.data), None if oldest is None else oldest - now)
            db.execute(
                "INSERT INTO uploads (upload_id, key_name, data, width, height, expires_at, size) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (upload.upload_id, upload.key_name, upload.data, upload.width, upload.height, upload.expires_at,
                 len(upload.data)),
            )  # fmt: skip

    def load_upload(self, upload_id: str) -> Upload | None:
        """The upload, or None when unknown or expired."""
        row = (
            self.file.connection()
            .execute(
                "SELECT upload_id, key_name, data, width, height, expires_at FROM uploads "
                "WHERE upload_id = ? AND expires_at > ?",
                (upload_id, self.clock()),
            )
            .fetchone()
        )
        if row is None:
            return None
        return Upload(
            upload_id=row["upload_id"], key_name=row["key_name"], data=bytes(row["data"]), width=row["width"],
            height=row["height"], expires_at=row["expires_at"],
        )  # fmt: skip

    def purge_expired(self) -> int:
        """Delete expired job records (with their input images) and uploads, then give the pages they held
        back to the file system: the file shrinks (``auto_vacuum = INCREMENTAL``, and a checkpoint that
        truncates the write-ahead log). The number of job records deleted."""
        now = self.clock()
        cutoff = now - self.result_ttl_s
        with self.file.transaction() as db:
            db.execute(
                "DELETE FROM job_inputs WHERE job_id IN (SELECT job_id FROM jobs WHERE finished_at < ?)", (cutoff,)
            )
            cursor = db.execute("DELETE FROM jobs WHERE finished_at < ?", (cutoff,))
            db.execute("DELETE FROM uploads WHERE expires_at <= ?", (now,))
        self.reclaim_space()
        return cursor.rowcount

    def reclaim_space(self) -> int:
        """Return up to ``VACUUM_PAGES_PER_PASS`` free pages to the file system; the number returned."""
        db = self.file.connection()
        free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
        if free == 0:
            return 0
        # executescript steps the pragma to its end (``execute`` would free a single page).
        db.executescript(f"PRAGMA incremental_vacuum({VACUUM_PAGES_PER_PASS});")
        # The pages leave the main file when the log is copied back into it; TRUNCATE also empties the log,
        # which had grown by the pages just moved.
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return free - int(db.execute("PRAGMA freelist_count").fetchone()[0])

    def close(self) -> None:
        self.stats.close()
        self.file.close()


def _record(row: sqlite3.Row) -> JobRecord:
    state = JobState(row["state"])
    return JobRecord(
        job_id=row["job_id"],
        state=state,
        task=json.loads(row["task"]),
        output_name=row["output_name"],
        attempts=row["attempts"],
        progress_step=row["progress_step"],
        progress=row["progress"],
        denoising=json.loads(row["denoising"]) if row["denoising"] else None,
        result=json.loads(row["result"]) if row["result"] else None,
        # A PENDING job may carry the error of its previous attempt; only a FAILURE (or REVOKED) shows it.
        error=row["error"] if state.shows_error() else None,
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        key_name=row["key_name"],
    )


def _index_queue(file: SqliteFile) -> None:
    """The fair queue's indexes and the triggers that keep them (``QUEUE_INDEX``). A database that had no
    ``queue_length`` yet (made before them) has its waiting jobs counted into them once, in the same
    transaction, so its queue keeps its order."""
    with file.transaction() as db:
        present = {row["name"] for row in db.execute("PRAGMA table_info(key_turns)")}
        for column, kind in ADDED_KEY_COLUMNS.items():
            if column not in present:
                db.execute(f"ALTER TABLE key_turns ADD COLUMN {column} {kind}")
        found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'queue_length'").fetchone()
        new = found is None
        for statement in _statements(QUEUE_INDEX):
            db.execute(statement)
        if new:
            db.execute(
                f"INSERT OR IGNORE INTO key_turns (key_name, turn) "
                f"SELECT DISTINCT key_name, 0 FROM jobs WHERE state = '{_PENDING}'"
            )
            db.execute(
                f"UPDATE key_turns SET "
                f"waiting = (SELECT COUNT(*) FROM jobs WHERE jobs.key_name = key_turns.key_name "
                f"AND state = '{_PENDING}'), "
                f"oldest_seq = (SELECT MIN(seq) FROM jobs WHERE jobs.key_name = key_turns.key_name "
                f"AND state = '{_PENDING}')"
            )
            db.execute(
                f"INSERT OR REPLACE INTO queue_length (id, waiting) "
                f"SELECT 0, COUNT(*) FROM jobs WHERE state = '{_PENDING}'"
            )


def _statements(script: str) -> list[str]:
    """A script's statements, one by one (``executescript`` would end the transaction around them)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return [statement for statement in statements if statement]


def _upgrade_uploads(db: sqlite3.Connection) -> None:
    """A database made before uploads were kept as sent: its ``png`` column holds PNG bytes, which are an
    image as valid as any other, so they are kept under the new name and counted."""
    present = {row["name"] for row in db.execute("PRAGMA table_info(uploads)")}
    if "png" in present:
        db.execute("ALTER TABLE uploads RENAME COLUMN png TO data")
    if "size" not in present:
        db.execute("ALTER TABLE uploads ADD COLUMN size INTEGER NOT NULL DEFAULT 0")
        db.execute("UPDATE uploads SET size = LENGTH(data)")


def _use_incremental_vacuum(db: sqlite3.Connection, path: Path) -> None:
    """Make deleted rows give their space back (``purge_expired``). SQLite takes the mode only in a new
    database or through one ``VACUUM``, which rewrites the file (once, on the first start after an upgrade:
    it needs free disk space as large as the file, and time in proportion to it)."""
    if int(db.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2:  # INCREMENTAL
        return
    size = path.stat().st_size if path.exists() else 0
    if size > 16 * 1024 * 1024:
        log.warning("%s: rewriting the database once (%d MB) so that expired data gives its space back", path,
                    size // (1024 * 1024))  # fmt: skip
    db.execute("PRAGMA auto_vacuum = INCREMENTAL")
    db.execute("VACUUM")
