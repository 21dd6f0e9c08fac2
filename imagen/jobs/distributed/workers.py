"""Which processes of the cluster are alive, and which one holds a role.

- **Heartbeats**: each worker process writes its device and readiness under ``imagen:worker:{host}:{pid}``
  with a short expiry, renewed while it lives; ``/health`` and ``/metrics`` list the keys that have not
  expired yet. (A running job's own lock, renewed the same way, is part of its attempt: ``attempts.py``.)
- **Leases**: a role one process at a time holds (the reconciler, the webhooks watcher): a key with the
  holder's name and a short expiry, taken when free and extended by its holder (``hold_lease``).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import redis

from imagen.jobs.distributed.keys import WORKER_PATTERN, worker_key


class Workers:
    """The heartbeats of the worker processes."""

    def __init__(self, client: redis.Redis, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.clock = clock

    def beat(self, pid: int, info: dict[str, Any], ttl_s: float) -> None:
        host = socket.gethostname()
        payload = json.dumps({**info, "host": host, "pid": pid, "at": self.clock()})
        self.client.set(worker_key(host, pid), payload, px=int(ttl_s * 1000))

    def forget(self, pid: int) -> None:
        self.client.delete(worker_key(socket.gethostname(), pid))

    def alive(self) -> list[dict[str, Any]]:
        """The heartbeats of the workers alive now."""
        keys = list(cast(Iterator[bytes], self.client.scan_iter(match=WORKER_PATTERN, count=100)))
        if not keys:
            return []
        values = cast(list[bytes | None], self.client.mget(keys))
        return [json.loads(value) for value in values if value]


def hold_lease(client: redis.Redis, key: str, holder: str, ttl_s: float) -> bool:
    """A role one process at a time holds (reconciling, watching webhooks): take ``key`` for ``ttl_s`` if it
    is free, extend it if ``holder`` has it already; False while another holder has it."""
    ttl_ms = max(1, int(ttl_s * 1000))
    if client.set(key, holder, nx=True, px=ttl_ms):
        return True
    if cast(bytes | None, client.get(key)) == holder.encode():
        client.pexpire(key, ttl_ms)
        return True
    return False
