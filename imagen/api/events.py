"""``GET /events/{job_id}``: a job's ``/status`` body as Server-Sent Events, sent again on each change.

The stream watches the job through ``JobBackend.changes`` (change notifications, no polling thread), reads
the job when woken, and sends a ``status`` event when the body differs from the last one sent: the data is
always exactly what ``/status`` answers at that moment (``routes.status_body``). It ends after the terminal
event. Event ids count up from the client's ``Last-Event-ID`` (a reconnecting client gets the current
status at once, with an id above those it saw). sse-starlette sends the keep-alive comments, and stops the
generator when the client goes away.

With ``?preview=1`` the stream also sends ``preview`` events, ``{"step": n, "image": "data:image/jpeg;
base64,..."}``, as the watcher receives them (the latest one at each wake-up; they are not in the job).

Many streams on one job wake together: they share one read of it (``SharedReads``), begun after their
wake-up, and its encoded body, so 500 streams cost one store read per change, not 500.
"""

from __future__ import annotations

import asyncio
import base64
import json
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from sse_starlette import ServerSentEvent
from starlette.concurrency import run_in_threadpool

from imagen.jobs.backend import JobBackend
from imagen.jobs.changes import Watcher
from imagen.jobs.types import JobRecord

# A change the notifications cannot carry (a record that expired, a write by another process on the same
# SQLite file, a Redis listener that reconnected) is seen by reading the job again after this long anyway.
RESYNC_S = 30.0


@dataclass(frozen=True)
class Snapshot:
    """A job as read once for every stream that watches it: its /status body, and that body encoded."""

    job: JobRecord
    body: dict[str, Any]
    data: str


StatusBody = Callable[[JobRecord], dict[str, Any]]


class SharedReads:
    """One read at a time per job, shared by the streams whose last wake-up came before it began (so it
    sees the change that woke them). One instance per backend (``for_backend``)."""

    def __init__(self, backend: JobBackend, status_body: StatusBody) -> None:
        self.backend = backend
        self.status_body = status_body
        self._reads: dict[str, tuple[float, asyncio.Future[Snapshot | None]]] = {}

    @classmethod
    def for_backend(cls, backend: JobBackend, status_body: StatusBody) -> SharedReads:
        shared = _SHARED_READS.get(backend)
        if shared is None:
            shared = _SHARED_READS[backend] = cls(backend, status_body)
        return shared

    async def read(self, job_id: str, watcher: Watcher) -> Snapshot | None:
        loop = asyncio.get_running_loop()
        current = self._reads.get(job_id)
        if current is None or current[0] < watcher.woken_at or current[1].get_loop() is not loop:
            future = asyncio.ensure_future(self._read(job_id))
            current = (loop.time(), future)
            self._reads[job_id] = current
            future.add_done_callback(lambda done: self._forget(job_id, done))
        return await asyncio.shield(current[1])  # a stream that goes away does not cancel the others' read

    async def _read(self, job_id: str) -> Snapshot | None:
        job = await run_in_threadpool(self.backend.get, job_id)
        if job is None:
            return None
        body = self.status_body(job)
        # encoded as /status encodes it (Starlette's JSONResponse)
        return Snapshot(job, body, json.dumps(body, ensure_ascii=False, separators=(",", ":")))

    def _forget(self, job_id: str, done: asyncio.Future[Snapshot | None]) -> None:
        current = self._reads.get(job_id)
        if current is not None and current[1] is done:
            del self._reads[job_id]


_SHARED_READS: weakref.WeakKeyDictionary[JobBackend, SharedReads] = weakref.WeakKeyDictionary()


def first_event_id(last_event_id: str | None) -> int:
    """The id of the stream's first event: one above the client's ``Last-Event-ID`` (ours are integers)."""
    try:
        return max(0, int(last_event_id or 0)) + 1
    except ValueError:
        return 1


async def status_events(
    backend: JobBackend,
    job_id: str,
    status_body: StatusBody,
    first_id: int,
    previews: bool = False,
) -> AsyncIterator[ServerSentEvent]:
    reads = SharedReads.for_backend(backend, status_body)
    next_id = first_id
    sent: str | None = None
    # listening before the first read: nothing is missed
    async with backend.changes(job_id, previews) as watcher:
        while True:
            preview = watcher.take_preview()
            if preview is not None:
                yield ServerSentEvent(preview_data(*preview), event="preview", id=str(next_id))
                next_id += 1
            snapshot = await reads.read(job_id, watcher)
            if snapshot is None:  # expired while watched
                return
            if snapshot.data != sent:
                yield ServerSentEvent(snapshot.data, event="status", id=str(next_id))
                next_id += 1
                sent = snapshot.data
            if snapshot.job.state.is_terminal():
                return
            await watcher.wait(RESYNC_S)


def preview_data(step: int, jpeg: bytes) -> str:
    """A ``preview`` event's data."""
    image = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
    return json.dumps({"step": step, "image": image}, separators=(",", ":"))
