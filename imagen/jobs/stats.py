"""Job outcome numbers and job event logs, written once for both job systems.

Each job event (submitted, started, retried, finished) is logged here, one line with structured fields
(``job_id``, ``key_name``, ``state``, durations). The events that count (submitted, retried, finished) also
return the *increments* to add to the job system's durable totals: counters and the cumulative buckets of
the histograms below. The process that makes the event happen adds them in the job system's own storage
(embedded: a SQLite table, ``embedded/stats.py``; distributed: one Redis hash, ``HINCRBYFLOAT``), so the
totals cover every job of the system, whichever process or host ended it, and survive restarts.
``api/metrics.py`` reads them back (``JobBackend.job_metrics``) as Prometheus counters and histograms.

A total is one field named ``metric|state|suffix``: ``suffix`` is empty for a counter, else a bucket's
upper bound, ``sum`` or ``count`` (buckets are cumulative, as Prometheus exposes them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from imagen.jobs.lifecycle import Verdict
from imagen.jobs.types import JobRecord, NewJob

log = logging.getLogger("imagen.jobs.events")

Increments = dict[str, float]

SUBMITTED = "imagen_jobs_submitted_total"
FINISHED = "imagen_jobs_finished_total"  # label: state (SUCCESS, FAILURE, REVOKED)
RETRIED = "imagen_jobs_retried_total"
REVOKED = "imagen_jobs_revoked_total"

COUNTERS = {
    SUBMITTED: "Jobs accepted into the queue.",
    FINISHED: "Jobs that ended, by final state.",
    RETRIED: "Failed attempts that put their job back in the queue.",
    REVOKED: "Jobs cancelled by their client while waiting or running.",
}
LABELLED_COUNTERS = frozenset({FINISHED})


@dataclass(frozen=True)
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...]


_SHORT = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
QUEUE_WAIT = Histogram(
    "imagen_job_queue_wait_seconds", "Seconds from submission to the start of the job's last attempt.",
    (*_SHORT, 1800.0, 3600.0),
)
GENERATION = Histogram(
    "imagen_job_generation_seconds", "Seconds from the start of the job's last attempt to its end.", _SHORT
)
END_TO_END = Histogram(
    "imagen_job_end_to_end_seconds", "Seconds from submission to the job's end.", (*_SHORT, 1800.0, 3600.0)
)
OVERHEAD = Histogram(
    "imagen_job_service_overhead_seconds",
    "Successful jobs: end-to-end seconds minus the queue wait minus the engine's own phases "
    "(result.timings.seconds): what the service itself added.",
    (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
HISTOGRAMS = (QUEUE_WAIT, GENERATION, END_TO_END, OVERHEAD)


def field(metric: str, state: str = "", suffix: str = "") -> str:
    return f"{metric}|{state}|{suffix}"


def bound(upper: float) -> str:
    """A bucket's upper bound as written in a field name (and as Prometheus's ``le`` label)."""
    return repr(float(upper))


def parse_field(name: str) -> tuple[str, str, str] | None:
    parts = name.split("|")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None


def _observe(into: Increments, histogram: Histogram, state: str, value: float) -> None:
    value = round(max(0.0, value), 6)  # clock skew between hosts never makes a negative observation
    for upper in histogram.buckets:
        if value <= upper:
            into[field(histogram.name, state, bound(upper))] = 1.0
    into[field(histogram.name, state, "sum")] = value
    into[field(histogram.name, state, "count")] = 1.0


# -- the events ------------------------------------------------------------------------------------
def durations(record: JobRecord) -> dict[str, float]:
    """queue_wait_seconds, run_seconds and end_to_end_seconds, those the record's times allow."""
    out: dict[str, float] = {}
    if record.started_at is not None and record.created_at:
        out["queue_wait_seconds"] = round(record.started_at - record.created_at, 4)
    if record.finished_at is not None and record.started_at is not None:
        out["run_seconds"] = round(record.finished_at - record.started_at, 4)
    if record.finished_at is not None and record.created_at:
        out["end_to_end_seconds"] = round(record.finished_at - record.created_at, 4)
    return out


def engine_seconds(result: dict[str, Any] | None) -> float | None:
    """The engine's own time: the sum of ``result.timings.seconds`` (``generation.runner``)."""
    timings = (result or {}).get("timings")
    seconds = timings.get("seconds") if isinstance(timings, dict) else None
    if not isinstance(seconds, dict):
        return None
    return float(sum(value for value in seconds.values() if isinstance(value, int | float)))


def on_submitted(job: NewJob, position: int) -> Increments:
    log.info(
        "job %s: submitted (position %d)", job.job_id, position,
        extra={"event": "submitted", "job_id": job.job_id, "key_name": job.key_name, "state": "PENDING",
               "position": position},
    )
    return {field(SUBMITTED): 1.0}


def on_started(record: JobRecord) -> None:
    extra = {"event": "started", "job_id": record.job_id, "key_name": record.key_name, "state": "STARTED",
             "attempt": record.attempts, **durations(record)}
    log.info("job %s: attempt %d started", record.job_id, record.attempts, extra=extra)


def on_retried(record: JobRecord, error: str) -> Increments:
    """A failed attempt put the job back in the queue (``record`` as it is now, PENDING)."""
    log.warning(
        "job %s: attempt %d failed, back in the queue: %s", record.job_id, record.attempts, error,
        extra={"event": "retried", "job_id": record.job_id, "key_name": record.key_name, "state": "PENDING",
               "attempt": record.attempts, "error": error},
    )
    return {field(RETRIED): 1.0}


def on_finished(record: JobRecord) -> Increments:
    """The job reached a terminal state (``record`` as it is now)."""
    state = record.state.value
    times = durations(record)
    increments: Increments = {field(FINISHED, state): 1.0}
    if state == "REVOKED":
        increments[field(REVOKED)] = 1.0
    if "queue_wait_seconds" in times:
        _observe(increments, QUEUE_WAIT, state, times["queue_wait_seconds"])
    if "run_seconds" in times:
        _observe(increments, GENERATION, state, times["run_seconds"])
    if "end_to_end_seconds" in times:
        _observe(increments, END_TO_END, state, times["end_to_end_seconds"])
    engine = engine_seconds(record.result) if state == "SUCCESS" else None
    if engine is not None and "queue_wait_seconds" in times and "end_to_end_seconds" in times:
        overhead = times["end_to_end_seconds"] - times["queue_wait_seconds"] - engine
        times["service_overhead_seconds"] = round(overhead, 4)
        _observe(increments, OVERHEAD, state, overhead)
    extra: dict[str, Any] = {"event": "finished", "job_id": record.job_id, "key_name": record.key_name,
                             "state": state, "attempt": record.attempts, **times}
    if record.error:
        extra["error"] = record.error
    level = logging.WARNING if state == "FAILURE" else logging.INFO
    spent = ", ".join(f"{label} {times[key]:.2f} s" for key, label in _SPENT if key in times)
    error = f": {record.error}" if record.error else ""
    log.log(level, "job %s: %s%s%s", record.job_id, state, f" ({spent})" if spent else "", error, extra=extra)
    return increments


_SPENT = (("queue_wait_seconds", "queued"), ("run_seconds", "ran"), ("service_overhead_seconds", "overhead"))


def on_written(record: JobRecord | None, verdict: Verdict | None = None) -> Increments:
    """For a store, right after a write that ended an attempt (``verdict``: back in the queue or not) or a
    job (a cancel, a success): log the event and return what to add. ``record`` is the job as read after
    the write (None when it is gone)."""
    if record is None:
        return {}
    if verdict is not None and verdict.requeue:
        return on_retried(record, verdict.error)
    if record.state.is_terminal():
        return on_finished(record)
    return {}
