"""``GET /events/{job_id}``: a job's ``/status`` body as Server-Sent Events, sent again on each change.

The stream watches the job through ``JobBackend.changes`` (change notifications, no polling thread), reads
the job when woken, and sends a ``status`` event when the body differs from the last one sent: the data is
always exactly what ``/status`` answers at that moment (``routes.status_body``). It ends after the terminal
event. Event ids count up from the client's ``Last-Event-ID`` (a reconnecting client gets the current
status at once, with an id above those it saw). sse-starlette sends the keep-alive comments, and stops the
generator when the client goes away.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from sse_starlette import ServerSentEvent
from starlette.concurrency import run_in_threadpool

from imagen.jobs.backend import JobBackend
from imagen.jobs.types import JobRecord

# A change the notifications cannot carry (a record that expired, a write by another process on the same
# SQLite file, a Redis listener that reconnected) is seen by reading the job again after this long anyway.
RESYNC_S = 30.0


def first_event_id(last_event_id: str | None) -> int:
    """The id of the stream's first event: one above the client's ``Last-Event-ID`` (ours are integers)."""
    try:
        return max(0, int(last_event_id or 0)) + 1
    except ValueError:
        return 1


async def status_events(
    backend: JobBackend,
    job_id: str,
    status_body: Callable[[JobRecord], dict[str, Any]],
    first_id: int,
) -> AsyncIterator[ServerSentEvent]:
    next_id = first_id
    sent: dict[str, Any] | None = None
    async with backend.changes(job_id) as watcher:  # listening before the first read: nothing is missed
        while True:
            job = await run_in_threadpool(backend.get, job_id)
            if job is None:  # expired while watched
                return
            body = status_body(job)
            if body != sent:
                # encoded as /status encodes it (Starlette's JSONResponse)
                data = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
                yield ServerSentEvent(data, event="status", id=str(next_id))
                next_id += 1
                sent = body
            if job.state.is_terminal():
                return
            await watcher.wait(RESYNC_S)
