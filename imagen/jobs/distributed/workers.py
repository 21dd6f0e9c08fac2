"""Which processes of the cluster are alive, and which one holds a role.

- **Heartbeats**: each worker process writes its device and readiness (and whether it runs a job, and which
  models it holds) under ``imagen:worker:{host}:{pid}`` with a short expiry, renewed while it lives, and
  names that key in the set ``imagen:workers``; ``/health``, ``/metrics`` and every claim (model affinity)
  read the keys of that set that have not expired yet, dropping the others from it: a read costs one
  command per worker, never a scan of the keyspace (which holds every job).
  (A running job's own lock, renewed the same way, is part of its attempt: ``attempts.py``.)
- **Leases**: a role one process at a time holds (the reconciler, the webhooks watcher): a key with the
  holder's name and a short expiry, taken when free and extended by its holder (``hold_lease``).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any, cast

import redis

from imagen.jobs.distributed.keys import WORKERS, worker_key
from imagen.jobs.distributed.scripts import Scripts


class Workers:
    """The heartbeats of the worker processes."""

    def __init__(self, client: redis.Redis, scripts: Scripts, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.scripts = scripts
        self.clock = clock

    def beat(self, pid: int, info: dict[str, Any], ttl_s: float) -> None:
        host = socket.gethostname()
        payload = json.dumps({**info, "host": host, "pid": pid, "at": self.clock()})
        key = worker_key(host, pid)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(key, payload, px=int(ttl_s * 1000))
            pipe.sadd(WORKERS, key)
            pipe.execute()

    def forget(self, pid: int) -> None:
        key = worker_key(socket.gethostname(), pid)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.srem(WORKERS, key)
            pipe.execute()

    def alive(self) -> list[dict[str, Any]]:
        """The heartbeats of the workers alive now."""
        keys = sorted(cast(set[bytes], self.client.smembers(WORKERS)))
        if not keys:
            return []
        values = cast(list[bytes | None], self.client.mget(keys))
        expired = [key.decode() for key, value in zip(keys, values, strict=True) if value is None]
        if expired:
            self.forget_expired(expired)
        return [json.loads(value) for value in values if value]

    def forget_expired(self, keys: list[str]) -> int:
        """Drop from the index the heartbeat keys that no longer exist; how many. Checked again inside Redis: a
        worker whose heartbeat expired (a loaded machine, a long engine load) may beat again between a reader's
        MGET and its removal, and a plain SREM would then hide a live worker until its next beat."""
        return int(self.scripts.run("forget_expired_workers", keys, [WORKERS]))


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
