"""What runs inside a Celery worker: the engine of this process, the job task body, heartbeats, the reaper.

A worker's pool child builds its engine once (``init_process``, on ``worker_process_init``) and keeps it
for every job. ``execute`` claims the job in its Redis record (or drops a duplicate delivery), keeps the
claim's lock alive while the engine runs, and records the outcome: SUCCESS with the PNG bytes (they travel
through Redis to every API replica), a retry (the message goes back to the queue), or FAILURE.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery.exceptions import Reject, SoftTimeLimitExceeded

from imagen.config import Settings
from imagen.jobs.distributed.store import RedisJobStore, connect
from imagen.jobs.lifecycle import pid_alive

if TYPE_CHECKING:
    from celery import Celery

    from imagen.generation.base import Engine

log = logging.getLogger("imagen.worker")

HEARTBEAT_S = 2.0
HEARTBEAT_TTL_S = 6.0
HOSTNAME = socket.gethostname()


class _Process:
    """The state of one pool child."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        assert settings.broker_url, "IMAGEN_BROKER_URL is required for a distributed worker"
        client = connect(settings.broker_url, connect_timeout=2.0, socket_timeout=10.0, retries=3)
        self.store = RedisJobStore(client, result_ttl_s=settings.result_ttl_s)
        self.scratch = Path(tempfile.mkdtemp(prefix="imagen-worker-"))
        self.engine: Engine | None = None
        self.device: dict[str, Any] = {}
        self.startup_error: str | None = None
        self.stopping = threading.Event()
        self.heartbeat: threading.Thread | None = None

    def load_engine(self) -> Engine:
        if self.engine is None:
            from imagen.generation.loader import load_engine
            from imagen.registry import load_registry

            engine = load_engine(self.settings, load_registry(self.settings.registry_path))
            engine.warm_up()
            self.engine = engine
            self.device = asdict(engine.device_info())
            self.startup_error = None
            # Beat only once an engine is loaded: /health's gpu_available reports workers able to run jobs.
            self.heartbeat = threading.Thread(target=self.beat_forever, name="imagen-heartbeat", daemon=True)
            self.heartbeat.start()
        return self.engine

    def beat_forever(self) -> None:
        pid = os.getpid()
        while True:
            try:
                self.store.beat(pid, self.device, HEARTBEAT_TTL_S)
            except Exception as exc:  # the broker may be restarting; keep beating
                log.debug("heartbeat failed: %s", exc)
            if self.stopping.wait(HEARTBEAT_S):
                return


_process: _Process | None = None


def init_process(settings: Settings) -> None:
    global _process
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = _Process(settings)
    _process = state
    try:
        state.load_engine()
        log.info("worker %d ready on %s", os.getpid(), state.device.get("device"))
    except Exception as exc:
        state.startup_error = f"{type(exc).__name__}: {exc}"
        log.exception("engine failed to load; jobs will fail with this error until it loads")


def shutdown_process() -> None:
    state = _process
    if state is None:
        return
    state.stopping.set()
    with contextlib.suppress(Exception):
        state.store.forget_worker(os.getpid())
    if state.engine is not None:
        state.engine.close()
    shutil.rmtree(state.scratch, ignore_errors=True)


def _holder_is_dead_here(holder: str) -> bool:
    """A lock held by a process of this host that no longer exists (a pool child that was SIGKILLed):
    no need to wait for the lock to expire."""
    host, _, rest = holder.partition("|")
    pid_text = rest.partition("|")[0]
    if host != HOSTNAME or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    return pid != os.getpid() and not pid_alive(pid)


class _LockKeeper:
    """Renews the job's lock while it runs, so other workers know its owner is alive."""

    def __init__(self, store: RedisJobStore, job_id: str, token: str, ttl_s: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(store, job_id, token, ttl_s), name=f"lock-{job_id[:8]}", daemon=True
        )

    def _run(self, store: RedisJobStore, job_id: str, token: str, ttl_s: float) -> None:
        while not self._stop.wait(ttl_s / 3):
            try:
                if not store.renew_lock(job_id, token, ttl_s):
                    log.warning("job %s: lock lost (taken as dead?); its result will be discarded", job_id)
                    return
            except Exception as exc:
                log.warning("job %s: lock renewal failed: %s", job_id, exc)

    def __enter__(self) -> _LockKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def execute(job_id: str) -> None:
    """The body of ``imagen.generate``."""
    state = _process
    if state is None:  # a worker started without our worker_process_init (e.g. the solo pool)
        init_process(_settings_from_app())
        state = _process
        assert state is not None
    settings, store = state.settings, state.store
    token = f"{HOSTNAME}|{os.getpid()}|{uuid.uuid4().hex[:12]}"
    options: dict[str, Any] = {
        "max_attempts": settings.max_attempts,
        "lock_ttl_s": settings.job_lock_ttl_s,
        "timeout_s": settings.job_timeout_s,
    }
    claim = store.claim(job_id, token, **options)
    if claim.outcome == "busy" and claim.holder and _holder_is_dead_here(claim.holder):
        claim = store.claim(job_id, token, steal_from=claim.holder, **options)
    if claim.outcome != "claimed":
        # A duplicate delivery (visibility timeout, requeue after a lost worker) of a job that is running
        # elsewhere or already over: drop it. The reaper requeues the job if its worker dies later.
        log.info("job %s: not run here (%s)", job_id, claim.outcome)
        return
    log.info("job %s: attempt %d started", job_id, claim.attempts)
    retry_reason: str | None = None
    with _LockKeeper(store, job_id, token, settings.job_lock_ttl_s):
        try:
            result, png = _generate(state, job_id, token)
        except SoftTimeLimitExceeded:
            store.fail(job_id, token, f"Timeout: generation took longer than {settings.job_timeout_s:g} s")
            log.warning("job %s: timed out", job_id)
            return
        except Exception as exc:
            retry_reason = _record_failure(store, settings, job_id, token, exc)
        else:
            if store.complete(job_id, token, result, png):
                log.info("job %s: SUCCESS %s", job_id, result["filename"])
            else:
                log.warning("job %s: finished after losing its claim; result discarded", job_id)
    if retry_reason is not None:
        # Back to the broker's queue: the same message, acknowledged only when an attempt ends the job.
        raise Reject(retry_reason, requeue=True)


def _generate(state: _Process, job_id: str, token: str) -> tuple[dict[str, Any], bytes]:
    from imagen.generation.base import GenerationTask
    from imagen.generation.runner import run_task

    record = state.store.get(job_id)
    assert record is not None
    engine = state.load_engine()
    last: list[tuple[str, int]] = []

    def progress(step: str, progress: int) -> None:
        value = (step, max(0, min(100, int(progress))))
        if not last or last[-1] != value:
            last[:] = [value]
            try:
                state.store.report_progress(job_id, token, *value)
            except Exception as exc:  # progress is advisory; never fail a generation for it
                log.debug("job %s: progress not recorded: %s", job_id, exc)

    # Rendered in a private folder: the API replicas get the bytes through Redis, not through this disk.
    result = run_task(
        engine,
        GenerationTask.from_dict(record.task),
        record.output_name,
        state.scratch,
        progress,
        state.settings.png_compress_level,
    )
    path = state.scratch / record.output_name
    try:
        png = path.read_bytes()
    finally:
        path.unlink(missing_ok=True)
    result["path"] = os.path.join(str(state.settings.outputs_dir), record.output_name)
    return result, png


def _record_failure(store: RedisJobStore, settings: Settings, job_id: str, token: str, exc: Exception) -> str | None:
    """Record a failed attempt; the reason when the job goes back to the queue."""
    from imagen.generation.runner import classify_failure

    retryable, text = classify_failure(exc)
    if retryable:
        outcome = store.retry_or_fail(job_id, token, text, settings.max_attempts)
        log.warning("job %s: %s; %s", job_id, text, outcome)
        return text if outcome == "retry" else None
    store.fail(job_id, token, text)
    log.warning("job %s: FAILURE %s", job_id, text)
    return None


def _settings_from_app() -> Settings:
    from imagen.jobs.distributed import app as celery_app

    return celery_app.worker_settings


def start_reaper(settings: Settings, app: Celery) -> threading.Thread:
    """In the worker's main process: requeue the jobs of workers that died (lock expired)."""
    period = max(0.2, min(5.0, settings.job_lock_ttl_s / 3))

    def reap_forever() -> None:
        store: RedisJobStore | None = None
        while True:
            try:
                if store is None:
                    assert settings.broker_url
                    store = RedisJobStore(connect(settings.broker_url), result_ttl_s=settings.result_ttl_s)
                for job_id in store.reap_orphans(max_attempts=settings.max_attempts, timeout_s=settings.job_timeout_s):
                    log.warning("job %s: its worker died; back in the queue", job_id)
                    from imagen.jobs.distributed.app import publish

                    publish(app, job_id)
            except Exception as exc:
                log.debug("reaper pass failed: %s", exc)
            threading.Event().wait(period)

    thread = threading.Thread(target=reap_forever, name="imagen-reaper", daemon=True)
    thread.start()
    return thread
