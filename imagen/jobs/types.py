"""Small types shared by every job backend."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

from imagen.errors import UploadQuotaError


class JobState(enum.StrEnum):
    PENDING = "PENDING"
    STARTED = "STARTED"
    PROGRESS = "PROGRESS"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    REVOKED = "REVOKED"  # cancelled by the client (Celery's name for it)

    def is_terminal(self) -> bool:
        return self in (JobState.SUCCESS, JobState.FAILURE, JobState.REVOKED)

    def shows_error(self) -> bool:
        """``/status`` carries ``error`` (why the job ended without an image)."""
        return self in (JobState.FAILURE, JobState.REVOKED)


@dataclass(frozen=True)
class NewJob:
    """A validated request, ready to queue: the task and the file name its image will get."""

    job_id: str
    task: dict[str, Any]
    output_name: str
    key_name: str = ""  # the API key that submitted it ("": no keys configured); fair share is per key
    # Its input images, checked and normalised PNGs by role ("init", "mask", "ip"); stored beside the job,
    # never in its task (which /status and the metadata show), and read by the worker that runs it.
    inputs: dict[str, bytes] = field(default_factory=dict)
    # Every file the job will write: ``output_name`` first (one per image of ``num_images``).
    output_names: tuple[str, ...] = ()

    def all_output_names(self) -> tuple[str, ...]:
        return self.output_names or (self.output_name,)


@dataclass(frozen=True)
class Upload:
    """An image sent to ``POST /uploads``, kept until ``expires_at`` for requests that name it."""

    upload_id: str
    key_name: str
    # The file as it was sent (PNG, JPEG or WebP): checked when it arrived, checked and decoded again when a
    # request names it. Kept as sent because that is its compact form: a photo re-encoded as PNG is ~4x.
    data: bytes
    width: int
    height: int
    expires_at: float


@dataclass(frozen=True)
class UploadQuota:
    """How much one owner (an API key; without keys, everyone together) may keep in live uploads at once."""

    max_uploads: int
    max_bytes: int

    def check(self, live_uploads: int, live_bytes: int, size: int, oldest_expires_in_s: float | None) -> None:
        """Raise ``UploadQuotaError`` if one more upload of ``size`` bytes does not fit beside the owner's live
        ones (``oldest_expires_in_s``: when the first of them expires, which frees room)."""
        retry_after = None if oldest_expires_in_s is None else max(1, math.ceil(oldest_expires_in_s))
        if size > self.max_bytes:
            raise UploadQuotaError("bytes", self.max_bytes, None)  # waiting cannot make it fit
        if live_uploads + 1 > self.max_uploads:
            raise UploadQuotaError("uploads", self.max_uploads, retry_after)
        if live_bytes + size > self.max_bytes:
            raise UploadQuotaError("bytes", self.max_bytes, retry_after)


@dataclass(frozen=True)
class Submitted:
    job_id: str
    position: int  # 1 = next to start


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    state: JobState
    task: dict[str, Any]
    output_name: str
    attempts: int = 0
    progress_step: str | None = None
    progress: int | None = None
    denoising: dict[str, Any] | None = None  # while denoising: current_step, total_steps, eta_s (``StepMeter``)
    result: dict[str, Any] | None = None
    error: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    key_name: str = ""  # who submitted it: only that key (or an admin key) sees it

    @property
    def meta(self) -> dict[str, Any] | None:
        if self.progress_step is None:
            return None
        return {"step": self.progress_step, "progress": self.progress or 0, **(self.denoising or {})}


@dataclass(frozen=True)
class WorkerHealth:
    """A generation worker as ``/health`` lists it (``workers``, an extension): an embedded slot's child, or a
    distributed worker as its heartbeat describes it."""

    host: str
    pid: int
    ready: bool  # its engine is loaded: it takes jobs
    error: str | None = None  # why its engine does not load (it keeps retrying, and takes no job meanwhile)
    device: str | None = None
    gpu_available: bool = False
    # For /metrics (not shown by /health): what the worker reported last (``jobs.worker_numbers``)
    model_load_seconds: float | None = None  # how long its engine took to load
    gpu_memory_used_bytes: int | None = None  # None: no CUDA device
    gpu_memory_total_bytes: int | None = None
    model_loads: int | None = None  # models its engine read from disk since it started
    # The models its engine holds now, each with its tier (``generation.base.MODEL_TIERS``: "device" on the
    # GPU, or the CPU's RAM when there is none; "ram" waiting in host RAM): what job routing and /models read.
    models: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``host:pid``: the ``worker`` label of its metrics."""
        return f"{self.host}:{self.pid}"

    @classmethod
    def from_heartbeat(cls, beat: dict[str, Any]) -> WorkerHealth:
        return cls(
            host=str(beat.get("host", "")),
            pid=int(beat.get("pid", 0)),
            ready=bool(beat.get("ready")),
            error=beat.get("error"),
            device=beat.get("device"),
            gpu_available=bool(beat.get("gpu_available")),
            model_load_seconds=_number(beat.get("model_load_seconds")),
            gpu_memory_used_bytes=_integer(beat.get("gpu_memory_used_bytes")),
            gpu_memory_total_bytes=_integer(beat.get("gpu_memory_total_bytes")),
            model_loads=_integer(beat.get("model_loads")),
            models={str(model): str(tier) for model, tier in (beat.get("models") or {}).items()},
        )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _integer(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None else None


@dataclass(frozen=True)
class BackendHealth:
    queue_broker: str  # "embedded", "connected" or "disconnected"
    gpu_available: bool
    workers: tuple[WorkerHealth, ...] = ()  # the generation workers (embedded: one per slot)
    # What /health turns into its status: a reason in ``unavailable`` means the service cannot take work now
    # ("unavailable", 503); one in ``degraded`` means it takes work but something is wrong ("degraded").
    # Each is a short sentence naming the cause, e.g. "outputs disk full (/data/outputs)".
    unavailable: tuple[str, ...] = ()
    degraded: tuple[str, ...] = ()


def no_worker_ready(workers: tuple[WorkerHealth, ...]) -> tuple[str, ...]:
    """The ``degraded`` reason of a system whose workers take no job now (jobs wait until one is ready), with
    why, when a worker said; empty when one is ready. Not ``unavailable``: submissions still queue."""
    if any(worker.ready for worker in workers):
        return ()
    errors = sorted({worker.error for worker in workers if worker.error})
    if errors:
        return (f"no worker ready: {errors[0][:200]}",)
    return ("no worker ready (none started yet, or engines still loading)",)


@dataclass(frozen=True)
class JobMetrics:
    """What ``/metrics`` shows of a job system: its queue now, and its durable totals (``jobs.stats``)."""

    backend: str  # "embedded" or "distributed"
    waiting: int
    running: int
    totals: dict[str, float]  # field name (``jobs.stats.field``) -> value
    # This process's outputs disk is full: embedded, a worker waits to write its image; distributed, this
    # API replica cannot copy the images it is sent.
    outputs_disk_full: bool = False
    # Distributed: bytes of finished PNGs in Redis that no API replica has copied yet (None: embedded).
    png_backlog_bytes: int | None = None
