"""The child process that runs an engine for the embedded backend.

It builds the engine once, says ``ready``, then runs one task per ``run`` message, streaming progress.
Model code (torch, diffusers) lives only here: a crash, hang or OOM kill in it never takes the API down.
Messages (tuples over a ``multiprocessing`` pipe):

    parent -> child: ("run", task: dict, output_name: str) | ("stop",)
    child -> parent: ("ready", device: dict) | ("startup_failed", message)
                     ("progress", step, percent) | ("done", result) | ("error", retryable, message)
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import threading
import time
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

from imagen.config import Settings
from imagen.generation.base import GenerationTask
from imagen.generation.loader import load_engine
from imagen.generation.runner import classify_failure, run_task
from imagen.registry import load_registry

log = logging.getLogger("imagen.worker")

PR_SET_PDEATHSIG = 1


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
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(**settings_data)
    try:
        registry = load_registry(settings.registry_path)
        engine = load_engine(settings, registry)
        engine.warm_up()
        conn.send(("ready", asdict(engine.device_info())))
    except Exception as exc:
        log.exception("engine failed to start")
        conn.send(("startup_failed", f"{type(exc).__name__}: {exc}"))
        return

    def progress(step: str, percent: int) -> None:
        conn.send(("progress", step, max(0, min(100, int(percent)))))

    while True:
        try:
            message = conn.recv()
        except EOFError:
            break
        if message[0] != "run":
            break
        _, task_data, output_name = message
        try:
            result = run_task(
                engine,
                GenerationTask.from_dict(task_data),
                output_name,
                settings.outputs_dir,
                progress,
                settings.png_compress_level,
            )
        except Exception as exc:
            retryable, text = classify_failure(exc)
            log.warning("job failed (%s): %s", "retryable" if retryable else "fatal", text)
            conn.send(("error", retryable, text))
        else:
            conn.send(("done", result))
    engine.close()
