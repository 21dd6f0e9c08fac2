"""The job system: one interface (``base.JobBackend``), an embedded SQLite implementation and a
Celery + Redis one, chosen in one place (``factory.build_backend``)."""
