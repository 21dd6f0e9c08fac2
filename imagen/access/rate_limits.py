"""Requests per minute per API key, with the `limits` library: a moving window of 60 s.

Embedded, the counts live in the API process's memory; distributed, in the broker's Redis (every API
replica shares them). If that Redis cannot be reached the request goes through (the routes that need Redis
answer 503 anyway): a broken limiter never locks everyone out.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.storage.redis.redispy import RedispyBridge
from limits.aio.strategies import MovingWindowRateLimiter

from imagen.config import Settings

log = logging.getLogger("imagen.access")

KEY_PREFIX = "imagen:ratelimit"


@dataclass(frozen=True)
class Allowance:
    """What the ``X-RateLimit-*`` headers say after one request."""

    allowed: bool
    limit: int
    remaining: int
    reset_at: float  # Unix time when the oldest request of the window leaves it

    @property
    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.reset_at - time.time()))

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(math.ceil(self.reset_at)),  # Unix time, as GitHub's API sends it
        }


class RateLimiter:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.strategy = MovingWindowRateLimiter(storage)

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimiter:
        if settings.broker_url:
            storage: Storage = RedisStorage(
                "async+" + settings.broker_url,
                implementation="redispy",
                key_prefix=KEY_PREFIX,
                socket_timeout=1.0,
                socket_connect_timeout=1.0,
            )
        else:
            storage = MemoryStorage()
        return cls(storage)

    async def aclose(self) -> None:
        """Close the shared counts' Redis connections, on the event loop that opened them (at the API's
        stop): left to the garbage collector, each would be an unclosed socket."""
        if isinstance(self.storage, RedisStorage) and isinstance(self.storage.bridge, RedispyBridge):
            try:
                await self.storage.bridge.storage.aclose()  # the redis.asyncio.Redis the bridge made
            except RuntimeError as exc:  # connections of another loop, closed already: nothing can close them now
                log.debug("rate limiter connections not closed: %s", exc)

    async def hit(self, key_name: str, per_minute: int) -> Allowance | None:
        """Count one request of ``key_name``; None when the counts cannot be reached (let it through)."""
        item = RateLimitItemPerMinute(per_minute)
        try:
            allowed = await self.strategy.hit(item, key_name)
            stats = await self.strategy.get_window_stats(item, key_name)
        except Exception as exc:  # the storage's own errors (redis, connection) are not one class
            log.warning("rate limit of %s not checked (storage unreachable): %s", key_name, exc)
            return None
        return Allowance(
            allowed=allowed, limit=per_minute, remaining=max(0, stats.remaining), reset_at=stats.reset_time
        )
