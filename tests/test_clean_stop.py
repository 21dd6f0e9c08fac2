"""A stop that signals the whole process group is a clean stop, on both backends, with real processes.

systemd's default stop (``KillMode=control-group``) and ``kill -TERM -<pgid>`` send SIGTERM to every process
of the service at once: the API or worker main process and the children that run the jobs. A running job
must then go back to the queue without counting an attempt, as it does when only the main process is
signalled: a job held by a test latch (``hold NAME``) survives more restarts than ``max_attempts`` and still
ends SUCCESS once released, having used a single attempt.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from imagen.jobs.distributed.outcomes import AttemptOutcome, ClaimOutcome
from imagen.jobs.distributed.store import RedisJobStore, connect
from tests.celery_support import CeleryCluster, RedisServer, celery_cluster, own_redis
from tests.conftest import ServerProcess, submit, wait_for, wait_status
from tests.latches import Latches
from tests.test_distributed_reconciler import new_job

__all__ = ["celery_cluster", "own_redis"]  # fixtures
TERMINAL = {"SUCCESS", "FAILURE", "REVOKED"}
RESTARTS = 4  # more than max_attempts (3): each restart that counted an attempt would end the job FAILURE


def embedded_attempts(tmp_path: Path, job_id: str) -> int:
    """The job's attempt count, read from the server's SQLite file (read-only, beside the running server)."""
    with sqlite3.connect(f"file:{tmp_path / 'data' / 'jobs.sqlite3'}?mode=ro", uri=True) as db:
        row = db.execute("SELECT attempts FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    assert row is not None
    return int(row[0])


def status(client: TestClient | httpx.Client, job_id: str) -> str:
    return str(client.get(f"/status/{job_id}").json()["status"])


def wait_held(latches: Latches, name: str, client: TestClient | httpx.Client, job_id: str) -> None:
    """Wait until the ``hold NAME`` job runs again; fail at once if it ended instead."""

    def running_or_over() -> str | None:
        if latches.started(name):
            return "running"
        current = status(client, job_id)
        return current if current in TERMINAL else None

    assert wait_for(running_or_over, timeout=120, interval=0.05) == "running", status(client, job_id)


def test_embedded_group_sigterm_puts_the_running_job_back_uncounted(
    make_server: Callable[..., ServerProcess], latches: Latches, tmp_path: Path, execution_log: Path
) -> None:
    job_id = ""
    for restart in range(RESTARTS + 1):
        server = make_server()
        server.start()
        with server.client() as http:
            job_id = job_id or submit(http, "hold group-stop")
            wait_held(latches, "group-stop", http, job_id)
            assert embedded_attempts(tmp_path, job_id) == 1, f"after {restart} group stops"
            if restart == RESTARTS:
                latches.release("group-stop")
                body = wait_status(http, job_id, TERMINAL, timeout=60)
                assert body["status"] == "SUCCESS", body
                break
        latches.reset("group-stop")  # the next start runs the job again and marks it started again
        server.stop_group(signal.SIGTERM)
    assert embedded_attempts(tmp_path, job_id) == 1
    assert execution_log.read_text().splitlines().count("hold group-stop") == RESTARTS + 1


def test_distributed_group_sigterm_puts_the_running_job_back_uncounted(
    celery_cluster: CeleryCluster, latches: Latches, execution_log: Path
) -> None:
    cluster = celery_cluster
    client = cluster.api()
    redis_client = cluster.redis.client()

    def attempts() -> int:
        return int(redis_client.hget(f"imagen:job:{job_id}", "attempts") or 0)

    worker = cluster.start_worker()
    job_id = submit(client, "hold group-stop")
    for restart in range(RESTARTS):
        wait_held(latches, "group-stop", client, job_id)
        assert attempts() == 1, f"after {restart} group stops"
        latches.reset("group-stop")
        # The worker's main process and its pool child both get SIGTERM.
        assert worker.process is not None
        os.killpg(worker.pid, signal.SIGTERM)
        assert worker.process.wait(timeout=60) == 0, worker.log()
        worker.process = None
        assert status(client, job_id) == "PENDING"
        worker = cluster.start_worker()
    wait_held(latches, "group-stop", client, job_id)
    latches.release("group-stop")
    body = wait_status(client, job_id, TERMINAL, timeout=60)
    assert body["status"] == "SUCCESS", body
    assert attempts() == 1
    assert execution_log.read_text().splitlines().count("hold group-stop") == RESTARTS + 1


def test_a_job_given_back_keeps_its_place_in_the_queue_and_its_attempt_count(own_redis: RedisServer) -> None:
    store = RedisJobStore(connect(own_redis.url), result_ttl_s=60)
    first, second = new_job("first"), new_job("second")
    for job in (first, second):
        store.jobs.submit(job, max_queue=10)
        store.jobs.confirm(job.job_id)
    claim = store.attempts.claim(first.job_id, "w", max_attempts=3, lock_ttl_s=60, timeout_s=600)
    assert claim.outcome is ClaimOutcome.CLAIMED and claim.attempts == 1
    assert store.attempts.give_back(first.job_id, "w") is AttemptOutcome.RETRY
    record = store.jobs.get(first.job_id)
    assert record is not None and record.state.value == "PENDING" and record.attempts == 0
    assert store.jobs.position(first.job_id) == 1  # ahead of the job submitted after it, as before it started
    assert store.attempts.give_back(first.job_id, "w") is AttemptOutcome.LOST  # no longer this worker's
