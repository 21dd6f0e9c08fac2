"""The embedded job backend: the SQLite store plus worker slots supervised from the API process.

- ``store.py``: the durable queue and job records; it applies ``lifecycle``'s attempt policy.
- ``supervisor.py``: a ``WorkerSlot`` per worker, a thread driving one child process (``child.py``) through
  typed messages (``messages.py``). No model code runs in the API process.
- Here: start and stop the slots, wake them on new work, and a reaper thread that takes back the jobs of
  dead owners (an earlier life of this process, another process on the same file that died or went
  silent), purges expired records, and replaces a slot whose thread died.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, asynccontextmanager

from imagen.config import Settings
from imagen.errors import OutputsFullError
from imagen.jobs import stats
from imagen.jobs.backend import JobBackend
from imagen.jobs.changes import ChangeFeed, Watcher
from imagen.jobs.embedded.sqlite import request_lock_wait
from imagen.jobs.embedded.store import SqliteJobStore
from imagen.jobs.embedded.supervisor import HEARTBEAT_S, Wakeups, WorkerSlot
from imagen.jobs.lifecycle import AttemptPolicy, OwnerToken, supervision_failed_text
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
    no_worker_ready,
)

log = logging.getLogger("imagen.jobs")

# A running job whose owner has not beaten for this long is taken back (owners beat every HEARTBEAT_S).
ORPHAN_AFTER_S = 15 * HEARTBEAT_S
REAPER_PERIOD_S = 5.0


class EmbeddedBackend(JobBackend):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        policy = AttemptPolicy(max_attempts=settings.max_attempts, timeout_s=settings.job_timeout_s)
        # The store's writers (slots, reaper, routes) all run in this process: it tells the streams directly.
        self.feed = ChangeFeed()
        self.store = SqliteJobStore(
            settings.database_path, policy=policy, result_ttl_s=settings.result_ttl_s, on_change=self.feed.publish
        )
        # New for every process life: a restarted process never mistakes an old job for one of its own.
        self.owner = OwnerToken.new()
        self.wakeups = Wakeups()
        self._stopping = threading.Event()
        self._slots: list[WorkerSlot] = []
        self._reaper: threading.Thread | None = None

    # -- JobBackend ------------------------------------------------------------------------------
    def start(self) -> None:
        self.settings.outputs_dir.mkdir(parents=True, exist_ok=True)
        self._take_back_orphans()
        self._slots = [self._new_slot(index) for index in range(self.settings.workers)]
        self._reaper = threading.Thread(target=self._reap_forever, name="imagen-reaper", daemon=True)
        self._reaper.start()

    def stop(self) -> None:
        """Slots stop; a job in progress goes back to the queue uncounted (its child is killed)."""
        self._stopping.set()
        self.wakeups.notify()
        for slot in self._slots:
            slot.join(timeout=15)
        if self._reaper is not None:
            self._reaper.join(timeout=REAPER_PERIOD_S + 1)
        self.store.close()

    def submit(self, job: NewJob, key_max_waiting: int | None = None) -> Submitted:
        if self.outputs_full():
            raise OutputsFullError(f"outputs disk full ({self.settings.outputs_dir})")
        submitted = self.store.submit(job, self.settings.max_queue, key_max_waiting)
        self.wakeups.notify()
        self.store.stats.add(stats.on_submitted(job, submitted.position))
        return submitted

    def get(self, job_id: str) -> JobRecord | None:
        return self.store.get(job_id)

    def cancel(self, job_id: str) -> JobState | None:
        state = self.store.cancel(job_id)
        if state is JobState.REVOKED:
            for slot in self._slots:  # the one running it, if any, tells its child to stop
                slot.check_cancel()
        return state

    @asynccontextmanager
    async def changes(self, job_id: str, previews: bool = False) -> AsyncIterator[Watcher]:
        with self.feed.watch(job_id, previews) as watcher:
            yield watcher

    def output_owner(self, filename: str) -> str | None:
        return self.store.output_owner(filename)

    def save_upload(self, upload: Upload, quota: UploadQuota | None = None) -> None:
        self.store.save_upload(upload, quota)

    def load_upload(self, upload_id: str) -> Upload | None:
        return self.store.load_upload(upload_id)

    def health(self) -> BackendHealth:
        """Unavailable while the job database is deleted, replaced or damaged (new jobs would be lost);
        degraded while no worker is ready (jobs queue, and wait for one)."""
        workers = tuple(slot.health() for slot in self._slots)
        trouble = self.store.file.trouble()
        return BackendHealth(
            queue_broker="embedded",
            gpu_available=any(w.ready and w.gpu_available for w in workers),
            workers=workers,
            unavailable=(
                *(() if trouble is None else (f"job database {trouble}",)),
                *self._no_room(),
            ),
            degraded=no_worker_ready(workers),
        )

    def answering(self) -> AbstractContextManager[None]:
        return request_lock_wait(self.settings.database_busy_timeout_s)

    def job_metrics(self) -> JobMetrics:
        return JobMetrics(
            backend="embedded",
            waiting=self.store.count_waiting(),
            running=self.store.count_running(),
            totals=self.store.stats.read(),
            outputs_disk_full=self.outputs_full(),
        )

    def order_models(self, order: ModelOrder, worker: str | None = None) -> list[str]:
        asked = []
        for slot in self._slots:
            health = slot.health()
            if health.ready and (worker is None or health.name == worker):
                slot.order(order)
                asked.append(health.name)
        self.wakeups.notify()  # an idle slot sends it now, not at its next look at the store
        return asked

    def outputs_full(self) -> bool:
        """A worker waits to write a finished image: the outputs disk is full (no new job until it has room)."""
        return any(slot.waiting_for_space is not None for slot in self._slots)

    def _no_room(self) -> tuple[str, ...]:
        """The full disks the worker slots wait on (``/health``'s unavailable reasons)."""
        reasons = []
        if self.outputs_full():
            reasons.append(f"outputs disk full ({self.settings.outputs_dir})")
        if any(slot.database_full is not None for slot in self._slots):
            reasons.append(f"job database disk full ({self.settings.database_path})")
        return tuple(reasons)

    # -- internals -------------------------------------------------------------------------------
    def _new_slot(self, index: int) -> WorkerSlot:
        slot = WorkerSlot(
            index,
            settings=self.settings,
            store=self.store,
            owner=self.owner,
            wakeups=self.wakeups,
            stopping=self._stopping,
            on_preview=self.feed.publish_preview,
            models_of_idle_peers=self._models_of_idle_peers,
        )
        slot.start()
        return slot

    def _models_of_idle_peers(self, asking: WorkerSlot) -> frozenset[str]:
        """The models held by the slots other than ``asking`` that are ready and run no job (model affinity)."""
        peers = [slot for slot in list(self._slots) if slot is not asking and slot.idle()]
        return frozenset(model for slot in peers for model in slot.models)

    def _take_back_orphans(self) -> None:
        verdicts = self.store.recover_orphans(self.owner, silent_after_s=ORPHAN_AFTER_S)
        if verdicts:
            log.warning(
                "took back %d job(s) left running by a dead worker: %s",
                len(verdicts),
                {job_id: verdict.state.value for job_id, verdict in verdicts.items()},
            )
            self.wakeups.notify()

    def _replace_dead_slots(self) -> None:
        """A slot's loop catches every ``Exception``; this covers a thread that died anyway."""
        for position, slot in enumerate(self._slots):
            if slot.is_alive() or self._stopping.is_set():
                continue
            log.error("worker slot %d: its thread died; starting a new one", slot.index)
            slot.abandon(supervision_failed_text("the worker slot's thread died"))
            self._slots[position] = self._new_slot(slot.index)

    def _reap_forever(self) -> None:
        while not self._stopping.wait(REAPER_PERIOD_S):
            try:
                self.store.file.trouble()  # a deleted or replaced database is logged within a pass
                self._replace_dead_slots()
                self._take_back_orphans()
                self.store.purge_expired()
            except Exception:
                log.exception("reaper pass failed")
