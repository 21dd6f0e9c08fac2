"""The job system: one interface (``backend.JobBackend``), an embedded SQLite implementation
(``embedded/``) and a Celery + Redis one (``distributed/``), chosen in one place (``factory.build_backend``).
The rules of a job's life both apply are in ``lifecycle``; the shared types in ``types``."""
