"""The one path the compatibility APIs (OpenAI's ``/v1/images``, AUTOMATIC1111's ``/sdapi``) take to run a
job: build it as ``POST /generate`` does (``submission.prepare_job``), submit it on the same queue and
limits, and wait for its end on the backend's change feed, in the event loop (no worker thread is held).

The wait is bounded: ``job_timeout_s`` × ``max_attempts`` plus a margin for the queue, and it ends sooner
when nobody is left to answer. A client that goes away (its connection closes: the ASGI ``http.disconnect``,
awaited beside the job, not polled) ends the wait, and its job is cancelled (``IMAGEN_CANCEL_ON_DISCONNECT``,
on by default): its image would reach nobody, since these APIs give the client no job id to fetch it with,
and an SDK that retries would make a second one. Each such request submits its own job, so its wait is that
job's only one. A server that stops (``Waiters.end_all``: from ``imagen serve`` as soon as SIGTERM arrives,
and from the app's shutdown) ends every wait the same way, and the route answers 503: a wait never holds a
shutdown back.

``run_job`` is that path, whole: it returns a ``FinishedJob`` (ended SUCCESS, with its images) or raises
``NoImages``, whose ``Outcome`` says how it ended otherwise (refused, queue full, wait run out, failed,
cancelled...). Each layer keeps only its own mapping of fields in, and of outcomes out to its API's error
shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive

from imagen.access.keys import Caller
from imagen.api.schemas import GenerationRequest, UpscaleRequest
from imagen.api.submission import FieldError, InvalidRequest, prepare_job, prepare_upscale
from imagen.config import Settings
from imagen.errors import BrokerUnavailableError, KeyQueueFullError, QueueFullError, UnavailableError
from imagen.jobs.backend import JobBackend
from imagen.jobs.types import JobRecord, JobState
from imagen.outputs.serving import resolve_servable
from imagen.registry import Registry

WAIT_MARGIN_S = 120.0  # beyond the job's own time limit: the time it may wait in the queue
RESYNC_S = 30.0  # read the job again after this long even without a notification (see events.RESYNC_S)


log = logging.getLogger("imagen.api")


class JobWaitTimeout(Exception):
    """The job did not end within the bounded wait."""


class WaitAbandoned(Exception):
    """The wait ended before the job: its client went away, or the server is stopping. The job was cancelled
    (unless ``IMAGEN_CANCEL_ON_DISCONNECT`` is off). A route answers 503 (read only when the server stops)."""


class Waiters:
    """The compatibility routes' waits in progress in this process (``app.state.waiters``). ``end_all`` ends
    each of them, and any wait begun afterwards ends at once: the server is stopping."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waits: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self.stopping = False

    @contextlib.contextmanager
    def register(self) -> Iterator[asyncio.Event]:
        """On the event loop of the wait: an event set when the wait must end."""
        wait = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waits.add(wait)
            if self.stopping:
                wait[1].set()
        try:
            yield wait[1]
        finally:
            with self._lock:
                self._waits.discard(wait)

    def end_all(self) -> None:
        """From any thread (the server's shutdown, the app's lifespan)."""
        with self._lock:
            self.stopping = True
            waits = tuple(self._waits)
        for loop, ended in waits:
            with contextlib.suppress(RuntimeError):  # its loop closed: that wait is over already
                loop.call_soon_threadsafe(ended.set)


@dataclass
class LivePreviews:
    """The latest preview of each job a compatibility route is waiting for (``/sdapi/v1/progress``
    shows it as ``current_image``): kept only while the route waits, in this API process."""

    latest: dict[str, tuple[int, bytes]] = field(default_factory=dict)


async def _submit(
    request: GenerationRequest | UpscaleRequest,
    backend: JobBackend,
    registry: Registry,
    settings: Settings,
    caller: Caller,
) -> str:
    """Checks and submits the job as ``POST /generate`` does; its id. Raises ``InvalidRequest`` and the
    queue's errors (``QueueFullError``, ``KeyQueueFullError``, ``BrokerUnavailableError``)."""

    def build_and_submit() -> str:
        if isinstance(request, UpscaleRequest):
            job = prepare_upscale(request, registry, settings, key_name=caller.name, uploads=backend.load_upload)
        else:
            job = prepare_job(request, registry, settings, key_name=caller.name, uploads=backend.load_upload)
        return backend.submit(job, key_max_waiting=caller.max_waiting).job_id

    return await run_in_threadpool(build_and_submit)


def wait_limit_s(settings: Settings) -> float:
    return settings.job_timeout_s * settings.max_attempts + WAIT_MARGIN_S


async def _wait_for_end(
    backend: JobBackend,
    job_id: str,
    limit_s: float,
    previews: LivePreviews | None = None,
    *,
    client: Request | None = None,
    cancel_on_disconnect: bool = True,
) -> JobRecord:
    """The job once terminal. Raises ``JobWaitTimeout`` after ``limit_s``. With ``client`` (the request that
    waits; its app's ``state.waiters`` registers the wait): ``WaitAbandoned`` as soon as that client goes away
    or the server stops, after cancelling the job when ``cancel_on_disconnect``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    async with contextlib.AsyncExitStack() as stack:
        # What ends the wait early, each awaited beside the job (nothing is polled).
        stopping: asyncio.Future[Any] = loop.create_future()  # never done without a client
        gone: asyncio.Future[Any] = loop.create_future()
        if client is not None:
            waiters: Waiters = client.app.state.waiters
            stopping = asyncio.ensure_future(stack.enter_context(waiters.register()).wait())
            gone = asyncio.ensure_future(_until_gone(client.receive))
        stack.callback(stopping.cancel)
        stack.callback(gone.cancel)
        if previews is not None:
            stack.callback(previews.latest.pop, job_id, None)
        watcher = await stack.enter_async_context(backend.changes(job_id, previews is not None))  # listening first
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
            changed = asyncio.ensure_future(watcher.wait(min(RESYNC_S, left)))
            await asyncio.wait({changed, stopping, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not changed.done():
                changed.cancel()
                why = "its client went away" if gone.done() else "the server is stopping"
                await _abandon(backend, job_id, why, cancel_on_disconnect)
                raise WaitAbandoned(f"job {job_id}: no longer waited for ({why})")


async def _until_gone(receive: Receive) -> None:
    """Returns when the client's connection closes. The request's body has been read: the server's next
    message is ``http.disconnect`` (uvicorn sends it when the connection is lost)."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a server that cannot receive any more: nobody is there to answer either
        log.debug("receive failed while waiting for a disconnect", exc_info=True)


async def _abandon(backend: JobBackend, job_id: str, why: str, cancel: bool) -> None:
    if not cancel:
        log.info("job %s: no longer waited for (%s); it runs on", job_id, why)
        return
    try:
        state = await run_in_threadpool(backend.cancel, job_id)
    except BrokerUnavailableError as exc:
        log.warning("job %s: no longer waited for (%s), and could not be cancelled: %s", job_id, why, exc)
        return
    log.info("job %s: no longer waited for (%s); cancelled: %s", job_id, why, state.value if state else "gone")


@dataclass(frozen=True)
class FinishedJob:
    """A job that ended SUCCESS with its images: what a compatibility layer answers from."""

    record: JobRecord
    result: dict[str, Any]  # the record's (never None here)

    @property
    def metadata(self) -> dict[str, Any]:
        metadata: dict[str, Any] = self.result["metadata"]
        return metadata

    @property
    def images(self) -> list[dict[str, object]]:
        """Each image's ``filename`` and ``seed``."""
        images: list[dict[str, object]] = self.result.get("images") or [
            {"filename": self.result["filename"], "seed": self.metadata.get("seed")}
        ]
        return images

    @property
    def filenames(self) -> list[str]:
        return [str(image["filename"]) for image in self.images]

    @property
    def revised_prompt(self) -> str:
        """The prompt as encoded: with the LoRAs' trigger words when the engine reports it."""
        metadata = self.result.get("metadata", {})
        return str(metadata.get("final_prompt") or metadata.get("prompt") or self.record.task.get("prompt", ""))


class Outcome(Enum):
    """How a compatibility request ended without its images. Each layer answers each in its API's shape."""

    REFUSED = "refused"  # the submission's checks refused the job: ``NoImages.problems`` says why, per field
    QUEUE_FULL = "queue full"  # the queue, or the caller's key, has as many jobs waiting as it may
    QUEUE_UNREACHABLE = "queue unreachable"  # the broker (Redis) or the job database cannot be used now
    UNAVAILABLE = "unavailable"  # no job is taken for a while: a full outputs disk, too many images to copy
    TIMED_OUT = "timed out"  # the job did not end within the bounded wait (it runs on)
    ABANDONED = "abandoned"  # the wait ended first: its client went away (reading nothing), or the server stops
    FAILED = "failed"  # the job ended FAILURE, or SUCCESS without a result
    CANCELLED = "cancelled"  # the job was cancelled (REVOKED): ``/sdapi/v1/interrupt``, ``POST /cancel``


# When trying again may help, and after how long (OpenAI's layer sends it as Retry-After).
RETRY_AFTER_S = {Outcome.QUEUE_FULL: 30, Outcome.QUEUE_UNREACHABLE: 10, Outcome.UNAVAILABLE: 30, Outcome.ABANDONED: 10}


class NoImages(Exception):
    """A compatibility request that ends without images: ``outcome`` says how; ``reason`` why, in the words
    of the layer below (the queue's error, the job's error); ``problems``, for REFUSED, each refused field."""

    def __init__(self, outcome: Outcome, reason: str, problems: Sequence[FieldError] = ()) -> None:
        super().__init__(f"{outcome.value}: {reason}")
        self.outcome = outcome
        self.reason = reason
        self.problems = tuple(problems)

    @property
    def retry_after_s(self) -> int | None:
        return RETRY_AFTER_S.get(self.outcome)


async def run_job(
    request: GenerationRequest | UpscaleRequest,
    http: Request,
    backend: JobBackend,
    registry: Registry,
    settings: Settings,
    caller: Caller,
    *,
    previews: LivePreviews | None = None,
    waiting: dict[str, float] | None = None,
) -> FinishedJob:
    """Submits the job and waits for its end (``http``: the client whose going away ends the wait), as the
    module docstring says. ``previews``: where the job's latest preview is kept while it runs; ``waiting``:
    the job's id and the time it was submitted are in it from its submission to the end of its wait.
    Raises ``NoImages`` for every end but a job's images."""
    try:
        job_id = await _submit(request, backend, registry, settings, caller)
    except InvalidRequest as exc:
        raise NoImages(Outcome.REFUSED, str(exc), exc.errors) from exc
    except (QueueFullError, KeyQueueFullError) as exc:
        raise NoImages(Outcome.QUEUE_FULL, str(exc)) from exc
    except BrokerUnavailableError as exc:
        raise NoImages(Outcome.QUEUE_UNREACHABLE, str(exc)) from exc
    except UnavailableError as exc:
        raise NoImages(Outcome.UNAVAILABLE, str(exc)) from exc
    if waiting is not None:
        waiting[job_id] = time.time()
    try:
        job = await _wait_for_end(
            backend, job_id, wait_limit_s(settings), previews,
            client=http, cancel_on_disconnect=settings.cancel_on_disconnect,
        )  # fmt: skip
    except JobWaitTimeout as exc:
        raise NoImages(Outcome.TIMED_OUT, str(exc)) from exc
    except WaitAbandoned as exc:
        raise NoImages(Outcome.ABANDONED, str(exc)) from exc
    finally:
        if waiting is not None:
            waiting.pop(job_id, None)
    if job.state is JobState.REVOKED:
        raise NoImages(Outcome.CANCELLED, f"{job.error}")
    if job.state is not JobState.SUCCESS or job.result is None:
        raise NoImages(Outcome.FAILED, f"{job.error}")
    return FinishedJob(job, job.result)


async def read_images(backend: JobBackend, settings: Settings, job: FinishedJob) -> list[bytes]:
    """A finished job's PNGs, in order."""
    return [await read_image(backend, settings, filename) for filename in job.filenames]


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
