"""The embedded store on its own: atomic claims, positions, recovery of jobs whose owner died, expiry."""

from __future__ import annotations

import multiprocessing
import threading
import uuid
from pathlib import Path

import pytest

from imagen.errors import QueueFullError
from imagen.jobs.embedded.store import SqliteJobStore
from imagen.jobs.types import JobState, NewJob


def new_job(prompt: str = "x") -> NewJob:
    return NewJob(job_id=str(uuid.uuid4()), task={"prompt": prompt}, output_name=f"{prompt}.png")


def claim_all(path: str, owner: str, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    store = SqliteJobStore(Path(path), result_ttl_s=3600)
    claimed = []
    while (job := store.claim_next(owner)) is not None:
        claimed.append(job.job_id)
        store.complete(job.job_id, owner, {"status": "success"})
    results.put(claimed)


def test_concurrent_processes_never_claim_the_same_job(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(path, result_ttl_s=3600)
    submitted = {store.submit(new_job(f"p{i}"), max_queue=1000).job_id for i in range(300)}
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=claim_all, args=(str(path), f"w{i}", results)) for i in range(3)]
    for worker in workers:
        worker.start()
    claimed = [job for _ in workers for job in results.get(timeout=60)]
    for worker in workers:
        worker.join(timeout=30)
    assert sorted(claimed) == sorted(submitted)  # every job once, none twice
    assert store.count_waiting() == 0


def test_concurrent_threads_share_one_store(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3", result_ttl_s=3600)
    for i in range(200):
        store.submit(new_job(f"p{i}"), max_queue=1000)
    claimed: list[str] = []
    lock = threading.Lock()

    def work(owner: str) -> None:
        while (job := store.claim_next(owner)) is not None:
            with lock:
                claimed.append(job.job_id)

    threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == len(set(claimed)) == 200


def test_positions_and_queue_limit(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3", result_ttl_s=3600)
    jobs = [new_job(f"p{i}") for i in range(3)]
    assert [store.submit(job, max_queue=3).position for job in jobs] == [1, 2, 3]
    with pytest.raises(QueueFullError):
        store.submit(new_job(), max_queue=3)
    first = store.claim_next("w")
    assert first is not None and first.job_id == jobs[0].job_id and first.state is JobState.STARTED
    assert store.position(jobs[1].job_id) == 1 and store.position(jobs[2].job_id) == 2
    assert store.position(jobs[0].job_id) is None
    assert store.submit(new_job(), max_queue=3).position == 3


def test_orphaned_jobs_are_requeued_then_failed(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3", result_ttl_s=3600)
    job = new_job()
    store.submit(job, max_queue=10)
    for attempt in (1, 2):
        claimed = store.claim_next("dead-owner")
        assert claimed is not None and claimed.attempts == attempt
        assert store.recover_orphans(lambda owner, beat: owner == "dead-owner", max_attempts=3) == [job.job_id]
        record = store.get(job.job_id)
        assert record is not None and record.state is JobState.PENDING and record.error is None
    store.claim_next("dead-owner")
    store.recover_orphans(lambda owner, beat: True, max_attempts=3)
    record = store.get(job.job_id)
    assert record is not None and record.state is JobState.FAILURE
    assert record.error == "worker died while running the job (after 3 attempts)"


def test_a_finished_job_is_not_changed_by_a_late_owner(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3", result_ttl_s=3600)
    job = new_job()
    store.submit(job, max_queue=10)
    store.claim_next("first")
    store.recover_orphans(lambda owner, beat: True, max_attempts=3)
    store.claim_next("second")
    assert store.complete(job.job_id, "second", {"status": "success"})
    assert not store.fail(job.job_id, "first", "late error from the old owner")
    record = store.get(job.job_id)
    assert record is not None and record.state is JobState.SUCCESS


def test_expiry_by_clock(tmp_path: Path) -> None:
    now = [1000.0]
    store = SqliteJobStore(tmp_path / "jobs.sqlite3", result_ttl_s=60, clock=lambda: now[0])
    job = new_job()
    store.submit(job, max_queue=10)
    store.claim_next("w")
    store.complete(job.job_id, "w", {"status": "success"})
    now[0] += 59
    assert store.get(job.job_id) is not None
    now[0] += 2
    assert store.get(job.job_id) is None
    assert store.purge_expired() == 1
