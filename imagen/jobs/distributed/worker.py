"""``imagen worker``: one Celery worker per GPU, one job at a time.

The worker's main process only talks to the broker; its single pool child (prefork, concurrency 1) loads
the engine once and runs the jobs. Prefork rather than solo so the time limits work (the parent kills a
child stuck past the hard limit) and a child killed mid-job is replaced while its message is requeued.

The worker starts with the job queue excluded: it consumes ``imagen`` only once its pool child has
loaded the engine (``app.EngineGate``), so a worker that cannot load it (a model file missing on this
host) takes no job while it retries. The main process also runs the housekeeper (``reaper.py``: jobs of
dead workers and jobs without a message go back to the queue), so jobs keep moving with no API replica up.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery import Celery, signals

from imagen.config import Settings
from imagen.jobs.distributed.app import QUEUE, create_worker_app, republish
from imagen.jobs.distributed.reaper import Housekeeper
from imagen.jobs.distributed.store import RedisJobStore, connect
from imagen.jobs.distributed.task import quiet_routine_rejections
from imagen.logs import configure_logging

log = logging.getLogger("imagen.worker")


def node_name(gpu: str | None) -> str:
    """Unique per worker: one per GPU on a host, or per process when no GPU is named."""
    host = socket.gethostname()
    return f"imagen-gpu{gpu}@{host}" if gpu is not None else f"imagen-{os.getpid()}@{host}"


def run_worker(settings: Settings, gpu: str | int | None = None) -> int:
    """Run a worker until it is stopped; ``gpu`` (else ``settings.worker_gpu``) is a CUDA device index."""
    device = str(gpu) if gpu is not None else settings.worker_gpu
    if device is not None:
        # Before anything imports torch (the engine is loaded in the pool child, which inherits this).
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    if not settings.broker_url:
        log.error("imagen worker needs IMAGEN_BROKER_URL (e.g. redis://localhost:6379/0)")
        return 2
    configure_logging(settings.log_format)
    # Celery leaves logging alone when this signal has a receiver: its lines keep our format (JSON or text).
    signals.setup_logging.connect(_keep_logging, weak=False)
    logging.getLogger("celery.app.trace").addFilter(quiet_routine_rejections)
    app = create_worker_app(settings)

    def start_housekeeper(**_: Any) -> None:
        _start_housekeeper(settings, app)

    signals.worker_ready.connect(start_housekeeper, weak=False)
    app.worker_main(
        [
            *(["--quiet"] if settings.log_format == "json" else []),  # no banner: only JSON lines on stderr
            "worker",
            "--pool=prefork",
            "--concurrency=1",
            "--prefetch-multiplier=1",
            f"--hostname={node_name(device)}",
            f"--exclude-queues={QUEUE}",  # until the engine is loaded (EngineGate)
            "--loglevel=INFO",
            "--without-mingle",  # no start-up wait for other nodes; nothing here relies on their state
            "--without-gossip",
        ]
    )
    return 0


def _keep_logging(**_: Any) -> None:
    """Receiver of Celery's ``setup_logging``: ``configure_logging`` did it."""


def _start_housekeeper(settings: Settings, app: Celery) -> Housekeeper:
    assert settings.broker_url
    store = RedisJobStore.from_settings(settings, connect(settings.broker_url))
    housekeeper = Housekeeper(settings, store, lambda job_id: republish(app, job_id), QUEUE)
    housekeeper.start()
    return housekeeper
