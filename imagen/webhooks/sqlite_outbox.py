"""The embedded backend's outbox: two tables in the job database (``jobs.sqlite3``).

A subscription is written just before its job, in the same WAL file: the job's submission is synced to disk
(``synchronous=FULL``), which syncs every earlier commit of the file too, so an acknowledged job never
loses its subscription. Concluding a subscription and queuing its delivery is one transaction.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import cast

from imagen.jobs.embedded.sqlite import SqliteFile
from imagen.webhooks.events import Delivery, EventName, Subscription
from imagen.webhooks.outbox import Outbox

SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_subscriptions (
    job_id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    events TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_sent INTEGER NOT NULL DEFAULT 0,
    progress_sent_at REAL NOT NULL DEFAULT 0,
    progress_seen TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body TEXT NOT NULL,
    retry INTEGER NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    claimed_until REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (next_at);
"""
DELIVERY_COLUMNS = "id, job_id, url, body, retry, created_at, attempts, next_at"


class SqliteOutbox(Outbox):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = SqliteFile(path, SCHEMA)

    def subscribe(self, sub: Subscription) -> None:
        self.file.connection().execute(
            "INSERT OR REPLACE INTO webhook_subscriptions (job_id, url, events, created_at) VALUES (?, ?, ?, ?)",
            (sub.job_id, sub.url, json.dumps(sorted(sub.events)), sub.created_at),
        )

    def unsubscribe(self, job_id: str) -> None:
        self.file.connection().execute("DELETE FROM webhook_subscriptions WHERE job_id = ?", (job_id,))

    def subscriptions(self) -> list[Subscription]:
        rows = self.file.connection().execute("SELECT * FROM webhook_subscriptions ORDER BY created_at").fetchall()
        return [
            Subscription(
                job_id=row["job_id"],
                url=row["url"],
                events=frozenset(cast(list[EventName], json.loads(row["events"]))),
                created_at=row["created_at"],
                started_sent=bool(row["started_sent"]),
                progress_sent_at=row["progress_sent_at"],
                progress_seen=row["progress_seen"],
            )
            for row in rows
        ]

    def update_subscription(self, sub: Subscription) -> None:
        self.file.connection().execute(
            "UPDATE webhook_subscriptions SET started_sent = ?, progress_sent_at = ?, progress_seen = ? "
            "WHERE job_id = ?",
            (int(sub.started_sent), sub.progress_sent_at, sub.progress_seen, sub.job_id),
        )

    @staticmethod
    def _insert(db: sqlite3.Connection, delivery: Delivery) -> None:
        db.execute(
            f"INSERT OR IGNORE INTO webhook_deliveries ({DELIVERY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                delivery.id, delivery.job_id, delivery.url, delivery.body, int(delivery.retry),
                delivery.created_at, delivery.attempts, delivery.next_at,
            ),
        )  # fmt: skip

    def enqueue(self, delivery: Delivery) -> None:
        self._insert(self.file.connection(), delivery)

    def conclude(self, job_id: str, delivery: Delivery | None) -> bool:
        with self.file.transaction() as db:
            ended = db.execute("DELETE FROM webhook_subscriptions WHERE job_id = ?", (job_id,)).rowcount == 1
            if ended and delivery is not None:
                self._insert(db, delivery)
        return ended

    def claim_due(self, now: float, limit: int, lease_s: float) -> list[Delivery]:
        if limit <= 0:
            return []
        with self.file.transaction() as db:
            rows = db.execute(
                f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE next_at <= ? AND claimed_until < ? "
                "ORDER BY next_at LIMIT ?",
                (now, now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE webhook_deliveries SET claimed_until = ? WHERE id = ?", [(now + lease_s, r["id"]) for r in rows]
            )
        return [
            Delivery(
                id=row["id"], job_id=row["job_id"], url=row["url"], body=row["body"], retry=bool(row["retry"]),
                created_at=row["created_at"], attempts=row["attempts"], next_at=row["next_at"],
            )
            for row in rows
        ]  # fmt: skip

    def reschedule(self, delivery_id: str, attempts: int, next_at: float) -> None:
        self.file.connection().execute(
            "UPDATE webhook_deliveries SET attempts = ?, next_at = ?, claimed_until = 0 WHERE id = ?",
            (attempts, next_at, delivery_id),
        )

    def remove(self, delivery_id: str) -> None:
        self.file.connection().execute("DELETE FROM webhook_deliveries WHERE id = ?", (delivery_id,))

    def pending(self) -> dict[str, int]:
        rows = self.file.connection().execute("SELECT id, attempts FROM webhook_deliveries").fetchall()
        return {row["id"]: row["attempts"] for row in rows}

    def close(self) -> None:
        self.file.close()
