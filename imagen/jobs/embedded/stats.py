"""The embedded job system's durable totals (``jobs/stats.py``): one table in the jobs' SQLite file.

Totals are added right after the write that made the event is committed, by the process that made it
(every writer of the embedded system runs in the API process). A process killed between the two loses
that one event's count: the job itself is safe either way.
"""

from __future__ import annotations

import logging
from pathlib import Path

from imagen.jobs.embedded.sqlite import SqliteFile
from imagen.jobs.stats import Increments

log = logging.getLogger("imagen.jobs")

SCHEMA = "CREATE TABLE IF NOT EXISTS job_stats (name TEXT PRIMARY KEY, value REAL NOT NULL);"


class SqliteStats:
    def __init__(self, path: Path) -> None:
        self.file = SqliteFile(path, SCHEMA)

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
