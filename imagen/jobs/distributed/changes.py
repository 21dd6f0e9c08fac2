"""The API process's one listener on the Redis channel of job changes (``keys.CHANGES_CHANNEL``).

The store publishes a job's id right after each script that changes it, whichever process runs it (a
worker on any host, a replica's reaper, a cancel). Each API process subscribes once, with redis.asyncio on
its event loop, and fans the ids out to its own streams through a ``ChangeFeed``: 500 streams cost one
connection. It starts with the first stream, and reconnects on its own; after a reconnect it wakes every
stream, since what changed in between was not heard. The same connection listens to the workers' preview
images (``keys.PREVIEWS_CHANNEL``), handed to the streams that asked for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio

from imagen.jobs.changes import ChangeFeed
from imagen.jobs.distributed.keys import CHANGES_CHANNEL, PREVIEWS_CHANNEL

log = logging.getLogger("imagen.jobs")

SUBSCRIBE_WAIT_S = 2.0  # a stream waits this long for the subscription, then goes on (it also resyncs)
MAX_RECONNECT_DELAY_S = 5.0


class RedisChangeListener:
    def __init__(self, url: str, feed: ChangeFeed) -> None:
        self.url = url
        self.feed = feed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def ensure_listening(self) -> None:
        """On the event loop: start the listener if needed and wait until Redis confirmed the subscription,
        so a change published from now on reaches this process."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self.stop()  # one listening on another loop (a test's second server on this app) closes its own
            self._loop, self._subscribed = loop, asyncio.Event()
            self._task = loop.create_task(self._listen_forever(), name="imagen-changes")
        try:
            await asyncio.wait_for(self._subscribed.wait(), SUBSCRIBE_WAIT_S)
        except TimeoutError:
            log.warning("job changes: not subscribed yet (Redis unreachable?); streams read jobs periodically")

    async def stop_and_wait(self) -> None:
        """On the listener's own loop: cancel it and wait until its connection is closed."""
        task = self._task
        if task is None or task.done() or self._loop is not asyncio.get_running_loop():
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def stop(self) -> None:
        """From any thread."""
        task, loop = self._task, self._loop
        if task is not None and loop is not None and not task.done():
            with contextlib.suppress(RuntimeError):  # its loop is closed: the task is gone with it
                loop.call_soon_threadsafe(task.cancel)

    def _preview(self, data: bytes) -> None:
        job_id, step, jpeg = data.split(b" ", 2)
        self.feed.publish_preview(job_id.decode(), int(step), jpeg)

    async def _listen_forever(self) -> None:
        delay = 0.5
        while True:
            client = redis.asyncio.Redis.from_url(
                self.url, socket_connect_timeout=1.0, socket_keepalive=True, health_check_interval=30
            )
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(CHANGES_CHANNEL, PREVIEWS_CHANNEL)
                    confirmed = 0
                    async for message in pubsub.listen():
                        if message["type"] == "subscribe":  # Redis confirmed: nothing published after is missed
                            confirmed += 1
                            if confirmed == 2:
                                self._subscribed.set()
                                self.feed.publish_all()
                                delay = 0.5
                        elif message["type"] == "message" and message["channel"] == PREVIEWS_CHANNEL.encode():
                            self._preview(message["data"])
                        elif message["type"] == "message":
                            self.feed.publish(message["data"].decode())
            except (redis.RedisError, OSError) as exc:
                self._subscribed.clear()
                log.warning("job changes: Redis subscription lost (%s); reconnecting in %.1f s", exc, delay)
            finally:
                await client.aclose()
            await asyncio.sleep(delay)
            delay = min(MAX_RECONNECT_DELAY_S, delay * 2)
