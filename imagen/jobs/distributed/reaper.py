"""Housekeeping that keeps every accepted job moving: the reaper and the reconciler.

- **Reaper**: a running job whose worker stopped renewing its lock (killed, host gone) goes back to the
  queue, or fails when the attempt policy says so; a requeued job's message is published again.
- **Reconciler**: messages are tickets (``task.py``: a delivered message starts the fair queue's next job,
  not necessarily the one it names), so it counts rather than matches: when, for the whole
  ``reconcile_after_s``, the broker holds fewer *available* messages than there are confirmed waiting
  jobs, it publishes the difference. That covers a publish lost after a job was put back (by the reaper,
  a retry), a message that a worker received but could not use (its claim failed on a broken Redis
  connection and Celery acknowledged the message anyway), or a message still held for a worker that died.
  The broker's messages are read where kombu's Redis transport keeps them: the queue's list (not yet
  delivered) and its ``unacked`` hash (delivered, not acknowledged; only recent deliveries count). A
  delivered message is available until it starts a job: the running jobs record the id of the message
  that started them (``ticket``), and those are not counted. A message can be in neither place for an
  instant (between the worker's BRPOP and its bookkeeping), so the shortage must last the whole
  ``reconcile_after_s`` (the smallest seen in that time is published). An extra message is harmless: it
  finds no job waiting and is dropped.

It runs in every API replica (next to the image transfer) and may run in workers' main processes too:
wherever it runs, one process at a time reconciles (a short Redis lock), so a job is republished once.
Both places are useful: the API replicas are up whenever jobs are submitted, and workers are up whenever
jobs can run, even with no API replica alive.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import cast

import redis

from imagen.config import Settings
from imagen.jobs.distributed.keys import HOUSEKEEPER
from imagen.jobs.distributed.store import RedisJobStore
from imagen.jobs.distributed.workers import hold_lease
from imagen.jobs.lifecycle import OwnerToken

log = logging.getLogger("imagen.jobs")

# kombu's Redis transport (Channel.unacked_key, unacked_index_key): delivered messages, and when.
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"


def message_ids(raw_messages: Iterable[bytes]) -> list[str]:
    """The task ids of raw kombu messages (a job's first message has the job's id, later ones an id of their
    own): queued ones are the message, unacknowledged ones ``[message, exchange, routing_key]``."""
    ids: list[str] = []
    for raw in raw_messages:
        try:
            message = json.loads(raw)
            if isinstance(message, list):
                message = message[0]
            headers = message.get("headers") or {}
            task_id = headers.get("id") or (message.get("properties") or {}).get("correlation_id")
        except (ValueError, AttributeError, IndexError, TypeError):
            continue  # not one of ours
        if isinstance(task_id, str):
            ids.append(task_id)
    return ids


def broker_messages(client: redis.Redis, queue: str, delivered_after: float) -> list[bytes]:
    """The raw Celery messages of ``queue`` (not delivered yet) and those of the unacknowledged table
    (delivered to a worker, not acknowledged yet) delivered after ``delivered_after``: kombu's Redis
    transport keeps them there. An older unacknowledged message is running a long job, or belongs to a
    worker that died: it only comes back after the visibility timeout."""
    with client.pipeline(transaction=True) as pipe:
        pipe.lrange(queue, 0, -1)
        pipe.zrangebyscore(UNACKED_INDEX_KEY, delivered_after, "+inf")
        queued, recent_tags = cast(list[list[bytes]], pipe.execute())
    unacked = cast(list[bytes | None], client.hmget(UNACKED_KEY, recent_tags)) if recent_tags else []
    return queued + [raw for raw in unacked if raw is not None]


class Housekeeper:
    """Runs the reaper and the reconciler every ``period`` seconds in a daemon thread."""

    def __init__(self, settings: Settings, store: RedisJobStore, publish: Callable[[str], None], queue: str) -> None:
        self.settings = settings
        self.store = store
        self.publish = publish
        self.queue = queue
        self.identity = str(OwnerToken.new())
        reap_every = max(0.2, min(5.0, settings.job_lock_ttl_s / 3))
        self.period = min(reap_every, max(0.2, settings.reconcile_after_s / 2))
        # Since when there have been fewer available messages than waiting jobs, and the least shortage since.
        self._short_since: float | None = None
        self._shortage = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._queue_indexed = False

    def start(self) -> None:
        try:
            self._index_queue()
        except redis.RedisError as exc:  # Redis not up yet: the first pass that reaches it indexes the queue
            log.debug("housekeeping: Redis unreachable: %s", exc)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="imagen-housekeeper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def _run(self) -> None:
        while not self._stopping.wait(self.period):
            try:
                self.run_once()
            except redis.RedisError as exc:
                log.debug("housekeeping: Redis unreachable: %s", exc)
            except Exception:  # never let the thread die: jobs would stop coming back
                log.exception("housekeeping: unexpected error")

    def run_once(self) -> None:
        self._index_queue()
        self.reap()
        self.reconcile()

    def _index_queue(self) -> None:
        """Once per process, before any job is reaped or republished: a Redis whose queue was filled by a
        version without the fair queue's index gets it (every API replica and worker runs a housekeeper, so
        whichever starts first builds it; the others find it built)."""
        if not self._queue_indexed:
            self.store.jobs.ensure_indexed()
            self._queue_indexed = True

    def reap(self) -> None:
        for job_id in self.store.attempts.reap_orphans(
            max_attempts=self.settings.max_attempts, timeout_s=self.settings.job_timeout_s
        ):
            log.warning("job %s: its worker died; back in the queue", job_id)
            self._publish(job_id)  # if this fails, the reconciler publishes it later

    def reconcile(self) -> None:
        self.store.jobs.sweep_unconfirmed()
        if not hold_lease(self.store.client, HOUSEKEEPER, self.identity, self.period * 3 + 1):
            self._short_since = None  # another process reconciles; start afresh if this one takes over
            return
        waiting = self.store.jobs.confirmed_waiting()
        shortage = len(waiting) - self._available_messages() if waiting else 0
        now = time.monotonic()
        if shortage <= 0:
            self._short_since = None
            return
        if self._short_since is None:
            self._short_since, self._shortage = now, shortage
            return
        self._shortage = min(self._shortage, shortage)
        if now - self._short_since < self.settings.reconcile_after_s:
            return
        log.warning("%d job(s) waiting with no message in the broker for them; publishing %d", len(waiting),
                    self._shortage)
        # The message names a waiting job only for the logs: whichever job it starts is the fair queue's.
        published = sum(self._publish(job_id) for job_id in waiting[: self._shortage])
        self._shortage -= published
        if self._shortage <= 0:
            self._short_since = None  # counted afresh from the next pass, with the new messages
        # else: a publish failed; the next pass publishes the rest

    def _available_messages(self) -> int:
        """Messages that will still start a job: queued, or delivered recently and not used by a running job."""
        recent = time.time() - self.settings.reconcile_after_s
        raw = broker_messages(self.store.client, self.queue, delivered_after=recent)
        used = self.store.jobs.running_tickets()
        return sum(1 for message_id in message_ids(raw) if message_id not in used)

    def _publish(self, job_id: str) -> bool:
        try:
            self.publish(job_id)
        except Exception as exc:
            log.warning("job %s: publish failed (%s); will retry", job_id, exc)
            return False
        return True
