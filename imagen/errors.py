"""One root exception and a few named children; the HTTP layer maps them to status codes in one place."""

from __future__ import annotations


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


class BrokerUnavailableError(ImagenError):
    """The job broker (Redis) cannot be reached."""


class GenerationError(ImagenError):
    """A generation failed. ``retryable`` says whether another attempt may succeed."""

    retryable: bool = False


class RetryableGenerationError(GenerationError):
    """May pass on another attempt: out of memory, a worker that died."""

    retryable = True


class FatalGenerationError(GenerationError):
    """Will not pass by retrying: a missing weight file, an unsupported format."""

    retryable = False


class JobCancelled(ImagenError):
    """The job was cancelled (``POST /cancel``). Raised by a job's progress callback: an engine lets it pass
    (the diffusers engine first lets its pipeline skip the remaining steps), and no image is written."""
