"""The distributed job backend, API side: job records in Redis, work sent to Celery workers anywhere.

``submit`` adds the record and its place in the cluster-wide waiting set in one Lua script (the
``max_queue`` check included), then publishes the Celery message. A background thread copies the PNGs
that workers put in Redis into this replica's outputs folder (and requeues the jobs of dead workers);
``get`` fetches a missing image on demand. No model code and no torch is imported here.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import replace

import redis

from imagen.config import Settings
from imagen.errors import BrokerUnavailableError
from imagen.jobs.backend import JobBackend
from imagen.jobs.distributed.app import create_celery, publish
from imagen.jobs.distributed.store import RedisJobStore, connect
from imagen.jobs.types import BackendHealth, JobRecord, JobState, NewJob, Submitted
from imagen.outputs.names import is_servable_name
from imagen.outputs.png import write_atomically

log = logging.getLogger("imagen.jobs")

SYNC_BLOCK_MS = 500
HEALTH_TIMEOUT_S = 0.5


class CeleryBackend(JobBackend):
    def __init__(self, settings: Settings) -> None:
        if not settings.broker_url:
            raise ValueError("CeleryBackend needs settings.broker_url")
        self.settings = settings
        # The API's calls are small: a Redis that accepts connections but does not answer must turn into a
        # 503 within seconds, not hold a request for the default timeouts.
        api_client = connect(settings.broker_url, connect_timeout=1.0, socket_timeout=2.0, retries=1)
        self.store = RedisJobStore(api_client, result_ttl_s=settings.result_ttl_s)
        # Its own connections: a PING never queues behind other traffic, and never waits long.
        self._health_client = connect(
            settings.broker_url, connect_timeout=HEALTH_TIMEOUT_S, socket_timeout=HEALTH_TIMEOUT_S, retries=0
        )
        sync_client = connect(settings.broker_url, socket_timeout=SYNC_BLOCK_MS / 1000 + 5)
        self._sync_store = RedisJobStore(sync_client, result_ttl_s=settings.result_ttl_s)
        self.celery = create_celery(settings)
        self._stopping = threading.Event()
        self._sync: threading.Thread | None = None

    # -- JobBackend ------------------------------------------------------------------------------
    def start(self) -> None:
        self.settings.outputs_dir.mkdir(parents=True, exist_ok=True)
        self._stopping.clear()
        self._sync = threading.Thread(target=self._sync_forever, name="imagen-image-sync", daemon=True)
        self._sync.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._sync is not None:
            self._sync.join(timeout=SYNC_BLOCK_MS / 1000 + 6)
        self.celery.close()
        for client in (self.store, self._sync_store):
            client.close()
        self._health_client.close()

    def submit(self, job: NewJob) -> Submitted:
        try:
            submitted = self.store.submit(job, self.settings.max_queue)
        except redis.RedisError as exc:
            raise BrokerUnavailableError(f"Redis unreachable: {exc}") from exc
        try:
            publish(self.celery, job.job_id)
        except Exception as exc:
            try:
                self.store.forget(job.job_id)
            except redis.RedisError:
                log.warning("job %s: could not withdraw an unpublished job", job.job_id)
            raise BrokerUnavailableError(f"could not publish the job: {exc}") from exc
        return submitted

    def get(self, job_id: str) -> JobRecord | None:
        try:
            record = self.store.get(job_id)
        except redis.RedisError as exc:
            raise BrokerUnavailableError(f"Redis unreachable: {exc}") from exc
        if record is None or record.state is not JobState.SUCCESS or record.result is None:
            return record
        self.fetch_image(record.output_name)
        path = os.path.join(str(self.settings.outputs_dir), record.output_name)
        return replace(record, result={**record.result, "path": path})

    def health(self) -> BackendHealth:
        try:
            self._health_client.ping()
            workers = RedisJobStore(self._health_client, result_ttl_s=self.settings.result_ttl_s).workers()
        except redis.RedisError:
            return BackendHealth(queue_broker="disconnected", gpu_available=False)
        return BackendHealth(
            queue_broker="connected", gpu_available=any(worker.get("gpu_available") for worker in workers)
        )

    def worker_pids(self) -> list[int]:
        """Process ids of the live generation workers on this host (for operators and tests)."""
        host = socket.gethostname()
        return sorted(int(w["pid"]) for w in self.store.workers() if w.get("host") == host)

    # -- images ----------------------------------------------------------------------------------
    def ensure_output(self, filename: str) -> None:
        self.fetch_image(filename)

    def fetch_image(self, output_name: str, store: RedisJobStore | None = None) -> bool:
        """Make sure this replica's outputs folder holds ``output_name``; False if Redis no longer has it."""
        if not is_servable_name(output_name):
            return False
        destination = self.settings.outputs_dir / output_name
        if destination.is_file():
            return True
        try:
            data = (store or self.store).get_png(output_name)
        except redis.RedisError as exc:
            log.warning("image %s: Redis unreachable: %s", output_name, exc)
            return False
        if data is None:
            return False
        write_atomically(destination, data)
        return True

    def _sync_forever(self) -> None:
        """Copy every finished image into this replica's folder as soon as it is announced; requeue the
        jobs of dead workers on the way."""
        last_id = b"0"  # from the start of the stream: images finished while this replica was down
        period = max(0.2, min(5.0, self.settings.job_lock_ttl_s / 3))
        next_reap = 0.0
        while not self._stopping.is_set():
            try:
                for entry_id, name in self._sync_store.read_outputs(last_id, SYNC_BLOCK_MS):
                    self.fetch_image(name, self._sync_store)
                    last_id = entry_id
                now = time.monotonic()
                if now >= next_reap:
                    next_reap = now + period
                    for job_id in self._sync_store.reap_orphans(
                        max_attempts=self.settings.max_attempts, timeout_s=self.settings.job_timeout_s
                    ):
                        log.warning("job %s: its worker died; back in the queue", job_id)
                        publish(self.celery, job_id)
            except Exception as exc:
                log.debug("image sync: %s", exc)
                self._stopping.wait(0.5)
