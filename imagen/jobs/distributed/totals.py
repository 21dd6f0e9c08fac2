"""The job outcome totals of the whole cluster (``jobs/stats.py`` says what is counted), in ``imagen:stats``.

Each process adds what it saw (a worker its job's end, a reaper a dead worker's job, an API replica a
submission or a cancel) right after the write that made the event; ``/metrics`` reads the sums.
"""

from __future__ import annotations

import logging
from typing import cast

import redis

from imagen.jobs import stats
from imagen.jobs.distributed.keys import STATS
from imagen.jobs.distributed.scripts import Scripts

log = logging.getLogger("imagen.jobs")


class JobTotals:
    def __init__(self, client: redis.Redis, scripts: Scripts) -> None:
        self.client = client
        self.scripts = scripts

    def add(self, increments: stats.Increments) -> None:
        """Add to the totals; never raises (a count is not worth failing the job's own write for)."""
        if not increments:
            return
        try:
            self.scripts.run("add_totals", [STATS], [item for pair in increments.items() for item in pair])
        except redis.RedisError as exc:
            log.warning("job totals not recorded (%s): %s", exc, sorted(increments)[:3])

    def read(self) -> dict[str, float]:
        raw = cast(dict[bytes, bytes], self.client.hgetall(STATS))
        return {name.decode(): float(value) for name, value in raw.items()}
