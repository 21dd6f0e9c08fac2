"""One root exception and a few named children; the HTTP layer maps them to status codes in one place."""

from __future__ import annotations

import errno


class ImagenError(Exception):
    """Root of every error Imagen raises on purpose."""


class RegistryError(ImagenError):
    """The registry file is missing, malformed or names something unusable."""


class QueueFullError(ImagenError):
    """More jobs are waiting than ``max_queue`` allows."""


class KeyQueueFullError(ImagenError):
    """One API key has as many jobs waiting as its limit allows (``key_max_waiting`` or its own)."""

    def __init__(self, waiting: int, limit: int) -> None:
        super().__init__(f"{waiting} jobs of this key waiting (max {limit})")
        self.waiting = waiting
        self.limit = limit


class UploadQuotaError(ImagenError):
    """An upload would take one API key (or, without keys, everyone together) past its quota of live uploads:
    ``what`` is ``uploads`` (how many) or ``bytes`` (how many bytes). ``retry_after_s``: until the key's
    oldest live upload expires (None when waiting cannot help: this one alone is over the byte quota)."""

    def __init__(self, what: str, limit: int, retry_after_s: int | None) -> None:
        super().__init__(f"upload quota reached: at most {limit} {what} kept at once")
        self.what = what
        self.limit = limit
        self.retry_after_s = retry_after_s


class UnavailableError(ImagenError):
    """The service cannot take work for a while, for a reason that passes: the API answers 503 with a
    ``Retry-After``, and ``/health`` says why."""


class BrokerUnavailableError(UnavailableError):
    """The job broker (Redis) cannot be reached."""


class DatabaseUnavailableError(BrokerUnavailableError):
    """The embedded backend's job database (its queue, as Redis is the distributed one's) cannot be used now:
    locked by another writer for longer than a request waits, full, unreadable, damaged, deleted or replaced.
    ``reason`` says which in a few words."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"job database {path}: {reason}")
        self.reason = reason


class DatabaseDamagedError(ImagenError):
    """At start: the job database file is damaged (or empty where a database was). Imagen refuses to start
    over it and leaves it as it is; the message names the file and how to recover."""


class OutputsFullError(UnavailableError):
    """Embedded: the outputs disk is full. A generation worker keeps its finished image and tries again to
    write it; no new job is accepted until one is written."""


class ImageBacklogFullError(UnavailableError):
    """Distributed: finished PNGs that no API replica has copied yet fill ``png_redis_max_bytes`` of Redis
    (a replica whose outputs disk is full, or no replica up). They stay until copied; no new job is accepted
    (and workers start none) until copies make room."""


class GenerationError(ImagenError):
    """A generation failed. ``retryable`` says whether another attempt may succeed."""

    retryable: bool = False


class RetryableGenerationError(GenerationError):
    """May pass on another attempt: out of memory, a worker that died."""

    retryable = True


class FatalGenerationError(GenerationError):
    """Will not pass by retrying: a missing weight file, an unsupported format."""

    retryable = False


# How a failed GPU allocation shows. PyTorch's allocator raises ``torch.OutOfMemoryError`` ("CUDA out of
# memory"), but the CUDA libraries report their own handles and workspaces as RuntimeErrors with their
# status names; cuDNN says NOT_INITIALIZED when it cannot get the memory for its handle on a full card.
_OUT_OF_MEMORY_MARKERS = (
    "out of memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "cudnn_status_not_initialized",
    "cufft_alloc_failed",
    "cudaerrormemoryallocation",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says that memory ran out (host or GPU): the one rule for "another attempt may pass"."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _OUT_OF_MEMORY_MARKERS)


def is_out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` says that a disk is full (or a disk quota reached): a condition to wait out, never a
    property of the job that failed to write."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class JobCancelled(ImagenError):
    """The job was cancelled (``POST /cancel``). Raised by a job's progress callback: an engine lets it pass
    (the diffusers engine first lets its pipeline skip the remaining steps), and no image is written."""
