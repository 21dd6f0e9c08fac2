"""The one place that chooses the job backend from settings."""

from __future__ import annotations

from imagen.config import Settings
from imagen.jobs.backend import JobBackend


def build_backend(settings: Settings) -> JobBackend:
    if settings.broker_url:
        from imagen.jobs.distributed.backend import CeleryBackend  # imports celery only when asked for

        return CeleryBackend(settings)
    from imagen.jobs.embedded.backend import EmbeddedBackend

    return EmbeddedBackend(settings)
