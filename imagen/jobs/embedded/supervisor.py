"""A worker slot of the embedded backend: one thread in the API process driving one child process.

The thread claims the next job, hands it to its child (``child.py``) as a ``RunJob``, writes the child's
``Progress`` to the store and beats for the job, enforces the timeout (the child is killed and replaced),
and turns a dead child into a failed attempt. What a failed attempt leads to is the store's business (it
applies ``lifecycle.AttemptPolicy``); the slot only says how the attempt ended.

A full outputs disk is waited out: the child keeps the finished image and says ``NoSpace`` at each failed
write; the slot shows it (``waiting_for_space``: the backend's ``/health`` and submissions read it) and does
not count the wait in the job's timeout. The job ends as usual once its image is written. A full disk under
the job database (by default the same disk) is waited out too (``database_full``): a heartbeat or progress
write it refuses is skipped, the job's outcome is written again until it fits, and a slot that cannot claim
keeps its child (its model stays loaded): no attempt is counted, no image lost.

A cancelled job (``POST /cancel``) is REVOKED in the store at once. The slot learns of it from the store: the
backend asks every slot to look (``check_cancel``), and a progress write or heartbeat the store refuses
makes it look too. It then sends ``Cancel``; the child stops at the engine's next step and answers
``Cancelled``, and the slot takes the next job with the same child (the model stays loaded).

An operator's load or unload order (``order``) waits in the slot until its child is between jobs: the slot
sends ``ChangeModels`` before it claims its next job and waits for ``ModelsChanged`` (a running job finishes
first; a waiting one starts after the order).

Nothing leaves a job STARTED forever: any unexpected error in the loop (the store busy past its timeout, a
message the protocol does not allow, a bug) is caught, logged, the child replaced (its state is unknown),
and the job held then ends as a failed attempt that may pass, so the policy retries it. The loop then goes
on, after a backoff that grows while the errors repeat.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from imagen.config import Settings
from imagen.errors import DatabaseUnavailableError
from imagen.generation.base import DeviceInfo
from imagen.jobs import stats
from imagen.jobs.affinity import Affinity
from imagen.jobs.embedded.child import worker_main
from imagen.jobs.embedded.messages import (
    Cancel,
    Cancelled,
    ChangeModels,
    Done,
    Failed,
    ModelsChanged,
    NoSpace,
    Preview,
    Progress,
    ProtocolError,
    Ready,
    RunJob,
    StartupFailed,
    Stop,
    ToChild,
    WorkerReport,
)
from imagen.jobs.embedded.store import SqliteJobStore
from imagen.jobs.lifecycle import WORKER_DIED, OwnerToken, Verdict, supervision_failed_text
from imagen.jobs.model_control import ModelOrder
from imagen.jobs.types import JobRecord, JobState, WorkerHealth
from imagen.jobs.worker_numbers import WorkerNumbers

log = logging.getLogger("imagen.jobs")

HEARTBEAT_S = 2.0
STOP_CHECK_S = 0.25  # how soon a slot running a job notices that the backend stops
IDLE_RECHECK_S = 0.5  # an idle slot looks at the store this often even without a wake-up
MAX_BACKOFF_S = 30.0
CHILD_EXIT_S = 5.0  # a child asked to stop gets this long to close its engine


class ChildStartFailed(Exception):
    """The child process could not load its engine (or exited before it was ready)."""


class Wakeups:
    """Counts the events that may mean new work: a submission, a requeued job, the backend stopping.

    A slot reads ``count`` before it looks for a job and, finding none, waits until the count moves, so a
    submission between its look and its wait is never missed.
    """

    def __init__(self) -> None:
        self._count = 0
        self._changed = threading.Condition()

    @property
    def count(self) -> int:
        return self._count

    def notify(self) -> None:
        with self._changed:
            self._count += 1
            self._changed.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._count != seen, timeout)


def backoff_s(consecutive_errors: int) -> float:
    return float(min(MAX_BACKOFF_S, 0.5 * 2 ** (consecutive_errors - 1)))


def database_disk_full(exc: BaseException) -> bool:
    """The job database refused a write because its disk is full (``SQLITE_FULL``): a condition to wait out."""
    for error in (exc, exc.__cause__):
        if isinstance(error, sqlite3.Error) and getattr(error, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_FULL:
            return isinstance(exc, (DatabaseUnavailableError, sqlite3.Error))
    return False


class WorkerSlot(threading.Thread):
    """One generation at a time: this thread and the child process it drives."""

    def __init__(
        self,
        index: int,
        *,
        settings: Settings,
        store: SqliteJobStore,
        owner: OwnerToken,
        wakeups: Wakeups,
        stopping: threading.Event,
        on_preview: Callable[[str, int, bytes], None] = lambda _job_id, _step, _jpeg: None,
        models_of_idle_peers: Callable[[WorkerSlot], frozenset[str]] = lambda _slot: frozenset(),
    ) -> None:
        super().__init__(name=f"imagen-worker-{index}", daemon=True)
        self.index = index
        self.settings = settings
        self.store = store
        self.owner = owner.with_slot(str(index))
        self.wakeups = wakeups
        self.stopping = stopping
        self.on_preview = on_preview  # (job_id, step, jpeg): to the live streams that asked for previews
        # The models that the other slots, ready and idle, hold (``jobs.affinity``: a job may wait for them).
        self.models_of_idle_peers = models_of_idle_peers
        self.device: DeviceInfo | None = None  # set once its child's engine is loaded
        self.start_error: str | None = None  # why its last child failed to start (it keeps retrying)
        self.job: JobRecord | None = None  # the job this slot holds now
        # Why its child cannot write the job's finished image (the outputs disk is full), while it waits to
        # write it again; None otherwise.
        self.waiting_for_space: str | None = None
        self.database_full: str | None = None  # why the job database refused its last write (disk full)
        self._deadline = 0.0  # when the job it runs times out (monotonic clock)
        self.numbers = WorkerNumbers()  # its child's last ``WorkerReport`` (for /metrics)
        self.models: dict[str, str] = {}  # and the models its engine holds, with their tier (/health, /models)
        self._look_for_cancel = threading.Event()  # its job may have been cancelled: read the store
        self._orders: queue.SimpleQueue[ModelOrder] = queue.SimpleQueue()  # for its child, between jobs
        self._cancel_sent = False  # Cancel went to the child for the job it runs now
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._context = multiprocessing.get_context("spawn")

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.is_alive() else None

    def health(self) -> WorkerHealth:
        """This slot's generation worker, as ``/health`` lists it."""
        device = self.device if self.pid is not None else None
        numbers = self.numbers
        return WorkerHealth(
            host=self.owner.host,
            pid=self.pid or 0,
            ready=device is not None,
            error=self.start_error if device is None else None,
            device=device.device if device is not None else None,
            gpu_available=device is not None and device.gpu_available,
            model_load_seconds=numbers.model_load_seconds if device is not None else None,
            gpu_memory_used_bytes=numbers.gpu_memory_used_bytes if device is not None else None,
            gpu_memory_total_bytes=numbers.gpu_memory_total_bytes if device is not None else None,
            model_loads=numbers.model_loads if device is not None else None,
            models=dict(self.models) if device is not None else {},
        )

    def idle(self) -> bool:
        """Its child is ready and runs no job."""
        return self.job is None and self.device is not None and self.pid is not None

    def affinity(self) -> Affinity | None:
        """What its next claim knows of the models held here and by idle peers (None: plain fair order)."""
        if not self.settings.affinity:
            return None
        return Affinity(frozenset(self.models), self.models_of_idle_peers(self), self.settings.affinity_wait_s)

    def order(self, order: ModelOrder) -> None:
        """An operator's load or unload for this slot's child, sent before its next job (the backend wakes
        the slot)."""
        self._orders.put(order)

    def check_cancel(self) -> None:
        """A job was cancelled (maybe this slot's): look at the store within ``STOP_CHECK_S``."""
        self._look_for_cancel.set()

    # -- main loop -------------------------------------------------------------------------------
    def run(self) -> None:
        errors = 0  # consecutive, for the backoff
        while not self.stopping.is_set():
            try:
                if self._process is None or not self._process.is_alive():
                    self._start_child()
                self._serve_one()
                errors = 0
            except ChildStartFailed as exc:
                errors += 1
                self.start_error = str(exc)
                log.error("worker slot %d: generation worker failed to start: %s", self.index, exc)
                self._kill_child()
                self.stopping.wait(backoff_s(errors))
            except Exception as exc:
                errors += 1
                if self.job is None and database_disk_full(exc):
                    self._note_database_full(exc)  # no claim now; the child (and its model) stays
                else:
                    self._recover(exc)
                self.stopping.wait(backoff_s(errors))
        self._stop_child()

    def _note_database_full(self, exc: BaseException) -> None:
        if self.database_full is None:
            log.warning("worker slot %d: the job database's disk is full (%s); its jobs wait, nothing is counted "
                        "against them", self.index, exc)
        self.database_full = str(exc)

    def _written(self, write: Callable[[], bool]) -> bool:
        """A heartbeat or progress write; True (as if written) when the database's disk is full: neither is
        worth ending the job for, and the next one says the same."""
        try:
            written = write()
        except Exception as exc:
            if not database_disk_full(exc):
                raise
            self._note_database_full(exc)
            return True
        self.database_full = None
        return written

    def _serve_one(self) -> None:
        """Run the next job, or wait a little for one."""
        seen = self.wakeups.count
        if self.stopping.is_set():
            return
        self._carry_out_orders()
        job = self.store.claim_next(self.owner, self.affinity())
        self.database_full = None
        if job is None:
            self.wakeups.wait(seen, timeout=IDLE_RECHECK_S)
            self._read_idle_reports()
            return
        self.job = job
        self._run_job(job)
        self.job = None

    def _recover(self, exc: Exception) -> None:
        """After an unexpected error: replace the child, and end the job held as a failed attempt."""
        self._kill_child()
        job = self.job
        if job is None:
            log.exception("worker slot %d: unexpected error; generation worker replaced", self.index)
            return
        log.exception("job %s: unexpected error while supervising it; generation worker replaced", job.job_id)
        self._give_back(job, supervision_failed_text(f"{type(exc).__name__}: {exc}"))

    def abandon(self, error: str) -> None:
        """For a slot whose thread died: kill its child and end the job it held (called by the backend)."""
        self._kill_child()
        if self.job is not None:
            self._give_back(self.job, error)

    def _give_back(self, job: JobRecord, error: str) -> None:
        """End an attempt that left no image: released uncounted when the backend stops, else a failed
        attempt that may pass (the policy retries it or fails the job). Retries the store until it answers,
        so the job never stays STARTED; if the backend stops first, the next start takes the job back."""
        delay = 0.5
        while True:
            try:
                if self.stopping.is_set():
                    self.store.release(job.job_id, self.owner)
                    log.info("job %s: released for the next start", job.job_id)
                else:
                    self._log_verdict(job, self.store.fail_attempt(job.job_id, self.owner, error, retryable=True))
                self.job = None
                return
            except Exception:
                if self.stopping.is_set():
                    log.exception("job %s: could not release it; the next start takes it back", job.job_id)
                    return
                log.exception("job %s: could not record the failed attempt; retrying in %.1f s", job.job_id, delay)
                self.stopping.wait(delay)
                delay = min(MAX_BACKOFF_S, delay * 2)

    def _log_verdict(self, job: JobRecord, verdict: Verdict | None) -> None:
        """The store logged the event itself (``jobs/stats.py``): retried, or finished."""
        if verdict is None:
            log.warning("job %s: no longer held by this worker; left as it is", job.job_id)
        elif verdict.requeue:
            self.wakeups.notify()

    # -- one job ---------------------------------------------------------------------------------
    def _run_job(self, job: JobRecord) -> None:
        conn = self._conn
        assert conn is not None
        stats.on_started(job)
        self._deadline = time.monotonic() + self.settings.job_timeout_s
        next_heartbeat = time.monotonic() + HEARTBEAT_S
        self._cancel_sent = False
        self._look_for_cancel.clear()
        try:
            self._send(RunJob(job.task, job.output_name, self.store.job_inputs(job.job_id)))
            while not self.stopping.is_set():
                now = time.monotonic()
                deadline = self._deadline
                if now >= deadline:
                    self._kill_child()
                    self._log_verdict(job, self.store.time_out(job.job_id, self.owner))
                    return
                if now >= next_heartbeat:
                    if not self._written(lambda: self.store.heartbeat(job.job_id, self.owner)):
                        self._look_for_cancel.set()
                    next_heartbeat = now + HEARTBEAT_S
                if self._look_for_cancel.is_set():
                    self._look_for_cancel.clear()
                    self._cancel_if_revoked(job)
                if conn.poll(min(deadline, next_heartbeat, now + STOP_CHECK_S) - now) and self._handle(
                    job, conn.recv()
                ):
                    return
        except (EOFError, OSError):
            pass  # the child died
        finally:
            self.waiting_for_space = None
        # The child died, or the backend stops: the job goes back (uncounted when stopping).
        self._kill_child()
        self._give_back(job, WORKER_DIED)

    def _handle(self, job: JobRecord, message: object) -> bool:
        """Apply one message from the child; True once the job has ended."""
        match message:
            case Progress(step=str() as step, percent=int() as percent, denoising=(dict() | None) as denoising):
                if not self._written(
                    functools.partial(self.store.report_progress, job.job_id, self.owner, step, percent, denoising)
                ):
                    self._look_for_cancel.set()  # refused: the job is no longer ours; cancelled?
                return False
            case Preview(step=int() as step, jpeg=bytes() as jpeg):
                self.on_preview(job.job_id, step, jpeg)
                return False
            case WorkerReport(numbers=WorkerNumbers() as numbers, models=dict() as models):
                self.numbers, self.models = numbers, models
                return False
            case NoSpace(error=str() as error, retry_in_s=float() as retry_in_s):
                if self.waiting_for_space is None:
                    log.warning("job %s: outputs disk full (%s): %s; its image is kept and written again as soon "
                                "as there is room; no new job is accepted until then",
                                job.job_id, self.settings.outputs_dir, error)
                self.waiting_for_space = error
                self._deadline += retry_in_s  # waiting for room is no part of the job's time
                return False
            case Done(result=dict() as result):
                if self.waiting_for_space is not None:
                    log.info("job %s: its image is written; the outputs disk has room again", job.job_id)
                    self.waiting_for_space = None
                if self._complete(job, result):
                    return True  # the store logs the event (jobs/stats.py)
                if self._revoked(job):
                    # Cancelled while its image was being saved: a REVOKED job leaves no file behind.
                    (self.settings.outputs_dir / job.output_name).unlink(missing_ok=True)
                    log.info("job %s: REVOKED as it finished; its image deleted", job.job_id)
                else:
                    log.warning("job %s: finished, but no longer held by this worker", job.job_id)
                return True
            case Cancelled() if self._cancel_sent:
                log.info("job %s: REVOKED; stopped without an image", job.job_id)
                return True
            case Failed(error=str() as error, retryable=bool() as retryable):
                self._log_verdict(job, self.store.fail_attempt(job.job_id, self.owner, error, retryable=retryable))
                return True
            case _:
                raise ProtocolError(f"unexpected message from the generation worker: {message!r:.200}")

    def _complete(self, job: JobRecord, result: dict[str, object]) -> bool:
        """Record SUCCESS; while the database's disk is full, try again with a growing delay (the image is
        written already). Stopping first: the job stays as it is and the next start runs it again."""
        errors = 0
        while True:
            try:
                completed = self.store.complete(job.job_id, self.owner, result)
            except Exception as exc:
                if not database_disk_full(exc):
                    raise
                self._note_database_full(exc)
                errors += 1
                if self.stopping.wait(backoff_s(errors)):
                    log.warning("job %s: its success could not be recorded before the stop (disk full); the next "
                                "start takes the job back", job.job_id)
                    return True
                continue
            self.database_full = None
            return completed

    def _revoked(self, job: JobRecord) -> bool:
        record = self.store.get(job.job_id)
        return record is not None and record.state is JobState.REVOKED

    def _cancel_if_revoked(self, job: JobRecord) -> None:
        if not self._cancel_sent and self._revoked(job):
            self._send(Cancel())
            self._cancel_sent = True
            log.info("job %s: cancelled; stopping it at its next step", job.job_id)

    def _read_idle_reports(self) -> None:
        """The reports an idle child sends on its own (it freed the models its registry file dropped)."""
        conn = self._conn
        assert conn is not None
        try:
            while conn.poll():
                match conn.recv():
                    case WorkerReport(numbers=WorkerNumbers() as numbers, models=dict() as models):
                        self.numbers, self.models = numbers, models
                    case other:
                        raise ProtocolError(f"unexpected message from an idle worker: {other!r:.200}")
        except (EOFError, OSError):
            return  # the child died: the loop starts another

    def _carry_out_orders(self) -> None:
        """Send the operator's orders waiting for this slot to its child, one at a time, each waited for."""
        conn = self._conn
        assert conn is not None
        while not self.stopping.is_set():
            try:
                order = self._orders.get_nowait()
            except queue.Empty:
                return
            self._send(ChangeModels(order))
            deadline = time.monotonic() + self.settings.job_timeout_s  # a model load takes less than a job
            while True:
                if not conn.poll(max(0.0, deadline - time.monotonic())):
                    raise ProtocolError(f"model order {order} not done within {self.settings.job_timeout_s} s")
                match conn.recv():
                    case WorkerReport(numbers=WorkerNumbers() as numbers, models=dict() as models):
                        self.numbers, self.models = numbers, models
                    case ModelsChanged(error=None):
                        break
                    case ModelsChanged(error=str() as error):
                        log.warning("worker slot %d: model order %s %s failed: %s",
                                    self.index, order.action, order.model_id or "(all)", error)
                        break
                    case other:
                        raise ProtocolError(f"unexpected message after a model order: {other!r:.200}")

    # -- the child process -----------------------------------------------------------------------
    def _start_child(self) -> None:
        self._kill_child()
        self.device = None
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(
            target=worker_main,
            args=(child_end, self.settings.model_dump(mode="json")),
            name=f"imagen-generation-{self.index}",
            daemon=True,
        )
        process.start()
        child_end.close()
        self._process, self._conn = process, parent_end
        while not self.stopping.is_set():
            if parent_end.poll(1.0):
                try:
                    message = parent_end.recv()
                except EOFError:
                    raise ChildStartFailed(f"exited with code {process.exitcode} before it was ready") from None
                match message:
                    case WorkerReport(numbers=WorkerNumbers() as numbers, models=dict() as models):
                        self.numbers, self.models = numbers, models
                    case Ready(device=DeviceInfo() as device):
                        self.device, self.start_error = device, None
                        log.info("generation worker %s ready on %s", process.pid, device.device)
                        return
                    case StartupFailed(error=str() as error):
                        raise ChildStartFailed(error)
                    case _:
                        raise ProtocolError(f"unexpected message from a starting worker: {message!r:.200}")
            # a child that said why it failed and exited between the poll and this check: read its message first
            if not process.is_alive() and not parent_end.poll(0):
                raise ChildStartFailed(f"exited with code {process.exitcode} before it was ready")

    def _send(self, message: ToChild) -> None:
        assert self._conn is not None
        self._conn.send(message)

    def _stop_child(self) -> None:
        """Ask the child to close its engine and exit; kill it if it does not."""
        if self._process is not None and self._process.is_alive():
            with contextlib.suppress(OSError):  # the pipe may be gone already
                self._send(Stop())
                self._process.join(timeout=CHILD_EXIT_S)
        self._kill_child()

    def _kill_child(self) -> None:
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join(timeout=10)
        if self._conn is not None:
            self._conn.close()
        self._process, self._conn = None, None
