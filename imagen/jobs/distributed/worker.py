"""``imagen worker``: one Celery worker per GPU, one job at a time.

The worker's main process only talks to the broker; its single pool child (prefork, concurrency 1) loads
the engine once and runs the jobs. Prefork rather than solo so the time limits work (the parent kills a
child stuck past the hard limit) and a child killed mid-job is replaced while its message is requeued.
"""

from __future__ import annotations

import logging
import os
import socket

from imagen.config import Settings

log = logging.getLogger("imagen.worker")


def node_name(gpu: str | None) -> str:
    """Unique per worker: one per GPU on a host, or per process when no GPU is named."""
    host = socket.gethostname()
    return f"imagen-gpu{gpu}@{host}" if gpu is not None else f"imagen-{os.getpid()}@{host}"


def run_worker(settings: Settings, concurrency_gpu: str | int | None = None) -> int:
    gpu = str(concurrency_gpu) if concurrency_gpu is not None else settings.worker_gpu
    if gpu is not None:
        # Before anything imports torch (the engine is loaded in the pool child, which inherits this).
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    if not settings.broker_url:
        log.error("imagen worker needs IMAGEN_BROKER_URL (e.g. redis://localhost:6379/0)")
        return 2
    from imagen.jobs.distributed import app as module

    module.worker_settings = settings
    module.configure(module.app, settings)
    module.app.worker_main(
        [
            "worker",
            "--pool=prefork",
            "--concurrency=1",
            "--prefetch-multiplier=1",
            f"--hostname={node_name(gpu)}",
            f"--queues={module.QUEUE}",
            "--loglevel=INFO",
            "--without-mingle",  # no start-up wait for other nodes; nothing here relies on their state
            "--without-gossip",
        ]
    )
    return 0
