"""The job-backend interface the API talks to. Implementations: ``embedded.backend.EmbeddedBackend``
(SQLite, worker processes on this machine) and ``distributed.backend.CeleryBackend`` (Redis, workers
anywhere), chosen by ``factory.build_backend``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractAsyncContextManager, AbstractContextManager, nullcontext

from imagen.jobs.changes import Watcher
from imagen.jobs.model_control import ModelOrder
from imagen.jobs.types import BackendHealth, JobMetrics, JobRecord, JobState, NewJob, Submitted, Upload, UploadQuota


class JobBackend(ABC):
    @abstractmethod
    def start(self) -> None:
        """Start whatever runs jobs (called once when the API starts)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop cleanly; queued jobs stay queued for the next start."""

    async def stop_listening(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """On the event loop, before ``stop``: end what runs on the loop itself (a pub/sub listener), so its
        connections close while the loop still runs."""

    @abstractmethod
    def submit(self, job: NewJob, key_max_waiting: int | None = None) -> Submitted:
        """Queue a job. Raises ``QueueFullError`` when ``max_queue`` jobs wait already (checked first),
        ``KeyQueueFullError`` when ``key_max_waiting`` jobs of ``job.key_name`` wait already (None: no
        per-key limit), ``BrokerUnavailableError`` when the queue cannot be reached. The position is the
        job's place in the fair order (``jobs.fairness``): 1 = next to start."""

    @abstractmethod
    def get(self, job_id: str) -> JobRecord | None:
        """The job, or None when unknown or expired (finished more than ``result_ttl_s`` ago)."""

    @abstractmethod
    def cancel(self, job_id: str) -> JobState | None:
        """Apply ``lifecycle.cancel_verdict``: the job's state afterwards (REVOKED, or SUCCESS/FAILURE when
        it ended first), or None when unknown or expired. A running job's worker stops at its next step."""

    @abstractmethod
    def output_owner(self, filename: str) -> str | None:
        """The ``key_name`` of the job that made (or will make) the image ``filename``; None when no job of
        this backend ever named it. Kept as long as the file may exist, not only while the job is kept."""

    @abstractmethod
    def save_upload(self, upload: Upload, quota: UploadQuota | None = None) -> None:
        """Keep an uploaded image until ``upload.expires_at`` (where every API replica can read it). With a
        ``quota``: ``UploadQuotaError`` instead, and nothing kept, when it does not fit beside the live
        uploads of ``upload.key_name`` (checked and stored in one atomic step)."""

    @abstractmethod
    def load_upload(self, upload_id: str) -> Upload | None:
        """The upload, or None when unknown or expired."""

    @abstractmethod
    def health(self) -> BackendHealth:
        """What ``/health`` reports: never raises, and answers soon even when the store does not."""

    def answering(self) -> AbstractContextManager[None]:
        """Entered around every HTTP request (``api.app``): a backend may give up sooner there than in its
        background work, so a request answers 503 within seconds instead of waiting on a busy store."""
        return nullcontext()

    @abstractmethod
    def job_metrics(self) -> JobMetrics:
        """The whole job system's queue (waiting, running) and outcome totals (``jobs.stats``), as stored
        by whichever process ended each job. Raises ``BrokerUnavailableError`` when they cannot be read."""

    @abstractmethod
    def changes(self, job_id: str, previews: bool = False) -> AbstractAsyncContextManager[Watcher]:
        """On the event loop: a ``Watcher`` woken whenever the job may have changed, for the block's
        duration. It listens from the moment the block is entered, so a change after that is never missed
        (read the job inside the block). With ``previews``, it also receives the job's preview images."""

    @abstractmethod
    def order_models(self, order: ModelOrder, worker: str | None = None) -> list[str]:
        """Send an operator's load or unload order (``model_control``) to every ready worker, or to the one
        named ``host:pid`` (as ``/health`` lists it); each applies it between jobs, after the one it runs.
        Returns the names of the workers asked: none when no worker is ready or none has that name."""

    def ensure_output(self, filename: str) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Make sure a finished image is in this API's outputs folder before it is served. The embedded
        backend writes it there directly; a distributed one fetches it from the broker on a miss."""
