"""The embedded job system's durable totals (``jobs/stats.py``): one table in the jobs' SQLite file.

Totals are added right after the write that made the event is committed, by the process that made it
(every writer of the embedded system runs in the API process). A process killed between the two loses
that one event's count: the job itself is safe either way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from imagen.jobs import stats
from imagen.jobs.embedded.sqlite import SqliteFile
from imagen.jobs.lifecycle import Verdict
from imagen.jobs.stats import Increments
from imagen.jobs.types import JobRecord

log = logging.getLogger("imagen.jobs")

SCHEMA = "CREATE TABLE IF NOT EXISTS job_stats (name TEXT PRIMARY KEY, value REAL NOT NULL);"


class SqliteStats:
    def __init__(self, path: Path) -> None:
        self.file = SqliteFile(path, SCHEMA)

    def record(self, read: Callable[[str], JobRecord | None], job_id: str, verdict: Verdict | None = None) -> None:
        """After a committed write that ended an attempt (``verdict``) or the job: log the event and add to
        the totals (``stats.on_written``), reading the job with ``read``. Never raises: the write is done."""
        try:
            increments = stats.on_written(read(job_id), verdict)
        except Exception:
            log.exception("job %s: its end was not counted", job_id)
            return
        self.add(increments)

    def add(self, increments: Increments) -> None:
        """Add to the totals; never raises (a count is not worth failing the job's own write for)."""
        if not increments:
            return
        try:
            with self.file.transaction() as db:
                db.executemany(
                    "INSERT INTO job_stats (name, value) VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                    list(increments.items()),
                )
        except Exception:
            log.exception("job totals not recorded: %s", sorted(increments)[:3])

    def read(self) -> dict[str, float]:
        rows = self.file.connection().execute("SELECT name, value FROM job_stats").fetchall()
        return {row["name"]: float(row["value"]) for row in rows}

    def close(self) -> None:
        self.file.close()
