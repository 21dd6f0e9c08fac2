"""The distributed job system: job records in Redis, Celery workers on any host."""
