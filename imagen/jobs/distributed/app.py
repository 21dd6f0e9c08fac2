"""The Celery application of the distributed backend and its one task, ``imagen.generate``.

Point Celery's own tools at it: ``celery -A imagen.jobs.distributed.app inspect ping``, ``celery -A
imagen.jobs.distributed.app flower`` (with ``IMAGEN_BROKER_URL`` set). The module imports no model code: the
task body (``celery_runtime``) loads the engine inside worker processes only.

Delivery guarantees come from the broker settings below (late acks, one message per worker, requeue on a
lost worker); "never twice at once" and "at most ``max_attempts``" come from the job record in Redis
(``redis_store``), because Redis redelivers a message that stays unacknowledged past the visibility timeout.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from imagen.config import Settings, get_settings

TASK_NAME = "imagen.generate"
QUEUE = "imagen"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
# The soft limit (job_timeout_s) fails the job cleanly; the hard one, a little later, kills a child stuck in C
# code (its job then fails with the same timeout error, see redis_store's reaper).
HARD_LIMIT_GRACE_S = 10.0


def create_celery(settings: Settings) -> Celery:
    app = Celery("imagen", broker=settings.broker_url or DEFAULT_BROKER, set_as_current=False)
    configure(app, settings)

    app.task(name=TASK_NAME)(_generate)
    return app


def _generate(job_id: str) -> None:
    from imagen.jobs.distributed.task import execute  # worker processes only

    execute(job_id)


def configure(app: Celery, settings: Settings) -> None:
    visibility = settings.broker_visibility_timeout_s
    app.conf.update(
        broker_url=settings.broker_url or DEFAULT_BROKER,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=2.0,
        broker_transport_options={
            "visibility_timeout": visibility,
            # scan for messages of dead workers every min(10 s, visibility timeout)
            "unacked_restore_interval": max(0.5, min(10.0, visibility)),
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 2.0,
            "socket_timeout": 10.0,
            "socket_keepalive": True,
        },
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_soft_time_limit=settings.job_timeout_s,
        task_time_limit=settings.job_timeout_s + min(HARD_LIMIT_GRACE_S, settings.job_timeout_s),
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_max_tasks_per_child=None,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )


def publish(app: Celery, job_id: str) -> None:
    """Send the message that makes a worker run ``job_id`` (a few quick retries, then raise)."""
    policy = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
    app.send_task(TASK_NAME, args=[job_id], task_id=job_id, queue=QUEUE, retry=True, retry_policy=policy)


# The app ``celery -A imagen.jobs.distributed.app`` and ``imagen worker`` use; settings from IMAGEN_* variables.
worker_settings: Settings = get_settings()
app = create_celery(worker_settings)


def _load_engine(**_: Any) -> None:
    from imagen.jobs.distributed.task import init_process

    init_process(worker_settings)


def _unload_engine(**_: Any) -> None:
    from imagen.jobs.distributed.task import shutdown_process

    shutdown_process()


def _start_reaper(sender: Any = None, **_: Any) -> None:
    from imagen.jobs.distributed.task import start_reaper

    start_reaper(worker_settings, app)


signals.worker_process_init.connect(_load_engine, weak=False)
signals.worker_process_shutdown.connect(_unload_engine, weak=False)
signals.worker_ready.connect(_start_reaper, weak=False)
