"""The task ``imagen.generate`` and the state it keeps in each worker process (a :class:`GenerateTask`).

A worker's pool child loads its engine once, in a background thread (``start_process``), retrying with a
capped backoff while it fails (a model file missing on this host, a GPU not ready): the child stays up and
says why in its log and in its heartbeat, which ``/health`` shows. Until the engine is loaded the worker
takes no job: the child raises a flag shared with the worker's main process, whose consumer starts on the
queue only once the flag is up (see ``worker.py``).

A message is a *ticket*, not an order for one job. Its body first takes over the job it names (or the job
it started before, a redelivery) only when that job is running with a dead owner; otherwise it claims the
fair queue's next confirmed waiting job (``jobs.fairness``: round-robin across API keys, oldest first within
a key; ``Attempts.claim_next``), whichever job that is, and drops the message when none waits. Every
waiting job had a message published for it, and every message ends either starting a job or finding none
waiting, so none is left without one (the reconciler counts messages against waiting jobs to make sure).
The body keeps the claim's lock alive while the engine runs, stops at the next step when a progress write
answers that the job was cancelled, and records the outcome: SUCCESS with the PNG bytes (they travel
through Redis to every API replica), a retry (the message goes back to the queue), or FAILURE.
A Redis error is never taken for an outcome: the body retries the call for a while, then hands the message
back to the broker (``Reject(requeue=True)``) rather than let Celery acknowledge a message whose job never
started.

SIGTERM to a pool child while it runs a job (a stop of the worker's whole process group: systemd's default
``KillMode=control-group``, ``kill -TERM -<pgid>``; or Celery's cold shutdown) is a clean stop
(:class:`StopRequests`): the engine is interrupted at once, the job goes back to its place in the queue with
its attempt uncounted, and the message goes back to the broker. Without it the child would exit mid-job and
the job would come back as a worker death, one attempt used.

This module imports no Celery app (the app imports it) and no model code at import time.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import redis
from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded

from imagen.config import Settings
from imagen.errors import JobCancelled
from imagen.jobs import stats
from imagen.jobs.affinity import Affinity
from imagen.jobs.distributed.attempts import Attempts
from imagen.jobs.distributed.outcomes import AttemptOutcome, Claim, ClaimOutcome, ProgressOutcome
from imagen.jobs.distributed.store import RedisJobStore, connect
from imagen.jobs.lifecycle import OwnerToken, timeout_text
from imagen.jobs.types import JobState
from imagen.jobs.worker_numbers import measure

if TYPE_CHECKING:
    from imagen.generation.base import Engine
    from imagen.registry.watch import RegistryWatcher

log = logging.getLogger("imagen.worker")


class LeftForModelHolder(Reject):  # type: ignore[misc]  # celery ships no type hints
    """The message goes back to the queue for an idle worker that holds its job's model (``jobs.affinity``):
    routine on a busy cluster, so Celery's warning for a rejected message (with its traceback) is not written
    for it (``quiet_routine_rejections``)."""


def quiet_routine_rejections(record: logging.LogRecord) -> bool:
    """A filter for Celery's ``celery.app.trace`` logger: False (drop) for a ``LeftForModelHolder``."""
    return not (record.exc_info and isinstance(record.exc_info[1], LeftForModelHolder))

TASK_NAME = "imagen.generate"
HEARTBEAT_S = 2.0
HEARTBEAT_TTL_S = 6.0
# Engine load retries: 2 s, 4 s, ... up to a minute between attempts.
LOAD_RETRY_FIRST_S = 2.0
LOAD_RETRY_MAX_S = 60.0
# A Redis call of the task body (claim, outcome) is retried this long before the body gives up on it:
# long enough for a Redis restart or a short out-of-memory spell.
CLAIM_RETRY_S = 3.0
OUTCOME_RETRY_S = 60.0
# How often a message that finds only unconfirmed submissions waiting looks again.
UNCONFIRMED_POLL_S = 0.02
# How long a worker that handed a message back for an idle holder of its job's model consumes nothing: long
# enough for its main process to leave the queue (app.EngineGate looks every GATE_PERIOD_S), short enough
# that it is back for the next job.
STEP_BACK_S = 1.0
# A finished image that the worker's full scratch disk refused is written again after 0.5 s, 1 s, ... 10 s.
NO_SPACE_FIRST_RETRY_S = 0.5
NO_SPACE_MAX_RETRY_S = 10.0

T = TypeVar("T")


def retry_redis(what: str, call: Callable[[], T], within_s: float) -> T:
    """``call()``, retried on Redis errors with a growing pause (0.2 s to 2 s) for ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    pause = 0.2
    while True:
        try:
            return call()
        except redis.RedisError as exc:
            if time.monotonic() + pause > deadline:
                raise
            log.warning("%s: Redis error (%s: %s); retrying in %.1f s", what, type(exc).__name__, exc, pause)
            time.sleep(pause)
            pause = min(2.0, pause * 2)


class WorkerStopping(BaseException):
    """SIGTERM reached this pool child while its engine ran a job. A ``BaseException``, like
    ``KeyboardInterrupt``: an engine's ``except Exception`` never takes it for a failed generation."""


class StopRequests:
    """SIGTERM while a task body runs (``with StopRequests(...)``): a clean stop, not a death.

    While the engine runs (:meth:`engine_running`) the signal raises :class:`WorkerStopping` at once (as
    Celery's soft time limit raises its exception); elsewhere (a Redis call, recording the outcome) it is
    only noted (``requested``) and the body acts on it at its next step, so no Redis reply is cut in half.
    A SIGTERM once the job's time limit has passed is billiard's hard time limit killing a stuck child: it
    is passed to the handler that was there before (the child exits, the job fails with its timeout).
    """

    def __init__(self, time_limit_s: float) -> None:
        self.requested = False
        self._interruptible = False
        self._deadline = time.monotonic() + time_limit_s
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopRequests:
        # Signal handlers belong to the main thread (a pool child runs its tasks there).
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *_: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if time.monotonic() >= self._deadline and callable(self._previous):
            self._previous(signum, frame)
            return
        self.requested = True
        if self._interruptible:
            self._interruptible = False
            raise WorkerStopping

    @contextmanager
    def engine_running(self) -> Iterator[None]:
        """The part that a SIGTERM interrupts at once."""
        if self.requested:
            raise WorkerStopping
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    @contextmanager
    def shielded(self) -> Iterator[None]:
        """Inside :meth:`engine_running`: a Redis call a SIGTERM must not cut in half (it acts after it)."""
        was = self._interruptible
        self._interruptible = False
        try:
            yield
        finally:
            self._interruptible = was
        if was and self.requested:
            self._interruptible = False
            raise WorkerStopping


class GenerateTask(Task):  # type: ignore[misc]  # celery ships no type hints
    """``imagen.generate``: ``settings`` and ``engine_ready`` are set by ``app.create_worker_app``; the
    instance attributes below are the state of one pool child (set by ``start_process``)."""

    name = TASK_NAME
    settings: ClassVar[Settings]
    # Shared with the worker's main process (created there before the pool forks): 1 once this child's
    # engine is loaded. The main process consumes the queue only while it is up.
    engine_ready: ClassVar[Synchronized[int]]
    # Also shared: 1 while the finished images that no API replica has copied fill ``png_redis_max_bytes``
    # (read by this child at each heartbeat). The main process consumes nothing meanwhile: a job finished
    # now would have no room to wait for its copy.
    backlogged: ClassVar[Synchronized[int]]
    # Also shared: until when (``time.monotonic``) the main process consumes nothing, having handed a message
    # back for an idle worker that holds its job's model (model affinity: ``jobs.affinity``).
    stepping_back_until: ClassVar[Synchronized[float]]

    store: RedisJobStore
    scratch: Path
    engine: Engine | None = None
    load_error: str | None = None
    load_seconds: float | None = None  # how long the engine took to load (heartbeat, for /metrics)
    busy = False  # a job runs here (heartbeat: an idle worker is one that a job may wait for)
    device: dict[str, Any]
    _stopping: threading.Event
    _engine_lock: threading.Lock
    _registry_watcher: RegistryWatcher

    # -- the pool child's life ----------------------------------------------------------------------
    def start_process(self) -> None:
        """In a new pool child: connect, then load the engine and beat in the background."""
        self.engine_ready.value = 0
        assert self.settings.broker_url, "IMAGEN_BROKER_URL is required for a distributed worker"
        client = connect(self.settings.broker_url, connect_timeout=2.0, socket_timeout=10.0, retries=3)
        self.store = RedisJobStore.from_settings(self.settings, client)
        self.scratch = Path(tempfile.mkdtemp(prefix="imagen-worker-"))
        self.engine = None
        self.load_error = None
        self.device = {}
        self._stopping = threading.Event()
        # Held while a job runs and while an operator's model order or a registry change is carried out.
        self._engine_lock = threading.Lock()
        threading.Thread(target=self._load_until_ready, name="imagen-engine-loader", daemon=True).start()
        threading.Thread(target=self._beat_forever, name="imagen-heartbeat", daemon=True).start()

    def stop_process(self) -> None:
        if not hasattr(self, "store"):  # start_process never ran in this process
            return
        self._stopping.set()
        self.engine_ready.value = 0
        try:
            self.store.workers.forget(os.getpid())
        except redis.RedisError as exc:
            log.debug("heartbeat not withdrawn (it expires anyway): %s", exc)
        if self.engine is not None:
            self.engine.close()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def _load_until_ready(self) -> None:
        from imagen.generation.loader import load_engine
        from imagen.registry import load_registry
        from imagen.registry.watch import RegistryWatcher

        pause = LOAD_RETRY_FIRST_S
        attempt = 1
        while not self._stopping.is_set():
            loading = time.perf_counter()
            try:
                registry = load_registry(self.settings.registry_path)
                engine = load_engine(self.settings, registry)
                engine.warm_up()
                self._registry_watcher = RegistryWatcher(
                    self.settings.registry_path,
                    registry=registry,
                    default_model=self.settings.default_model,
                    check_files=self.settings.engine == "diffusers",
                )
            except Exception as exc:
                self.load_error = f"{type(exc).__name__}: {exc}"
                log.error(
                    "engine failed to load (attempt %d): %s; this worker takes no job; next try in %.0f s",
                    attempt,
                    self.load_error,
                    pause,
                )
                self._beat()  # /health shows the error now, not at the next beat
                if self._stopping.wait(pause):
                    return
                pause = min(LOAD_RETRY_MAX_S, pause * 2)
                attempt += 1
                continue
            self.load_seconds = time.perf_counter() - loading
            self.engine = engine
            self.device = asdict(engine.device_info())
            self.load_error = None
            self.engine_ready.value = 1
            self._beat()
            log.info("worker %d ready on %s", os.getpid(), self.device.get("device"))
            self._serve_model_orders(engine)
            return

    def _serve_model_orders(self, engine: Engine) -> None:
        """An operator's load and unload orders, and the registry file's changes (``model_orders.py``)."""
        from imagen.jobs.distributed.model_orders import ModelOrders, serve_orders
        from imagen.watched_files import RELOAD_CHECK_S

        assert self.settings.broker_url
        client = connect(self.settings.broker_url, connect_timeout=2.0, socket_timeout=RELOAD_CHECK_S + 10.0)
        worker = f"{socket.gethostname()}:{os.getpid()}"
        threading.Thread(
            target=serve_orders,
            args=(ModelOrders(client), worker, engine, self._engine_lock, self._registry_watcher, self._stopping,
                  self._beat),
            name="imagen-model-orders",
            daemon=True,
        ).start()

    def _beat(self) -> None:
        info = {
            **self.device,
            "ready": self.engine is not None,
            "error": self.load_error,
            **measure(self.load_seconds, self._model_loads()).as_dict(),  # /metrics: load time, loads, GPU memory
            "models": self._held_models(),  # /health, /models and job routing
            "busy": self.busy,
        }
        try:
            self.store.workers.beat(os.getpid(), info, HEARTBEAT_TTL_S)
        except redis.RedisError as exc:  # the broker may be restarting; the next beat will do
            log.debug("heartbeat failed: %s", exc)

    def _model_loads(self) -> int | None:
        engine = self.engine
        return None if engine is None else engine.model_loads()

    def _held_models(self) -> dict[str, str]:
        engine = self.engine
        if engine is None:
            return {}
        try:
            return dict(engine.held_models())
        except Exception:  # advisory, read from the heartbeat thread: the next beat reads it again
            log.debug("held models not read", exc_info=True)
            return {}

    def _beat_forever(self) -> None:
        while not self._stopping.is_set():
            self._beat()
            self._watch_backlog()
            self._stopping.wait(HEARTBEAT_S)

    def _watch_backlog(self) -> None:
        try:
            full = self.store.pngs.backlog_full()
        except redis.RedisError:
            return  # the broker may be restarting; the next beat looks again
        if full != bool(self.backlogged.value):
            self.backlogged.value = int(full)
            if full:
                log.warning("finished images that no API replica has copied fill Redis "
                            "(IMAGEN_PNG_REDIS_MAX_BYTES): this worker takes no job until copies make room")
            else:
                log.info("images copied: room in Redis again; this worker takes jobs again")

    # -- the task body --------------------------------------------------------------------------------
    def run(self, named_job_id: str) -> None:
        engine = self.engine
        if engine is None:
            # A message delivered while this child's engine is not loaded yet (the previous child was just
            # replaced): give it back untouched, with its whole time limit; the main process stops consuming
            # until the engine is ready (EngineGate).
            raise Reject(f"engine not loaded: {self.load_error or 'loading'}", requeue=True)
        with StopRequests(self.settings.job_timeout_s) as stop:
            self._run(engine, named_job_id, stop)

    def _run(self, engine: Engine, named_job_id: str, stop: StopRequests) -> None:
        me = OwnerToken.new()
        token = str(me)
        ticket = str(self.request.id or named_job_id)
        takeover = claim = self._take_over(named_job_id, token, ticket)
        affinity: Affinity | None = None
        if claim.outcome is not ClaimOutcome.CLAIMED:
            affinity = self._redis(f"message {ticket}: heartbeats", self._affinity)  # once per message
            claim = self._claim_next(token, ticket, named_job_id, affinity)
        # Only submissions not confirmed yet wait: each is confirmed (or withdrawn) within the confirmation
        # window. Wait for that rather than drop a message that one of them may need.
        deadline = time.monotonic() + 2 * self.settings.broker_timeout_s
        while claim.outcome is ClaimOutcome.UNCONFIRMED and time.monotonic() < deadline:
            time.sleep(UNCONFIRMED_POLL_S)
            claim = self._claim_next(token, ticket, named_job_id, affinity)
        if stop.requested and claim.outcome is not ClaimOutcome.CLAIMED:
            raise Reject("worker stopping (SIGTERM)", requeue=True)
        if claim.outcome is ClaimOutcome.DEFERRED:
            # The next job is for a model that an idle worker holds: hand the message back and stay off the
            # queue a moment, so that worker (blocked on the queue) receives it. The job's wait is bounded
            # (IMAGEN_AFFINITY_WAIT_S): past it, this worker takes it like any other.
            self.stepping_back_until.value = time.monotonic() + STEP_BACK_S
            log.debug("message %s: left for an idle worker that holds its job's model", ticket)
            raise LeftForModelHolder("left for an idle worker that holds its model", requeue=True)
        if claim.outcome is not ClaimOutcome.CLAIMED:
            # Nothing waits: the jobs this message was meant for run elsewhere or are over (a duplicate
            # delivery, a job cancelled while it waited, an extra message): drop it.
            log.info("job %s: not run here (%s); message %s started no other job (%s)",
                     named_job_id, takeover.outcome, ticket, claim.outcome)
            return
        self._set_busy(True)
        try:
            self._run_claimed(claim.job_id, token, engine, stop)
        finally:
            self._set_busy(False)

    def _set_busy(self, busy: bool) -> None:
        """Say at once whether a job runs here: the claims of other workers read it (model affinity)."""
        self.busy = busy
        self._beat()

    def _run_claimed(self, job_id: str, token: str, engine: Engine, stop: StopRequests) -> None:
        """Run the job this worker claimed and record how its attempt ended."""
        attempts = self.store.attempts
        retry_reason: str | None = None
        with _LockKeeper(attempts, job_id, token, self.settings.job_lock_ttl_s):
            try:
                result, png, more_pngs = self._generate(engine, job_id, token, stop)
            except WorkerStopping:
                outcome = retry_redis(f"job {job_id}", lambda: attempts.give_back(job_id, token), OUTCOME_RETRY_S)
                given_back = outcome is AttemptOutcome.RETRY
                log.info("job %s: worker stopping (SIGTERM); %s", job_id,
                         "back in the queue, attempt not counted" if given_back else "no longer ours")
                retry_reason = "worker stopping (SIGTERM)"
            except JobCancelled:
                # REVOKED already (by the cancel itself); the message is acknowledged, no PNG was made.
                log.info("job %s: REVOKED; stopped without an image", job_id)
                return
            except SoftTimeLimitExceeded:
                text = timeout_text(self.settings.job_timeout_s)
                # The store logs the event (jobs/stats.py), as for every outcome below.
                retry_redis(f"job {job_id}", lambda: attempts.fail(job_id, token, text), OUTCOME_RETRY_S)
                return
            except Exception as exc:
                retry_reason = self._record_failure(job_id, token, exc)
            else:
                stored = retry_redis(
                    f"job {job_id}", lambda: attempts.complete(job_id, token, result, png, more_pngs), OUTCOME_RETRY_S
                )
                if not stored:
                    log.warning("job %s: finished after losing its claim; result discarded", job_id)
        if retry_reason is not None:
            # Back to the broker's queue: the same message, acknowledged only when an attempt ends the job.
            raise Reject(retry_reason, requeue=True)

    def _take_over(self, named_job_id: str, token: str, ticket: str) -> Claim:
        """A redelivered message (its worker died: SIGKILLed pool child, lost connection) resumes the job it
        had started, if that one is still running with a dead owner; a first delivery, the job it names in
        that same case only. Anything else (running with a live owner, waiting, over): not claimed here."""
        started = self._redis(f"message {ticket}: read", self.store.jobs.running_tickets)
        job_id = started.get(ticket, named_job_id)
        claim = self._claim(job_id, token, ticket)
        if claim.outcome is ClaimOutcome.BUSY and claim.holder:
            holder = OwnerToken.parse(claim.holder)
            if holder is not None and holder.process_is_gone():  # a pool child of this host, SIGKILLed
                claim = self._claim(job_id, token, ticket, steal_from=claim.holder)
        return claim

    def _claim(self, job_id: str, token: str, ticket: str, steal_from: str = "") -> Claim:
        return self._redis(
            f"job {job_id}: claim",
            lambda: self.store.attempts.claim(
                job_id,
                token,
                max_attempts=self.settings.max_attempts,
                lock_ttl_s=self.settings.job_lock_ttl_s,
                timeout_s=self.settings.job_timeout_s,
                steal_from=steal_from,
                ticket=ticket,
                expect="running",
            ),
        )

    def _claim_next(self, token: str, ticket: str, named_job_id: str, affinity: Affinity | None) -> Claim:
        return self._redis(
            f"message {ticket}: claim",
            lambda: self.store.attempts.claim_next(
                token,
                ticket=ticket,
                named=named_job_id,
                max_attempts=self.settings.max_attempts,
                lock_ttl_s=self.settings.job_lock_ttl_s,
                timeout_s=self.settings.job_timeout_s,
                affinity=affinity,
            ),
        )

    def _affinity(self) -> Affinity | None:
        """The models held here and by the other ready, idle workers (their heartbeats); None: plain fair order."""
        if not self.settings.affinity:
            return None
        me = (socket.gethostname(), os.getpid())
        idle_holders = frozenset(
            model
            for beat in self.store.workers.alive()
            if (beat.get("host"), beat.get("pid")) != me and beat.get("ready") and not beat.get("busy")
            for model in beat.get("models") or {}
        )
        return Affinity(frozenset(self._held_models()), idle_holders, self.settings.affinity_wait_s)

    @staticmethod
    def _redis(what: str, call: Callable[[], T]) -> T:
        """A Redis call made before any job started, retried for ``CLAIM_RETRY_S``."""
        try:
            return retry_redis(what, call, CLAIM_RETRY_S)
        except redis.RedisError as exc:
            # Never acknowledge a message that did not start a job: it goes back to the queue.
            log.warning("%s failed (%s); message back to the queue", what, exc)
            raise Reject(f"claim failed: {exc}", requeue=True) from exc

    def _generate(
        self, engine: Engine, job_id: str, token: str, stop: StopRequests
    ) -> tuple[dict[str, Any], bytes, dict[str, bytes]]:
        """Run the job here; its result, its first PNG and (num_images > 1) the others by file name."""
        from imagen.generation.base import GenerationTask, JobProgress, StepMeter, denoising_steps
        from imagen.generation.runner import run_task
        from imagen.jobs.model_control import follow_registry

        record = retry_redis(f"job {job_id}: read", lambda: self.store.jobs.get(job_id), OUTCOME_RETRY_S)
        assert record is not None
        stats.on_started(record)
        task = GenerationTask.from_dict(record.task)
        meter, whole_job = StepMeter(max(1, denoising_steps(task))), JobProgress()
        last: list[tuple[str, int]] = []
        attempts = self.store.attempts

        def progress(step: str, percent: int) -> None:
            value = (step, max(0, min(100, int(percent))))
            if not last or last[-1] != value:
                last[:] = [value]
                try:
                    with stop.shielded():
                        outcome = attempts.report_progress(job_id, token, step, whole_job(*value), meter(*value))
                except redis.RedisError as exc:  # progress is advisory; never fail a generation for it
                    log.debug("job %s: progress not recorded: %s", job_id, exc)
                    return
                if outcome is ProgressOutcome.CANCELLED:  # the write itself says so: no extra round trip per step
                    raise JobCancelled

        def preview(step: int, jpeg: bytes) -> None:
            try:
                with stop.shielded():
                    attempts.publish_preview(job_id, step, jpeg)
            except redis.RedisError as exc:  # a preview is advisory too
                log.debug("job %s: preview not published: %s", job_id, exc)

        inputs = retry_redis(f"job {job_id}: inputs", lambda: self.store.jobs.inputs(job_id), OUTCOME_RETRY_S)
        # Rendered in a private folder: the API replicas get the bytes through Redis, not through this disk.
        delay = NO_SPACE_FIRST_RETRY_S

        def wait_for_space(exc: OSError) -> None:
            # This worker's scratch disk is full: the finished image is kept and written again (a cancel or a
            # stop ends the wait; the job's time limit bounds it).
            nonlocal delay
            log.warning("job %s: the worker's scratch disk is full (%s: %s); its image is written again in "
                        "%.1f s", job_id, self.scratch, exc, delay)
            time.sleep(delay)
            delay = min(NO_SPACE_MAX_RETRY_S, delay * 2)
            try:
                with stop.shielded():
                    current = self.store.jobs.get(job_id)
            except redis.RedisError:
                return
            if current is not None and current.state is JobState.REVOKED:
                raise JobCancelled

        with self._engine_lock, stop.engine_running():
            follow_registry(engine, self._registry_watcher)  # a model the API has just read must be found here
            result = run_task(
                engine,
                task,
                record.output_name,
                self.scratch,
                progress,
                self.settings.png_compress_level,
                preview,
                inputs,
                on_no_space=wait_for_space,
            )
        names = [image["filename"] for image in result.get("images", [])] or [record.output_name]
        pngs: dict[str, bytes] = {}
        try:
            for name in names:
                pngs[name] = (self.scratch / name).read_bytes()
        finally:
            for name in names:
                (self.scratch / name).unlink(missing_ok=True)
        # Where each API replica will have it (the image transfer copies it there).
        result["path"] = os.path.join(str(self.settings.outputs_dir), record.output_name)
        for image in result.get("images", []):
            image["path"] = os.path.join(str(self.settings.outputs_dir), image["filename"])
        first = pngs.pop(record.output_name)
        return result, first, pngs

    def _record_failure(self, job_id: str, token: str, exc: Exception) -> str | None:
        """Record a failed attempt; the reason when the job goes back to the queue."""
        from imagen.generation.runner import classify_failure

        retryable, text = classify_failure(exc)
        if retryable:
            max_attempts = self.settings.max_attempts
            outcome = retry_redis(
                f"job {job_id}",
                lambda: self.store.attempts.retry_or_fail(job_id, token, text, max_attempts),
                OUTCOME_RETRY_S,
            )
            return text if outcome is AttemptOutcome.RETRY else None
        retry_redis(f"job {job_id}", lambda: self.store.attempts.fail(job_id, token, text), OUTCOME_RETRY_S)
        return None


class _LockKeeper:
    """Renews the job's lock while it runs, so other workers know its owner is alive."""

    def __init__(self, attempts: Attempts, job_id: str, token: str, ttl_s: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(attempts, job_id, token, ttl_s), name=f"lock-{job_id[:8]}", daemon=True
        )

    def _run(self, attempts: Attempts, job_id: str, token: str, ttl_s: float) -> None:
        while not self._stop.wait(ttl_s / 3):
            try:
                if not attempts.renew_lock(job_id, token, ttl_s):
                    log.warning("job %s: lock lost (taken as dead?); its result will be discarded", job_id)
                    return
            except redis.RedisError as exc:
                log.warning("job %s: lock renewal failed: %s", job_id, exc)

    def __enter__(self) -> _LockKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
