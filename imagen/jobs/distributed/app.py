"""The Celery application of the distributed backend, built by functions (nothing is built at import).

- ``create_celery(settings)``: the configured app, enough to publish (the API) or to inspect workers.
- ``create_worker_app(settings)``: the same with the task ``imagen.generate`` (``task.GenerateTask``), its
  per-process hooks and the consumer step that keeps a worker off the queue until its engine is loaded.
- ``celery_app``: a lazy attribute for Celery's own tools, built from the ``IMAGEN_*`` variables on first
  use: ``celery -A imagen.jobs.distributed.app:celery_app inspect ping`` (or ``... flower``).

Delivery guarantees come from the broker settings below (late acks, one message per worker, requeue on a
lost worker); "never twice at once" and "at most ``max_attempts``" come from the job record in Redis
(``attempts.py``), because Redis redelivers a message that stays unacknowledged past the visibility timeout.
A worker survives any Redis error: its broker transport counts every Redis error (out of memory, a
read-only replica, ...) as a lost connection, which Celery answers by reconnecting with a backoff instead
of exiting.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
import uuid
from typing import Any

import redis
from celery import Celery, bootsteps, signals
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from imagen.config import Settings, get_settings
from imagen.jobs.distributed.task import TASK_NAME, GenerateTask

QUEUE = "imagen"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
# The soft limit (job_timeout_s) fails the job cleanly; the hard one, a little later, kills a child stuck in C
# code (its job then fails with the same timeout error, see ``Attempts.reap_orphans``).
HARD_LIMIT_GRACE_S = 10.0
# How often a worker's main process checks whether its pool child's engine is loaded (or it steps back).
GATE_PERIOD_S = 0.2

log = logging.getLogger("imagen.worker")
__all__ = ["QUEUE", "TASK_NAME", "create_celery", "create_worker_app", "publish", "republish"]


class ResilientQoS(kombu_redis.QoS):
    """An acknowledgement that Redis refuses (out of memory at ``maxmemory``) still frees the worker's one
    prefetch slot. Kombu's own ack stops at the refused write and keeps the message counted as in flight
    forever: with one message at a time, the worker then never takes another. The message's "unacked"
    record stays in Redis; after the visibility timeout it is delivered again and the claim drops it (its
    job is over)."""

    def ack(self, delivery_tag: str) -> None:
        try:
            self._remove_from_indices(delivery_tag).execute()  # type: ignore[no-untyped-call]
        except redis.RedisError as exc:
            log.warning("message %s: acknowledgement refused by Redis (%s); it will come back and be dropped",
                        delivery_tag, exc)
        virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]


class ResilientChannel(kombu_redis.Channel):
    QoS = ResilientQoS


class ResilientRedisTransport(kombu_redis.Transport):
    """Kombu's Redis transport, for which every Redis error is a connection error. Kombu counts only socket
    errors as such: an ``OutOfMemoryError`` while acknowledging a message (Redis at ``maxmemory``) escaped
    Celery's consumer and stopped the worker for good ("Unrecoverable error")."""

    Channel = ResilientChannel
    connection_errors = (*kombu_redis.Transport.connection_errors, redis.RedisError)


def create_celery(settings: Settings) -> Celery:
    app = Celery("imagen", set_as_current=False)
    configure(app, settings)
    return app


def configure(app: Celery, settings: Settings) -> None:
    broker_url = settings.broker_url or DEFAULT_BROKER
    visibility = settings.broker_visibility_timeout_s
    app.conf.update(
        broker_url=broker_url,
        broker_transport=ResilientRedisTransport if broker_url.startswith(("redis://", "rediss://")) else None,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits for its broker as long as it takes
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


def publish(app: Celery, job_id: str, message_id: str | None = None) -> None:
    """Send a message (a ticket) that makes a worker start the fair queue's next job; it names ``job_id``,
    which it takes over should that job be running with a dead owner (a few quick retries, then raise).
    A job's first message has the job's id; later ones (``republish``) a new one, so that each message id
    names one message."""
    policy = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
    app.send_task(
        TASK_NAME, args=[job_id], task_id=message_id or job_id, queue=QUEUE, retry=True, retry_policy=policy
    )


def republish(app: Celery, job_id: str) -> None:
    """One more message for ``job_id`` (the reaper's, the reconciler's), with an id of its own."""
    publish(app, job_id, message_id=f"{job_id}.{uuid.uuid4().hex[:12]}")


def create_worker_app(settings: Settings) -> Celery:
    """The app a worker runs: the task, its per-process hooks, and the engine gate on the consumer."""
    app = create_celery(settings)
    # Created before the pool forks, so the main process and its pool child share them.
    engine_ready = multiprocessing.Value("b", 0)
    backlogged = multiprocessing.Value("b", 0)
    stepping_back_until = multiprocessing.Value("d", 0.0)
    task_class = type(
        "GenerateTask",
        (GenerateTask,),
        {
            "settings": settings,
            "engine_ready": engine_ready,
            "backlogged": backlogged,
            "stepping_back_until": stepping_back_until,
        },
    )
    app.register_task(task_class())
    app.steps["consumer"].add(EngineGate)

    def start_process(**_: Any) -> None:
        _generate_task(app).start_process()

    def stop_process(**_: Any) -> None:
        _generate_task(app).stop_process()

    signals.worker_process_init.connect(start_process, weak=False, dispatch_uid=f"imagen-start-{id(app)}")
    signals.worker_process_shutdown.connect(stop_process, weak=False, dispatch_uid=f"imagen-stop-{id(app)}")
    return app


def _generate_task(app: Celery) -> GenerateTask:
    task = app.tasks[TASK_NAME]
    assert isinstance(task, GenerateTask)
    return task


class EngineGate(bootsteps.StartStopStep):  # type: ignore[misc]  # celery ships no type hints
    """A consumer step of the worker's main process: consume the queue while the pool child's engine is
    loaded and the finished images that no API replica has copied leave room in Redis, and not for a moment
    after the child handed a message back for an idle worker that holds its job's model, not otherwise. The
    worker starts with the queue excluded (``worker.run_worker``), so a worker that cannot load its engine
    never holds a message. Runs in the consumer's event loop (a timer), and is started again with the
    consumer after a lost broker connection."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._timer: Any = None

    def start(self, consumer: Any) -> None:
        self._sync(consumer)
        self._timer = consumer.timer.call_repeatedly(GATE_PERIOD_S, self._sync, (consumer,))

    def stop(self, consumer: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    shutdown = stop

    @staticmethod
    def _sync(consumer: Any) -> None:
        if consumer.task_consumer is None:  # between a lost connection and the next one
            return
        task = _generate_task(consumer.app)
        stepping_back = time.monotonic() < task.stepping_back_until.value
        ready = bool(task.engine_ready.value) and not task.backlogged.value and not stepping_back
        consuming = consumer.task_consumer.consuming_from(QUEUE)
        if ready and not consuming:
            consumer.add_task_queue(QUEUE)
        elif not ready and consuming:
            consumer.cancel_task_queue(QUEUE)


def __getattr__(name: str) -> Celery:
    """``celery_app``, for ``celery -A imagen.jobs.distributed.app:celery_app``: built on first use."""
    if name != "celery_app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    app = create_worker_app(get_settings())
    globals()["celery_app"] = app
    return app
