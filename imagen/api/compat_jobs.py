"""The one path the compatibility APIs (OpenAI's ``/v1/images``, AUTOMATIC1111's ``/sdapi``) take to run a
job: build it as ``POST /generate`` does (``submission.prepare_job``), submit it on the same queue and
limits, and wait for its end on the backend's change feed, in the event loop (no worker thread is held).

The wait is bounded: ``job_timeout_s`` × ``max_attempts`` plus a margin for the queue. A client that goes
away leaves its job running, as after ``POST /generate``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from imagen.access.keys import Caller
from imagen.api.schemas import GenerationRequest
from imagen.api.submission import prepare_job
from imagen.config import Settings
from imagen.jobs.backend import JobBackend
from imagen.jobs.types import JobRecord
from imagen.outputs.serving import resolve_servable
from imagen.registry import Registry

WAIT_MARGIN_S = 120.0  # beyond the job's own time limit: the time it may wait in the queue
RESYNC_S = 30.0  # read the job again after this long even without a notification (see events.RESYNC_S)


class JobWaitTimeout(Exception):
    """The job did not end within the bounded wait."""


@dataclass
class LivePreviews:
    """The latest preview of each job a compatibility route is waiting for (``/sdapi/v1/progress``
    shows it as ``current_image``): kept only while the route waits, in this API process."""

    latest: dict[str, tuple[int, bytes]] = field(default_factory=dict)


async def submit(
    request: GenerationRequest,
    backend: JobBackend,
    registry: Registry,
    settings: Settings,
    caller: Caller,
) -> str:
    """Checks and submits the job as ``POST /generate`` does; its id. Raises ``InvalidRequest`` and the
    queue's errors (``QueueFullError``, ``KeyQueueFullError``, ``BrokerUnavailableError``)."""

    def build_and_submit() -> str:
        job = prepare_job(request, registry, settings, key_name=caller.name, uploads=backend.load_upload)
        return backend.submit(job, key_max_waiting=caller.max_waiting).job_id

    return await run_in_threadpool(build_and_submit)


def wait_limit_s(settings: Settings) -> float:
    return settings.job_timeout_s * settings.max_attempts + WAIT_MARGIN_S


async def wait_for_end(
    backend: JobBackend,
    job_id: str,
    limit_s: float,
    previews: LivePreviews | None = None,
) -> JobRecord:
    """The job once terminal. Raises ``JobWaitTimeout`` after ``limit_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    try:
        async with backend.changes(job_id, previews is not None) as watcher:  # listening before reading
            while True:
                if previews is not None:
                    preview = watcher.take_preview()
                    if preview is not None:
                        previews.latest[job_id] = preview
                job = await run_in_threadpool(backend.get, job_id)
                if job is None:
                    raise JobWaitTimeout(f"job {job_id} expired while waited for")
                if job.state.is_terminal():
                    return job
                left = deadline - loop.time()
                if left <= 0:
                    raise JobWaitTimeout(f"job {job_id} did not end within {limit_s:.0f} s")
                await watcher.wait(min(RESYNC_S, left))
    finally:
        if previews is not None:
            previews.latest.pop(job_id, None)


def image_files(job: JobRecord) -> list[dict[str, object]]:
    """A successful job's images: each with ``filename`` and ``seed``."""
    assert job.result is not None
    images: list[dict[str, object]] = job.result.get("images") or [
        {"filename": job.result["filename"], "seed": job.result["metadata"].get("seed")}
    ]
    return images


async def read_image(backend: JobBackend, settings: Settings, filename: str) -> bytes:
    """A job's PNG, fetched from the worker first where the backend needs it (distributed)."""

    def read() -> bytes:
        path = resolve_servable(settings.outputs_dir, filename)
        if path is None:
            backend.ensure_output(filename)
            path = resolve_servable(settings.outputs_dir, filename)
        if path is None:
            raise FileNotFoundError(filename)
        return Path(path).read_bytes()

    return await run_in_threadpool(read)


def revised_prompt(job: JobRecord) -> str:
    """The prompt as encoded: with the LoRAs' trigger words when the engine reports it."""
    metadata = (job.result or {}).get("metadata", {})
    return str(metadata.get("final_prompt") or metadata.get("prompt") or job.task.get("prompt", ""))

