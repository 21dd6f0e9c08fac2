"""Job-change notifications for the API's live streams (``GET /events/{job_id}``).

A :class:`ChangeFeed` fans "job X changed" out, in memory, to the streams of this process that watch X.
It carries no state: a stream that wakes up reads the job again (``/status``'s body) and sends it when it
differs from what it sent last, so notifications may coalesce or be spurious, never wrong.

- ``publish(job_id)`` may be called from any thread (the embedded store's writers: worker slots, the
  reaper, route threads; the distributed backend's Redis listener). It hands the wake-up to each
  watcher's event loop with ``loop.call_soon_threadsafe``: no polling, no thread per stream.
- ``watch(job_id, previews=...)`` (on the event loop) registers a :class:`Watcher` for the block's duration.
- ``publish_preview(job_id, step, jpeg)`` (any thread) hands a preview image to the watchers of the job
  that asked for previews (``GET /events?preview=1``). Previews are event-only: not in the job record, and
  a watcher keeps only the latest one it has not sent yet (a slow stream skips previews, never lags).

Where it is fed: the embedded backend's SQLite store calls ``publish`` after each write that changes a
job; the distributed store publishes on a Redis channel after each script that changes one, and each API
process's one listener (``distributed/changes.py``) feeds its own ``ChangeFeed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Watcher:
    """One stream's wake-up flag: set by any number of notifications, cleared when the stream looks."""

    def __init__(self, loop: asyncio.AbstractEventLoop, previews: bool = False) -> None:
        self.loop = loop
        self.previews = previews
        self._preview: tuple[int, bytes] | None = None  # the latest preview not taken yet: (step, jpeg)
        self._changed = asyncio.Event()
        # Loop time of the last notification (at first, of the subscription): a read begun since sees it.
        self.woken_at = loop.time()

    def notify(self) -> None:
        """From any thread."""
        self.loop.call_soon_threadsafe(self._set)

    def notify_preview(self, step: int, jpeg: bytes) -> None:
        """From any thread."""
        self.loop.call_soon_threadsafe(self._set_preview, step, jpeg)

    def _set_preview(self, step: int, jpeg: bytes) -> None:
        self._preview = (step, jpeg)
        self._changed.set()  # woken_at unchanged: the job's record did not change for it

    def take_preview(self) -> tuple[int, bytes] | None:
        """The latest preview since the last call, if any: (step, jpeg)."""
        preview, self._preview = self._preview, None
        return preview

    def _set(self) -> None:
        self.woken_at = self.loop.time()
        self._changed.set()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait for a change (True) or the timeout (False); the flag is cleared either way."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            self._changed.clear()
        return True


class ChangeFeed:
    def __init__(self) -> None:
        self._watchers: dict[str, set[Watcher]] = {}
        self._lock = threading.Lock()

    def publish(self, job_id: str) -> None:
        with self._lock:
            watchers = tuple(self._watchers.get(job_id, ()))
        for watcher in watchers:
            with contextlib.suppress(RuntimeError):  # its loop closed (the app stopped): nobody listens
                watcher.notify()

    def publish_preview(self, job_id: str, step: int, jpeg: bytes) -> None:
        with self._lock:
            watchers = tuple(watcher for watcher in self._watchers.get(job_id, ()) if watcher.previews)
        for watcher in watchers:
            with contextlib.suppress(RuntimeError):  # its loop closed (the app stopped): nobody listens
                watcher.notify_preview(step, jpeg)

    def publish_all(self) -> None:
        """Wake every watcher (a listener that reconnected cannot know what changed meanwhile)."""
        with self._lock:
            job_ids = tuple(self._watchers)
        for job_id in job_ids:
            self.publish(job_id)

    @contextmanager
    def watch(self, job_id: str, previews: bool = False) -> Iterator[Watcher]:
        """Called on the event loop that will wait on the watcher."""
        watcher = Watcher(asyncio.get_running_loop(), previews)
        with self._lock:
            self._watchers.setdefault(job_id, set()).add(watcher)
        try:
            yield watcher
        finally:
            with self._lock:
                watchers = self._watchers.get(job_id)
                if watchers is not None:
                    watchers.discard(watcher)
                    if not watchers:
                        del self._watchers[job_id]

    def watched(self) -> int:
        """How many streams watch some job now."""
        with self._lock:
            return sum(len(watchers) for watchers in self._watchers.values())
