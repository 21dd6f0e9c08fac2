"""Housekeeping that keeps every accepted job moving: the reaper and the reconciler.

- **Reaper**: a running job whose worker stopped renewing its lock (killed, host gone) goes back to the
  queue, or fails when the attempt policy says so; a requeued job's message is published again.
- **Reconciler**: a waiting job with no message in the broker for ``reconcile_after_s`` is published
  again. That covers a publish lost after the job was put back (by the reaper, a retry), a message
  that a worker received but could not start (its claim failed on a broken Redis connection and Celery
  acknowledged the message anyway), or a requeued job whose old message is still held for a worker that
  died. The broker's messages are read where kombu's Redis transport keeps them: the queue's list (not yet
  delivered) and its ``unacked`` hash (delivered, not acknowledged; only recent deliveries count). A
  message can be in neither for an instant (between the worker's BRPOP and its bookkeeping), so a job is
  republished only when it has been seen without a message for the whole ``reconcile_after_s``. A
  duplicate message is harmless: the claim drops a second delivery.

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

import redis

from imagen.config import Settings
from imagen.jobs.distributed.store import HOUSEKEEPER, RedisJobStore
from imagen.jobs.lifecycle import OwnerToken

log = logging.getLogger("imagen.jobs")

# kombu's Redis transport (Channel.unacked_key, unacked_index_key): delivered messages, and when.
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"


def message_job_ids(raw_messages: Iterable[bytes]) -> set[str]:
    """The task ids (our job ids) of raw kombu messages: queued ones are the message, unacknowledged ones
    ``[message, exchange, routing_key]``."""
    ids: set[str] = set()
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
            ids.add(task_id)
    return ids


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
        self._missing_since: dict[str, float] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
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
        self.reap()
        self.reconcile()

    def reap(self) -> None:
        for job_id in self.store.reap_orphans(
            max_attempts=self.settings.max_attempts, timeout_s=self.settings.job_timeout_s
        ):
            log.warning("job %s: its worker died; back in the queue", job_id)
            self._publish(job_id)  # if this fails, the reconciler publishes it later

    def reconcile(self) -> None:
        self.store.sweep_unconfirmed()
        if not self.store.try_lead(HOUSEKEEPER, self.identity, self.period * 3 + 1):
            self._missing_since.clear()  # another process reconciles; start afresh if this one takes over
            return
        waiting = self.store.confirmed_waiting()
        with_message: set[str] = set()
        if waiting:
            recent = time.time() - self.settings.reconcile_after_s
            messages = self.store.broker_messages(self.queue, UNACKED_KEY, UNACKED_INDEX_KEY, delivered_after=recent)
            with_message = message_job_ids(messages)
        now = time.monotonic()
        missing = {job_id: self._missing_since.get(job_id, now) for job_id in waiting if job_id not in with_message}
        for job_id, since in missing.items():
            if now - since >= self.settings.reconcile_after_s:
                log.warning("job %s: waiting with no message in the broker; published again", job_id)
                if self._publish(job_id):
                    missing[job_id] = now
        self._missing_since = missing

    def _publish(self, job_id: str) -> bool:
        try:
            self.publish(job_id)
        except Exception as exc:
            log.warning("job %s: publish failed (%s); will retry", job_id, exc)
            return False
        return True
