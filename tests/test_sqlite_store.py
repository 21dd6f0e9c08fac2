"""What only the SQLite store does: atomic claims across processes and threads sharing one file, owners
judged by heartbeat, clean release, purge. The rules both stores share are in test_store_contract.py."""

from __future__ import annotations

import multiprocessing
import threading
import uuid
from pathlib import Path

from imagen.jobs.embedded.store import SqliteJobStore
from imagen.jobs.lifecycle import AttemptPolicy, OwnerToken
from imagen.jobs.types import JobState, NewJob

POLICY = AttemptPolicy(max_attempts=3, timeout_s=600)


def new_job(prompt: str = "x") -> NewJob:
    return NewJob(job_id=str(uuid.uuid4()), task={"prompt": prompt}, output_name=f"{prompt}.png")


def claim_all(path: str, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    store = SqliteJobStore(Path(path), policy=POLICY, result_ttl_s=3600)
    owner = OwnerToken.new()
    claimed = []
    while (job := store.claim_next(owner)) is not None:
        claimed.append(job.job_id)
        store.complete(job.job_id, owner, {"status": "success"})
    results.put(claimed)


def test_concurrent_processes_never_claim_the_same_job(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(path, policy=POLICY, result_ttl_s=3600)
    submitted = {store.submit(new_job(f"p{i}"), max_queue=1000).job_id for i in range(300)}
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=claim_all, args=(str(path), results)) for _ in range(3)]
    for worker in workers:
        worker.start()
    claimed = [job for _ in workers for job in results.get(timeout=60)]
    for worker in workers:
        worker.join(timeout=30)
    assert sorted(claimed) == sorted(submitted)  # every job once, none twice
    assert store.count_waiting() == 0


def test_concurrent_threads_share_one_store(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3", policy=POLICY, result_ttl_s=3600)
    for i in range(200):
        store.submit(new_job(f"p{i}"), max_queue=1000)
    claimed: list[str] = []
    lock = threading.Lock()
    me = OwnerToken.new()

    def work(slot: str) -> None:
        while (job := store.claim_next(me.with_slot(slot))) is not None:
            with lock:
                claimed.append(job.job_id)

    threads = [threading.Thread(target=work, args=(str(i),)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == len(set(claimed)) == 200


def test_an_owner_on_another_host_is_judged_by_its_heartbeat(tmp_path: Path) -> None:
    now = [1000.0]
    store = SqliteJobStore(tmp_path / "jobs.sqlite3", policy=POLICY, result_ttl_s=3600, clock=lambda: now[0])
    job = new_job()
    store.submit(job, max_queue=10)
    remote = OwnerToken("another-host", 4242, "0123456789ab")
    store.claim_next(remote)
    me = OwnerToken.new()
    now[0] += 20
    assert store.heartbeat(job.job_id, remote)
    now[0] += 20  # 20 s since its last beat
    assert store.recover_orphans(me, silent_after_s=30) == {}
    now[0] += 11
    verdicts = store.recover_orphans(me, silent_after_s=30)
    assert [verdict.state for verdict in verdicts.values()] == [JobState.PENDING]
    assert not store.heartbeat(job.job_id, remote)  # no longer its job


def test_an_earlier_life_of_this_process_is_dead(tmp_path: Path) -> None:
    """A restarted API that got the same pid (a container) takes back what its earlier life left running."""
    store = SqliteJobStore(tmp_path / "jobs.sqlite3", policy=POLICY, result_ttl_s=3600)
    job = new_job()
    store.submit(job, max_queue=10)
    earlier, now = OwnerToken.new(slot="0"), OwnerToken.new()
    store.claim_next(earlier)
    assert store.recover_orphans(earlier, silent_after_s=30) == {}  # its own life: alive
    assert list(store.recover_orphans(now, silent_after_s=30)) == [job.job_id]


def test_release_gives_the_job_back_uncounted(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3", policy=POLICY, result_ttl_s=3600)
    job = new_job()
    store.submit(job, max_queue=10)
    owner = OwnerToken.new()
    store.claim_next(owner)
    assert store.release(job.job_id, owner)
    record = store.get(job.job_id)
    assert record is not None and record.state is JobState.PENDING and record.attempts == 0
    assert store.position(job.job_id) == 1


def test_purge_deletes_expired_records_only(tmp_path: Path) -> None:
    now = [1000.0]
    store = SqliteJobStore(tmp_path / "jobs.sqlite3", policy=POLICY, result_ttl_s=60, clock=lambda: now[0])
    owner = OwnerToken.new()
    done, waiting = new_job("done"), new_job("waiting")
    store.submit(done, max_queue=10)
    store.claim_next(owner)
    store.complete(done.job_id, owner, {"status": "success"})
    store.submit(waiting, max_queue=10)
    now[0] += 61
    assert store.purge_expired() == 1
    assert store.position(waiting.job_id) == 1


def test_a_database_from_before_api_keys_is_migrated_and_its_jobs_belong_to_no_key(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "jobs.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL UNIQUE, state TEXT NOT NULL,"
        " task TEXT NOT NULL, output_name TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, owner TEXT,"
        " heartbeat_at REAL, progress_step TEXT, progress INTEGER, result TEXT, error TEXT, created_at REAL NOT NULL,"
        " started_at REAL, finished_at REAL);"
        "INSERT INTO jobs (job_id, state, task, output_name, created_at) VALUES ('old', 'PENDING', '{}', 'o.png', 1);"
    )
    old.commit()
    old.close()
    store = SqliteJobStore(path, policy=POLICY, result_ttl_s=3600)
    keyed = NewJob(job_id="new", task={}, output_name="n.png", key_name="k")
    assert store.submit(keyed, max_queue=10).position == 2
    claimed = store.claim_next(OwnerToken.new())
    assert claimed is not None and (claimed.job_id, claimed.key_name) == ("old", "")
    record = store.get("new")
    assert record is not None and record.key_name == "k"
    assert store.output_owner("n.png") == "k" and store.output_owner("o.png") is None  # made before owners
