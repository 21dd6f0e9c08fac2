"""The distributed job backend, API side: job records in Redis, work sent to Celery workers anywhere.

``submit`` is one step from the user's view: the record goes in *unconfirmed* (with a short expiry, the
``max_queue`` and per-key checks included, one Lua script), the Celery message is published, then the record is
confirmed. A 503 therefore leaves nothing behind: whatever failed or stalled half-way, the unconfirmed
record is withdrawn or expires within ``IMAGEN_BROKER_TIMEOUT_S``. Every Redis call of a request times out
after that too, without retrying a timeout, so a stalled Redis gives a 503 within a few seconds.

Live streams (``GET /events``) hear of job changes through one Redis pub/sub listener (``changes.py``).
Two background threads: the image transfer (``image_transfer``) copies the PNGs that workers put in Redis
into this replica's outputs folder, and the housekeeper (``reaper``) requeues the jobs of dead workers and
publishes the messages that waiting jobs lack (a message is a ticket for the fair queue's next job).
No model code and no torch is imported here.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import redis

from imagen.config import Settings
from imagen.errors import BrokerUnavailableError, ImageBacklogFullError
from imagen.jobs import stats
from imagen.jobs.backend import JobBackend
from imagen.jobs.changes import ChangeFeed, Watcher
from imagen.jobs.distributed.app import QUEUE, create_celery, publish, republish
from imagen.jobs.distributed.changes import RedisChangeListener
from imagen.jobs.distributed.image_transfer import STREAM_BLOCK_MS, ImageTransfer
from imagen.jobs.distributed.model_orders import ModelOrders
from imagen.jobs.distributed.reaper import Housekeeper
from imagen.jobs.distributed.store import RedisJobStore, connect
from imagen.jobs.model_control import ModelOrder
from imagen.jobs.types import (
    BackendHealth,
    JobMetrics,
    JobRecord,
    JobState,
    NewJob,
    Submitted,
    Upload,
    UploadQuota,
    WorkerHealth,
    no_worker_ready,
)

log = logging.getLogger("imagen.jobs")

HEALTH_TIMEOUT_S = 0.5


class CeleryBackend(JobBackend):
    def __init__(self, settings: Settings) -> None:
        if not settings.broker_url:
            raise ValueError("CeleryBackend needs settings.broker_url")
        self.settings = settings
        url = settings.broker_url
        # No longer than the confirmation window: a confirmation the API gave up on arrives too late to keep the job.
        timeout_s = settings.broker_timeout_s
        # One retry on a broken connection (a pooled one after a Redis restart), none on a timeout.
        api_client = connect(url, connect_timeout=timeout_s, socket_timeout=timeout_s, retry_on_timeout=False)
        self.store = RedisJobStore.from_settings(settings, api_client)
        self.model_orders = ModelOrders(api_client)
        # Its own connections: a PING never queues behind other traffic, and never waits long.
        self._health_client = connect(url, connect_timeout=HEALTH_TIMEOUT_S, socket_timeout=HEALTH_TIMEOUT_S, retries=0)
        self._health_store = RedisJobStore.from_settings(settings, self._health_client)
        # The background threads block on Redis for a while: connections of their own.
        transfer_client = connect(url, socket_timeout=STREAM_BLOCK_MS / 1000 + 5)
        self._transfer_store = RedisJobStore.from_settings(settings, transfer_client)
        self._housekeeping_store = RedisJobStore.from_settings(settings, connect(url))
        self.celery = create_celery(settings)
        # Publishing from a request waits no longer than the other Redis calls of a request.
        self.celery.conf.broker_transport_options = {
            **self.celery.conf.broker_transport_options,
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
        }
        self.images = ImageTransfer(self.store.pngs, settings.outputs_dir)
        self.housekeeper = Housekeeper(
            settings, self._housekeeping_store, lambda job_id: republish(self.celery, job_id), QUEUE
        )
        self._stopping = threading.Event()
        self._transfer: threading.Thread | None = None
        self.feed = ChangeFeed()
        self._changes = RedisChangeListener(url, self.feed)  # started by the first stream

    # -- JobBackend ------------------------------------------------------------------------------
    def start(self) -> None:
        self.settings.outputs_dir.mkdir(parents=True, exist_ok=True)
        self._stopping.clear()
        self._transfer = threading.Thread(
            target=self.images.run, args=(self._transfer_store.pngs, self._stopping), name="imagen-images", daemon=True
        )
        self._transfer.start()
        self.housekeeper.start()
        # In the background: a start with Redis down is not delayed by the connection attempts.
        threading.Thread(target=self._warm_up_submissions, name="imagen-warm-up", daemon=True).start()

    def _warm_up_submissions(self) -> None:
        """Do once at start what a process's first submission would: Celery's and kombu's lazy imports, the
        publishing connection and the queue's declaration, a connection of the request pool. Idle, that costs
        tens of milliseconds; on a loaded machine, past the confirmation window, so the first job after a
        start was refused with a 503. Redis down now is no error here: submissions say so when they come."""
        try:
            _ = self.celery.backend
            with self.celery.producer_or_acquire() as producer:
                producer.maybe_declare(self.celery.amqp.queues[QUEUE])
            self.store.client.ping()
        except Exception as exc:
            log.info("submissions not warmed up (Redis unreachable?): %s", exc)

    async def stop_listening(self) -> None:
        await self._changes.stop_and_wait()

    def stop(self) -> None:
        self._stopping.set()
        self._changes.stop()
        self.housekeeper.stop()
        if self._transfer is not None:
            self._transfer.join(timeout=STREAM_BLOCK_MS / 1000 + 6)
        self.celery.close()
        for store in (self.store, self._transfer_store, self._housekeeping_store, self._health_store):
            store.close()

    def submit(self, job: NewJob, key_max_waiting: int | None = None) -> Submitted:
        try:
            if self.store.pngs.backlog_full():  # its image could not be kept for the replicas: refuse it now
                raise ImageBacklogFullError(self._backlog_text(self.store.pngs.backlog_bytes()))
            submitted = self.store.jobs.submit(job, self.settings.max_queue, key_max_waiting)
        except redis.RedisError as exc:
            # If the call reached Redis after all, its unconfirmed record expires on its own.
            raise BrokerUnavailableError(f"Redis unreachable: {exc}") from exc
        try:
            publish(self.celery, job.job_id)
            confirmed = self.store.jobs.confirm(job.job_id)
        except Exception as exc:
            self._withdraw(job.job_id)
            raise BrokerUnavailableError(f"could not publish the job: {exc}") from exc
        if not confirmed:
            raise BrokerUnavailableError("the job expired before its message was published")
        self.store.totals.add(stats.on_submitted(job, submitted.position))
        return submitted

    def _withdraw(self, job_id: str) -> None:
        try:
            self.store.jobs.forget(job_id)
        except redis.RedisError:
            log.info("job %s: not withdrawn (Redis unreachable); it expires unconfirmed", job_id)

    def get(self, job_id: str) -> JobRecord | None:
        try:
            record = self.store.jobs.get(job_id)
        except redis.RedisError as exc:
            raise BrokerUnavailableError(f"Redis unreachable: {exc}") from exc
        if record is None or record.state is not JobState.SUCCESS or record.result is None:
            return record
        self.ensure_output(record.output_name)
        path = os.path.join(str(self.settings.outputs_dir), record.output_name)
        return replace(record, result={**record.result, "path": path})

    def cancel(self, job_id: str) -> JobState | None:
        # In Redis, not in this process: it survives an API restart and reaches the worker on any host.
        try:
            return self.store.jobs.cancel(job_id)
        except redis.RedisError as exc:
            raise BrokerUnavailableError(f"Redis unreachable: {exc}") from exc

    @asynccontextmanager
    async def changes(self, job_id: str, previews: bool = False) -> AsyncIterator[Watcher]:
        with self.feed.watch(job_id, previews) as watcher:
            await self._changes.ensure_listening()
            yield watcher

    def output_owner(self, filename: str) -> str | None:
        try:
            return self.store.jobs.output_owner(filename)
        except redis.RedisError as exc:
            raise BrokerUnavailableError(f"Redis unreachable: {exc}") from exc

    def save_upload(self, upload: Upload, quota: UploadQuota | None = None) -> None:
        try:
            self.store.uploads.save(upload, quota)
        except redis.RedisError as exc:
            raise BrokerUnavailableError(f"Redis unreachable: {exc}") from exc

    def load_upload(self, upload_id: str) -> Upload | None:
        try:
            return self.store.uploads.load(upload_id)
        except redis.RedisError as exc:
            raise BrokerUnavailableError(f"Redis unreachable: {exc}") from exc

    def health(self) -> BackendHealth:
        """Unavailable while Redis cannot be reached (submissions answer 503); degraded while no live worker
        is ready (jobs queue, and wait for one)."""
        try:
            self._health_client.ping()
            beats = self._health_store.workers.alive()
            backlog = self._health_store.pngs.backlog_bytes()
        except redis.RedisError as exc:
            return BackendHealth(
                queue_broker="disconnected",
                gpu_available=False,
                workers=(),
                unavailable=(f"job broker (Redis) unreachable: {type(exc).__name__}",),
            )
        listed = tuple(sorted(map(WorkerHealth.from_heartbeat, beats), key=lambda w: (w.host, w.pid)))
        return BackendHealth(
            queue_broker="connected",
            gpu_available=any(w.ready and w.gpu_available for w in listed),
            workers=listed,
            unavailable=(self._backlog_text(backlog),) if backlog >= self.settings.png_redis_max_bytes else (),
            degraded=(*no_worker_ready(listed), *filter(None, [self.images.trouble()])),
        )

    def order_models(self, order: ModelOrder, worker: str | None = None) -> list[str]:
        try:
            beats = self.store.workers.alive()
            asked = sorted(
                health.name
                for health in map(WorkerHealth.from_heartbeat, beats)
                if health.ready and (worker is None or health.name == worker)
            )
            for name in asked:
                self.model_orders.send(name, order)
        except redis.RedisError as exc:
            raise BrokerUnavailableError(f"Redis unreachable: {exc}") from exc
        return asked

    def _backlog_text(self, backlog: int) -> str:
        return (f"finished images waiting for an API replica's copy fill Redis ({backlog} bytes; "
                f"IMAGEN_PNG_REDIS_MAX_BYTES={self.settings.png_redis_max_bytes})")

    def job_metrics(self) -> JobMetrics:
        try:
            return JobMetrics(
                backend="distributed",
                waiting=self._health_store.jobs.count_waiting(),
                running=self._health_store.jobs.count_running(),
                totals=self._health_store.totals.read(),
                outputs_disk_full=self.images.disk_full is not None,
                png_backlog_bytes=self._health_store.pngs.backlog_bytes(),
            )
        except redis.RedisError as exc:
            raise BrokerUnavailableError(f"Redis unreachable: {exc}") from exc

    # -- images ----------------------------------------------------------------------------------
    def ensure_output(self, filename: str) -> None:
        """Fetch an image not copied yet. A failure is logged, never raised: the route then answers 404 for
        an image it cannot serve (the background transfer keeps trying)."""
        self.images.copy(filename)
