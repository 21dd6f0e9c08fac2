"""The distributed backend's state in Redis (the broker's own server): one part per concept, on one connection.

- ``store.jobs``      the job records and the fair queue: submit, confirm, read, cancel (``records.py``)
- ``store.attempts``  a worker's attempt: claim, progress, lock, end; the reaper (``attempts.py``)
- ``store.uploads``   images sent to ``POST /uploads``, with each key's quota (``uploads.py``)
- ``store.pngs``      finished PNGs on their way to every API replica; the replicas' registry (``pngs.py``)
- ``store.workers``   worker heartbeats (``workers.py``, with ``hold_lease`` for one-holder roles)
- ``store.totals``    the job outcome totals ``/metrics`` shows (``totals.py``)

The keys and their layout are described once, in ``keys.py``; the Lua scripts that change them are run by
``scripts.py``; what the writes answer is in ``outcomes.py``. A process opens one ``RedisJobStore`` per
connection it needs (a thread that blocks on a stream has its own).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from imagen.jobs.distributed.attempts import Attempts
from imagen.jobs.distributed.pngs import PngLimits, Pngs
from imagen.jobs.distributed.records import DEFAULT_CONFIRM_WINDOW_S, JobRecords
from imagen.jobs.distributed.scripts import Scripts
from imagen.jobs.distributed.totals import JobTotals
from imagen.jobs.distributed.uploads import Uploads
from imagen.jobs.distributed.workers import Workers

if TYPE_CHECKING:
    from imagen.config import Settings


def connect(
    url: str,
    *,
    connect_timeout: float = 1.0,
    socket_timeout: float | None = 5.0,
    retries: int = 1,
    retry_on_timeout: bool = True,
) -> redis.Redis:
    """A client that fails fast when Redis is down: short timeouts, ``retries`` immediate retries (on a
    broken connection always; on a timeout only with ``retry_on_timeout``, since that doubles the wait)."""
    # redis-py's Retry retries timeouts unless told its errors explicitly.
    errors: tuple[type[Exception], ...] = (redis.ConnectionError,) + (
        (redis.TimeoutError, TimeoutError) if retry_on_timeout else ()
    )
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=connect_timeout,
        socket_timeout=socket_timeout,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), retries, supported_errors=errors),
        retry_on_error=list(errors),
        health_check_interval=30,
    )


class RedisJobStore:
    """Every method of its parts is one round trip (or a few, for scans and guarded writes)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        result_ttl_s: float,
        png_limits: PngLimits | None = None,
        confirm_window_s: float = DEFAULT_CONFIRM_WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        scripts = Scripts(client)
        self.totals = JobTotals(client, scripts)
        self.jobs = JobRecords(
            client, scripts, self.totals, result_ttl_s=result_ttl_s, confirm_window_s=confirm_window_s, clock=clock
        )
        self.pngs = Pngs(client, scripts, png_limits or PngLimits.defaults())
        self.attempts = Attempts(client, scripts, self.jobs, self.pngs.limits, clock)
        self.uploads = Uploads(client, clock)
        self.workers = Workers(client, scripts, clock)

    @classmethod
    def from_settings(cls, settings: Settings, client: redis.Redis) -> RedisJobStore:
        return cls(
            client,
            result_ttl_s=settings.result_ttl_s,
            png_limits=PngLimits.from_settings(settings),
            confirm_window_s=settings.broker_timeout_s,
        )

    def close(self) -> None:
        self.client.close()
