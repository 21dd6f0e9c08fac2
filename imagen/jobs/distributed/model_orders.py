"""An operator's load and unload orders on their way to distributed workers, and the worker thread that
carries them out and follows the registry file.

- API side, :meth:`ModelOrders.send`: the order (``jobs.model_control.ModelOrder``, as JSON) is pushed on the
  list of each worker it is for (``keys.model_orders_key``, by the ``host:pid`` of its heartbeat), which
  expires after ``ORDERS_TTL_S`` when no worker pops it (the worker died meanwhile).
- Worker side, :func:`serve_orders`: a thread of each pool child pops its own list (waiting at most
  ``RELOAD_CHECK_S``), looks at its registry file each time it wakes (the copy on the worker's own disk), and
  carries out what it found holding the engine's lock, which the task body holds while a job runs: a running
  job finishes first, and no job starts during a load. It then beats, so ``/health`` and ``/models`` show
  the models the worker holds now.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import cast

import redis

from imagen.generation.base import Engine
from imagen.jobs.distributed.keys import model_orders_key
from imagen.jobs.model_control import ModelOrder, apply_order, follow_registry
from imagen.registry.watch import RegistryWatcher
from imagen.watched_files import RELOAD_CHECK_S

log = logging.getLogger("imagen.worker")

ORDERS_TTL_S = 60
REDIS_PAUSE_S = 1.0  # after a Redis error, before popping again


class ModelOrders:
    """The lists of orders, one per worker."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def send(self, worker: str, order: ModelOrder) -> None:
        key = model_orders_key(worker)
        with self.client.pipeline() as pipe:
            pipe.rpush(key, order.to_json())
            pipe.expire(key, ORDERS_TTL_S)
            pipe.execute()

    def take(self, worker: str, timeout_s: float) -> ModelOrder | None:
        """The worker's next order, waiting at most ``timeout_s``; None when none came. ``ValueError`` for
        something on the list that is not an order (it is gone from the list)."""
        popped = cast(tuple[bytes, bytes] | None, self.client.blpop([model_orders_key(worker)], timeout=timeout_s))
        return None if popped is None else ModelOrder.from_json(popped[1])


def serve_orders(
    orders: ModelOrders,
    worker: str,
    engine: Engine,
    engine_lock: threading.Lock,
    watcher: RegistryWatcher,
    stopping: threading.Event,
    changed: Callable[[], None],
) -> None:
    """The worker's thread (see the module), until ``stopping``; ``changed`` is called after each order and
    each registry change (the worker beats)."""
    while not stopping.is_set():
        order: ModelOrder | None = None
        try:
            order = orders.take(worker, RELOAD_CHECK_S)
        except ValueError as exc:
            log.warning("a model order that is not one was dropped: %s", exc)
        except redis.RedisError as exc:  # the broker may be restarting: the registry is still followed
            log.debug("model orders not read: %s", exc)
            stopping.wait(REDIS_PAUSE_S)
        with engine_lock:
            try:
                followed = follow_registry(engine, watcher) is not None
            except Exception:
                log.exception("could not follow the registry file's change")
                followed = True
            if order is not None:
                try:
                    apply_order(engine, order)
                except Exception as exc:
                    log.warning("model order %s %s not done: %s: %s",
                                order.action, order.model_id or "(all)", type(exc).__name__, exc)
        if followed or order is not None:
            changed()
