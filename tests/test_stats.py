"""``jobs/stats.py``: what each job event adds to the totals."""

from __future__ import annotations

import pytest

from imagen.jobs import stats
from imagen.jobs.lifecycle import Verdict
from imagen.jobs.types import JobRecord, JobState


def finished(state: JobState, *, created: float = 100.0, started: float | None = 101.0, ended: float = 103.5,
             engine: dict[str, float] | None = None) -> JobRecord:
    result = {"timings": {"started_at": started, "seconds": engine}} if engine is not None else None
    return JobRecord(job_id="j", state=state, task={}, output_name="x.png", attempts=1, result=result,
                     created_at=created, started_at=started, finished_at=ended)


def test_a_success_fills_the_buckets_at_and_above_its_value() -> None:
    added = stats.on_finished(finished(JobState.SUCCESS, engine={"generation_gpu": 2.0, "saving": 0.25}))
    assert added[stats.field(stats.FINISHED, "SUCCESS")] == 1
    wait = stats.QUEUE_WAIT.name
    assert stats.field(wait, "SUCCESS", stats.bound(0.5)) not in added  # waited 1.0 s
    assert added[stats.field(wait, "SUCCESS", stats.bound(1.0))] == 1  # le is inclusive
    assert added[stats.field(wait, "SUCCESS", stats.bound(3600.0))] == 1
    assert added[stats.field(wait, "SUCCESS", "sum")] == 1.0
    assert added[stats.field(stats.GENERATION.name, "SUCCESS", "sum")] == 2.5
    assert added[stats.field(stats.END_TO_END.name, "SUCCESS", "sum")] == 3.5
    # 3.5 s end to end - 1.0 s waiting - 2.25 s in the engine = 0.25 s added by the service
    assert added[stats.field(stats.OVERHEAD.name, "SUCCESS", "sum")] == pytest.approx(0.25)
    assert added[stats.field(stats.OVERHEAD.name, "SUCCESS", stats.bound(0.25))] == 1
    assert stats.field(stats.OVERHEAD.name, "SUCCESS", stats.bound(0.1)) not in added


def test_a_job_revoked_while_waiting_has_no_queue_wait_nor_run_time() -> None:
    added = stats.on_finished(finished(JobState.REVOKED, started=None))
    assert added[stats.field(stats.FINISHED, "REVOKED")] == 1
    assert added[stats.field(stats.REVOKED)] == 1
    names = {stats.parse_field(name)[0] for name in added}  # type: ignore[index]
    assert names == {stats.FINISHED, stats.REVOKED, stats.END_TO_END.name}


def test_a_failure_has_no_overhead() -> None:
    added = stats.on_finished(finished(JobState.FAILURE))
    assert not [name for name in added if name.startswith(stats.OVERHEAD.name)]
    assert added[stats.field(stats.GENERATION.name, "FAILURE", "count")] == 1


def test_an_attempt_put_back_in_the_queue_counts_a_retry_only() -> None:
    record = JobRecord(job_id="j", state=JobState.PENDING, task={}, output_name="x.png", attempts=1, created_at=1.0)
    assert stats.on_written(record, Verdict(JobState.PENDING, "out of memory")) == {stats.field(stats.RETRIED): 1}
    assert stats.on_written(record) == {}  # a job not ended counts nothing
    assert stats.on_written(None, Verdict(JobState.FAILURE, "x")) == {}  # gone already


def test_clock_skew_never_makes_a_negative_observation() -> None:
    added = stats.on_finished(finished(JobState.SUCCESS, created=102.0, started=101.0, ended=103.0))
    assert added[stats.field(stats.QUEUE_WAIT.name, "SUCCESS", "sum")] == 0.0
    assert added[stats.field(stats.QUEUE_WAIT.name, "SUCCESS", stats.bound(0.1))] == 1
