"""The embedded job backend: the SQLite store plus worker processes supervised from the API process.

Each worker slot is a thread that owns one child process (``worker_process``). The thread claims a job,
hands it to its child, writes the child's progress to the store, enforces the timeout (the child is
killed and replaced), and turns a dead child into a retry. No model code runs in this process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading
import time
import uuid
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from imagen.config import Settings
from imagen.jobs.backend import JobBackend
from imagen.jobs.embedded.child import worker_main
from imagen.jobs.embedded.store import SqliteJobStore
from imagen.jobs.lifecycle import pid_alive
from imagen.jobs.types import BackendHealth, JobRecord, NewJob, Submitted

log = logging.getLogger("imagen.jobs")

HEARTBEAT_S = 2.0
ORPHAN_AFTER_S = 30.0  # a running job whose owner has not beaten for this long is taken back
REAPER_PERIOD_S = 5.0
HOSTNAME = socket.gethostname()


class EmbeddedBackend(JobBackend):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = SqliteJobStore(settings.database_path, result_ttl_s=settings.result_ttl_s)
        # Owner ids are unique per API process life, so a restarted process never mistakes an old
        # job for one of its own.
        self.instance = f"{HOSTNAME}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._new_work = threading.Condition()
        self._generation = 0
        self._stopping = threading.Event()
        self._slots: list[WorkerSlot] = []
        self._reaper: threading.Thread | None = None

    # -- JobBackend ------------------------------------------------------------------------------
    def start(self) -> None:
        self.settings.outputs_dir.mkdir(parents=True, exist_ok=True)
        self.recover()
        self._slots = [WorkerSlot(self, index) for index in range(self.settings.workers)]
        for slot in self._slots:
            slot.start()
        self._reaper = threading.Thread(target=self._reap_forever, name="imagen-reaper", daemon=True)
        self._reaper.start()

    def stop(self) -> None:
        self._stopping.set()
        self.notify_new_work()
        for slot in self._slots:
            slot.shutdown()
        for slot in self._slots:
            slot.join(timeout=10)
        if self._reaper is not None:
            self._reaper.join(timeout=REAPER_PERIOD_S + 1)
        self.store.close()

    def submit(self, job: NewJob) -> Submitted:
        submitted = self.store.submit(job, self.settings.max_queue)
        self.notify_new_work()
        return submitted

    def get(self, job_id: str) -> JobRecord | None:
        return self.store.get(job_id)

    def health(self) -> BackendHealth:
        return BackendHealth(
            queue_broker="embedded", gpu_available=any(slot.gpu_available for slot in self._slots)
        )

    def worker_pids(self) -> list[int]:
        """Process ids of the generation workers (for operators and tests)."""
        return [pid for slot in self._slots if (pid := slot.pid) is not None]

    # -- internals -------------------------------------------------------------------------------
    def notify_new_work(self) -> None:
        with self._new_work:
            self._generation += 1
            self._new_work.notify_all()

    def wait_for_work(self, seen_generation: int, timeout: float) -> None:
        with self._new_work:
            if self._generation == seen_generation and not self._stopping.is_set():
                self._new_work.wait(timeout)

    @property
    def work_generation(self) -> int:
        return self._generation

    def recover(self) -> list[str]:
        """Put back the jobs of owners that are gone (a killed API process, a stalled host)."""
        now = time.time()

        def is_dead(owner: str, heartbeat_at: float | None) -> bool:
            if owner.startswith(self.instance):
                return False
            host, _, rest = owner.partition(":")
            pid_text = rest.partition(":")[0]
            if host == HOSTNAME and pid_text.isdigit():
                pid = int(pid_text)
                if pid == os.getpid() or not pid_alive(pid):
                    return True
            return heartbeat_at is None or now - heartbeat_at > ORPHAN_AFTER_S

        recovered = self.store.recover_orphans(is_dead, self.settings.max_attempts)
        if recovered:
            log.warning("took back %d job(s) left running by a dead worker: %s", len(recovered), recovered)
            self.notify_new_work()
        return recovered

    def _reap_forever(self) -> None:
        while not self._stopping.wait(REAPER_PERIOD_S):
            try:
                self.recover()
                self.store.purge_expired()
            except Exception:
                log.exception("reaper pass failed")


class WorkerSlot(threading.Thread):
    """One generation at a time: a supervising thread and the child process it drives."""

    def __init__(self, backend: EmbeddedBackend, index: int) -> None:
        super().__init__(name=f"imagen-worker-{index}", daemon=True)
        self.backend = backend
        self.settings = backend.settings
        self.store = backend.store
        self.owner = f"{backend.instance}:{index}"
        self.gpu_available = False
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._context = multiprocessing.get_context("spawn")

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.is_alive() else None

    # -- child process ---------------------------------------------------------------------------
    def _spawn(self) -> bool:
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(
            target=worker_main,
            args=(child_end, self.settings.model_dump(mode="json")),
            name=f"imagen-generation-{self.owner.rsplit(':', 1)[-1]}",
            daemon=True,
        )
        process.start()
        child_end.close()
        self._process, self._conn = process, parent_end
        while not self.backend._stopping.is_set():
            if parent_end.poll(1.0):
                try:
                    message = parent_end.recv()
                except EOFError:
                    break
                if message[0] == "ready":
                    self.gpu_available = bool(message[1].get("gpu_available"))
                    log.info("generation worker %s ready on %s", process.pid, message[1].get("device"))
                    return True
                log.error("generation worker failed to start: %s", message[1])
                break
            if not process.is_alive():
                break
        self._kill_child()
        return False

    def _kill_child(self) -> None:
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join(timeout=10)
        if self._conn is not None:
            self._conn.close()
        self._process, self._conn = None, None

    def shutdown(self) -> None:
        """Stop taking jobs; a job in progress goes back to the queue uncounted."""
        process = self._process
        if process is not None and process.is_alive():
            process.kill()

    # -- main loop -------------------------------------------------------------------------------
    def run(self) -> None:
        failures = 0
        stopping = self.backend._stopping
        while not stopping.is_set():
            if self._process is None or not self._process.is_alive():
                self._kill_child()
                if not self._spawn():
                    failures += 1
                    stopping.wait(min(30.0, 0.5 * 2**failures))
                    continue
                failures = 0
            seen = self.backend.work_generation
            job = self.store.claim_next(self.owner)
            if job is None:
                self.backend.wait_for_work(seen, timeout=0.5)
                continue
            self._run_job(job)
        self._kill_child()

    def _run_job(self, job: JobRecord) -> None:
        conn = self._conn
        assert conn is not None
        log.info("job %s: attempt %d started", job.job_id, job.attempts)
        deadline = time.monotonic() + self.settings.job_timeout_s
        next_heartbeat = time.monotonic() + HEARTBEAT_S
        try:
            conn.send(("run", job.task, job.output_name))
            while True:
                now = time.monotonic()
                if now >= deadline:
                    self._kill_child()
                    self.store.fail(
                        job.job_id, self.owner,
                        f"Timeout: generation took longer than {self.settings.job_timeout_s:g} s",
                    )
                    log.warning("job %s: timed out, worker replaced", job.job_id)
                    return
                if now >= next_heartbeat:
                    self.store.heartbeat(job.job_id, self.owner)
                    next_heartbeat = now + HEARTBEAT_S
                if not conn.poll(min(deadline, next_heartbeat) - now):
                    continue
                message = conn.recv()
                if self._handle(job, message):
                    return
        except (EOFError, OSError, BrokenPipeError):
            self._kill_child()
            if self.backend._stopping.is_set():
                self.store.release(job.job_id, self.owner)
                log.info("job %s: released for the next start", job.job_id)
                return
            state = self.store.retry_or_fail(
                job.job_id, self.owner, "worker process died (killed or out of memory)",
                self.settings.max_attempts,
            )
            log.warning("job %s: worker died, job now %s", job.job_id, state)
            self.backend.notify_new_work()

    def _handle(self, job: JobRecord, message: tuple[Any, ...]) -> bool:
        """Apply one message from the child; True once the job has ended."""
        kind = message[0]
        if kind == "progress":
            self.store.report_progress(job.job_id, self.owner, message[1], message[2])
            return False
        if kind == "done":
            self.store.complete(job.job_id, self.owner, message[1])
            log.info("job %s: SUCCESS %s", job.job_id, message[1]["filename"])
            return True
        if kind == "error":
            _, retryable, text = message
            if retryable:
                state = self.store.retry_or_fail(job.job_id, self.owner, text, self.settings.max_attempts)
                log.warning("job %s: %s; job now %s", job.job_id, text, state)
                self.backend.notify_new_work()
            else:
                self.store.fail(job.job_id, self.owner, text)
                log.warning("job %s: FAILURE %s", job.job_id, text)
            return True
        log.error("job %s: unexpected message from worker: %r", job.job_id, kind)
        return False
