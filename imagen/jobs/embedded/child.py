"""The child process that runs an engine for one worker slot of the embedded backend.

It builds the engine once and says :class:`Ready` (or :class:`StartupFailed`), then runs one task per
:class:`RunJob`, streaming :class:`Progress` and ending each with :class:`Done` or :class:`Failed` (or
:class:`Cancelled` after a :class:`Cancel`, read at each progress report), until :class:`Stop` or the end of
the pipe. Model code (torch, diffusers) lives only here: a crash, hang or OOM kill in it never takes the API
down. The messages are in ``messages.py``.

A full outputs disk costs a wait, not the work: the finished image stays here and is written again with a
growing delay (:class:`NoSpace` each time) until there is room, or the job is cancelled or the child stopped.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from imagen.config import Settings
from imagen.errors import JobCancelled
from imagen.generation.base import GenerationTask, JobProgress, ProgressCallback, StepMeter, denoising_steps
from imagen.generation.loader import load_engine
from imagen.generation.runner import classify_failure, run_task
from imagen.jobs.embedded.messages import (
    Cancel,
    Cancelled,
    ChangeModels,
    Done,
    Failed,
    FromChild,
    ModelsChanged,
    NoSpace,
    Preview,
    Progress,
    ProtocolError,
    Ready,
    RunJob,
    StartupFailed,
    Stop,
    WorkerReport,
)
from imagen.jobs.model_control import ModelOrder, apply_order, follow_registry
from imagen.jobs.worker_numbers import measure
from imagen.logs import configure_logging
from imagen.registry import load_registry
from imagen.registry.watch import RegistryWatcher
from imagen.watched_files import RELOAD_CHECK_S

log = logging.getLogger("imagen.worker")

PR_SET_PDEATHSIG = 1
# A finished image that the full outputs disk refused is written again after 0.5 s, 1 s, 2 s, ... 10 s.
NO_SPACE_FIRST_RETRY_S = 0.5
NO_SPACE_MAX_RETRY_S = 10.0


def _die_with_parent() -> None:
    """Never outlive the API process: an orphan would finish a job the next start runs again."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the watcher thread below still works
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch() -> None:  # portable fallback
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def worker_main(conn: Connection, settings_data: dict[str, Any]) -> None:
    _die_with_parent()
    # Ctrl-C and a stop of the whole process group (systemd's default ``KillMode=control-group``, ``kill -TERM
    # -<pgid>``) are the API process's to handle: it stops this child itself and puts the running job back
    # without counting an attempt. Dying here first would look like a crash and count one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    settings = Settings(**settings_data)
    configure_logging(settings.log_format)

    def send(message: FromChild) -> None:
        conn.send(message)

    loading = time.perf_counter()
    try:
        registry = load_registry(settings.registry_path)
        engine = load_engine(settings, registry)
        engine.warm_up()
        watcher = RegistryWatcher(
            settings.registry_path,
            registry=registry,
            default_model=settings.default_model,
            check_files=settings.engine == "diffusers",
        )
    except Exception as exc:
        log.exception("engine failed to start")
        send(StartupFailed(f"{type(exc).__name__}: {exc}"))
        return
    load_seconds = time.perf_counter() - loading

    def report() -> WorkerReport:
        return WorkerReport(measure(load_seconds, engine.model_loads()), engine.held_models())

    send(report())
    send(Ready(engine.device_info()))

    def progress_for(task: GenerationTask) -> ProgressCallback:
        meter, whole_job = StepMeter(max(1, denoising_steps(task))), JobProgress()

        def progress(step: str, percent: int) -> None:
            percent = max(0, min(100, int(percent)))
            send(Progress(step, whole_job(step, percent), meter(step, percent)))
            while conn.poll():  # never blocks: a select() on the pipe
                match conn.recv():
                    case Cancel():
                        raise JobCancelled
                    case other:
                        raise ProtocolError(f"unexpected message during a job: {other!r:.200}")

        return progress

    def space_wait() -> Callable[[OSError], None]:
        """For one job: wait before writing its image again, listening for a ``Cancel`` meanwhile."""
        delay = NO_SPACE_FIRST_RETRY_S

        def wait(exc: OSError) -> None:
            nonlocal delay
            send(NoSpace(str(exc), delay))
            if conn.poll(delay):
                match conn.recv():
                    case Cancel():
                        raise JobCancelled
                    case other:
                        raise ProtocolError(f"unexpected message during a job: {other!r:.200}")
            delay = min(NO_SPACE_MAX_RETRY_S, delay * 2)

        return wait

    def follow() -> bool:
        """The registry file's changes, between jobs: new models served, removed ones freed. True when the
        registry changed."""
        try:
            return follow_registry(engine, watcher) is not None
        except Exception:
            log.exception("could not follow the registry file's change")
            return False

    while True:
        try:
            if not conn.poll(RELOAD_CHECK_S):  # idle: look at the registry file meanwhile
                if follow():
                    send(report())  # the models it freed leave /health now, not after its next job
                continue
            message = conn.recv()
        except EOFError:
            break
        match message:
            case RunJob(task=dict() as task_data, output_name=str() as output_name, inputs=dict() as inputs):
                follow()  # a job for a model the API has just read must find it here
                try:
                    task = GenerationTask.from_dict(task_data)
                    result = run_task(
                        engine,
                        task,
                        output_name,
                        settings.outputs_dir,
                        progress_for(task),
                        settings.png_compress_level,
                        preview=lambda step, jpeg: send(Preview(step, jpeg)),
                        inputs=inputs,
                        on_no_space=space_wait(),
                    )
                except JobCancelled:
                    log.info("job cancelled; stopped without an image")
                    send(report())
                    send(Cancelled())
                except Exception as exc:
                    retryable, text = classify_failure(exc)
                    log.warning("job failed (%s): %s", "retryable" if retryable else "fatal", text)
                    send(report())
                    send(Failed(text, retryable))
                else:
                    send(report())
                    send(Done(result))
            case Cancel():
                pass  # its job ended before the cancel was read
            case ChangeModels(order=ModelOrder() as order):
                follow()
                error: str | None = None
                try:
                    apply_order(engine, order)
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    log.warning("model order %s %s not done: %s", order.action, order.model_id or "(all)", error)
                send(report())
                send(ModelsChanged(error))
            case Stop():
                break
            case _:
                log.error("unexpected message from the API process, exiting: %r", message)
                break
    engine.close()
