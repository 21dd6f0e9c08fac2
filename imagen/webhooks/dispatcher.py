"""The webhook dispatcher: a thread of the API process that turns job changes into deliveries and sends
them through a bounded pool, so a slow or dead receiver never delays generation, the API or other
jobs' webhooks (it holds one pool thread for at most one attempt's limit, ``IMAGEN_WEBHOOK_ATTEMPT_TIMEOUT_S``).

Each pass (every ``POLL_S``):

- **Watch** (one process per store: the ``Outbox.lead`` holder). For each subscription, read the job's
  ``/status`` JSON (the ``data`` of its events). Started or progressing: queue ``job.started`` once,
  ``job.progress`` on a new step or percentage at most once a second (one attempt each). Finished:
  ``Outbox.conclude`` ends the subscription and queues ``job.completed`` in one atomic step. A job's
  final state is therefore never missed: a subscription stays in the outbox until the watcher has seen
  the job finish, whatever restarts in between (as long as the record has not expired:
  ``IMAGEN_RESULT_TTL_S``).
- **Send**: claim the due deliveries (a lease: one attempt at a time per webhook-id, across replicas too;
  a claimed delivery leaves the due ones until its lease ends, so deliveries that keep failing never hide
  the others) and hand them to the pool. ``job.completed`` is retried with exponential backoff and jitter
  (or after the receiver's ``Retry-After``) after any failed attempt (5xx, 429, or no answer: whatever the
  error, an unreadable URL or a refused target included), until ``IMAGEN_WEBHOOK_RETRY_S`` after the event;
  then it is dropped with a warning. A 410 stops it and ends the job's subscription, any other answer ends it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from imagen.config import Settings
from imagen.jobs.lifecycle import OwnerToken
from imagen.jobs.types import JobState
from imagen.webhooks.events import PROGRESS_EVERY_S, Delivery, EventName, Subscription, new_delivery
from imagen.webhooks.outbox import Outbox
from imagen.webhooks.sender import Outcome, Result, Sender
from imagen.webhooks.signing import Signer
from imagen.webhooks.urls import TargetPolicy

log = logging.getLogger("imagen.webhooks")

POLL_S = 0.2
POOL_SIZE = 8
LEASE_ATTEMPTS = 3  # a claim lasts three attempt limits: it outlives any attempt; then another may take it
LEAD_TTL_S = 5.0
MAX_BACKOFF_S = 3600.0
# A subscription whose job is unknown this long after it was written: a submission that failed after it,
# or a job whose record expired while no API ran. Longer than the distributed backend's confirmation window.
UNKNOWN_JOB_GRACE_S = 60.0


def backoff_s(attempts: int, first_s: float) -> float:
    """Delay before attempt ``attempts + 1``: doubling from ``first_s`` up to an hour, with jitter."""
    return float(min(MAX_BACKOFF_S, first_s * 2 ** max(0, attempts - 1)) * random.uniform(0.5, 1.0))


class WebhookDispatcher:
    def __init__(
        self,
        outbox: Outbox,
        sender: Sender,
        *,
        read_status: Callable[[str], dict[str, Any] | None],
        retry_for_s: float,
        first_retry_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.outbox = outbox
        self.sender = sender
        self.read_status = read_status
        self.retry_for_s = retry_for_s
        self.first_retry_s = first_retry_s
        self.lease_s = LEASE_ATTEMPTS * sender.attempt_timeout_s
        self.clock = clock
        self.holder = str(OwnerToken.new())
        self._stopping = threading.Event()
        self._pool = ThreadPoolExecutor(POOL_SIZE, thread_name_prefix="imagen-webhook")
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        open_outbox: Callable[[Settings], Outbox],
        *,
        read_status: Callable[[str], dict[str, Any] | None],
    ) -> WebhookDispatcher | None:
        """``open_outbox``: the outbox in this server's job store (opened only when webhooks are on);
        ``read_status``: what ``GET /status/{job_id}`` answers now, None for an unknown job. None when the
        server has no webhook secret (webhooks are then refused at submission)."""
        if not settings.webhook_secret:
            return None
        sender = Sender(
            Signer(settings.webhook_secret),
            TargetPolicy.parse(settings.webhook_allowed_hosts),
            settings.webhook_attempt_timeout_s,
        )
        return cls(
            open_outbox(settings),
            sender,
            read_status=read_status,
            retry_for_s=settings.webhook_retry_s,
            first_retry_s=settings.webhook_first_retry_s,
        )

    # -- submission ------------------------------------------------------------------------------
    @contextmanager
    def subscribed(self, job_id: str, url: str, events: list[EventName]) -> Iterator[None]:
        """Write the subscription, then run the block that queues the job; withdraw it if that fails (a
        withdrawal that fails too is swept later: its job never appears)."""
        self.outbox.subscribe(Subscription(job_id=job_id, url=url, events=frozenset(events), created_at=self.clock()))
        try:
            yield
        except BaseException:
            try:
                self.outbox.unsubscribe(job_id)
            except Exception:
                log.warning("job %s: webhook subscription not withdrawn; it is dropped later", job_id)
            raise

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="imagen-webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Attempts in flight finish in the background (one attempt limit at most); one cut short by the end
        of the process is not lost: its claim expires and it is sent again."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=POLL_S + 5)
        self._pool.shutdown(wait=False)
        self.sender.close()
        self.outbox.close()

    def _run(self) -> None:
        while not self._stopping.wait(POLL_S):
            try:
                if self.outbox.lead(self.holder, LEAD_TTL_S):
                    self._watch()
                self._send_due()
            except Exception:
                log.exception("webhook dispatcher pass failed")

    # -- watching jobs ---------------------------------------------------------------------------
    def _watch(self) -> None:
        for sub in self.outbox.subscriptions():
            now = self.clock()
            status = self.read_status(sub.job_id)
            if status is None:
                if now - sub.created_at > UNKNOWN_JOB_GRACE_S:
                    log.warning("job %s: unknown or expired; its webhook subscription is dropped", sub.job_id)
                    self.outbox.unsubscribe(sub.job_id)
                continue
            state = JobState(status["status"])
            if state.is_terminal():
                final = new_delivery(sub, "completed", status, now) if "completed" in sub.events else None
                self.outbox.conclude(sub.job_id, final)
                continue
            if state is JobState.PENDING:
                continue
            if "start" in sub.events and not sub.started_sent:
                self.outbox.enqueue(new_delivery(sub, "start", status, now))
                self.outbox.update_subscription(replace(sub, started_sent=True))
                continue  # progress from the next pass on: job.started goes out first
            meta = status.get("meta") or {}
            progress = f"{meta.get('step')}:{meta.get('progress')}"
            if (
                "progress" in sub.events
                and state is JobState.PROGRESS
                and progress != sub.progress_seen
                and now - sub.progress_sent_at >= PROGRESS_EVERY_S
            ):
                self.outbox.enqueue(new_delivery(sub, "progress", status, now))
                self.outbox.update_subscription(replace(sub, progress_sent_at=now, progress_seen=progress))

    # -- sending ---------------------------------------------------------------------------------
    def _send_due(self) -> None:
        with self._lock:
            free = POOL_SIZE - len(self._in_flight)
        for delivery in self.outbox.claim_due(self.clock(), free, self.lease_s):
            with self._lock:
                if delivery.id in self._in_flight:
                    continue
                self._in_flight.add(delivery.id)
            self._pool.submit(self._attempt, delivery)

    def _attempt(self, delivery: Delivery) -> None:
        try:
            self._settle(delivery, self.sender.send(delivery))  # send never raises: any error is a failed attempt
        except Exception as exc:  # the outcome could not be written: the store is unreachable, or closed
            if self._stopping.is_set():
                log.info("webhook %s: outcome not recorded at shutdown (%s); it is sent again", delivery.id, exc)
            else:
                log.warning("webhook %s: outcome not recorded (%s: %s); it is tried again when its claim expires",
                            delivery.id, type(exc).__name__, exc)
        finally:
            with self._lock:
                self._in_flight.discard(delivery.id)

    def _settle(self, delivery: Delivery, outcome: Outcome) -> None:
        attempts = delivery.attempts + 1
        if outcome.result is Result.DELIVERED:
            log.info("webhook %s delivered (attempt %d)", delivery.id, attempts)
            self.outbox.remove(delivery.id)
            return
        if outcome.result is Result.RETRY and delivery.retry:
            now = self.clock()
            deadline = delivery.created_at + self.retry_for_s
            delay = outcome.retry_after_s
            if delay is None:
                delay = backoff_s(attempts, self.first_retry_s)
            if now < deadline:
                next_at = min(now + delay, deadline)
                log.info("webhook %s: %s; attempt %d in %.1f s", delivery.id, outcome.reason, attempts + 1,
                         next_at - now)
                self.outbox.reschedule(delivery.id, attempts, next_at)
                return
        log.warning("webhook %s to %s not delivered after %d attempt(s): %s",
                    delivery.id, delivery.url, attempts, outcome.reason)
        self.outbox.remove(delivery.id)
        if outcome.result is Result.GONE:
            self.outbox.unsubscribe(delivery.job_id)  # the receiver wants no more events for this job
