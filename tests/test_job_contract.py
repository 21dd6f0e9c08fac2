"""The job-system contract, through the HTTP API. Every job backend passes this same suite.

The ``job_system`` fixture starts the API on one backend with the given settings and returns a client;
the scripted test engine (tests/engines.py) makes jobs sleep, fail, crash or hang on demand.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.celery_support import RedisServer, shared_redis, start_celery_system
from tests.conftest import submit, wait_for, wait_status
from tests.latches import Latches

TERMINAL = {"SUCCESS", "FAILURE"}
RUNNING = {"STARTED", "PROGRESS"}


@pytest.fixture(params=["embedded", "celery"])
def job_system(
    request: pytest.FixtureRequest, make_client: Callable[..., TestClient], tmp_path: Path,
    reference_registry: Path,
) -> Callable[..., TestClient]:
    if request.param == "embedded":
        return make_client
    # Celery: a real redis-server, one `imagen worker` process whose outputs folder is not the API's.
    server: RedisServer = request.getfixturevalue("shared_redis")
    return start_celery_system(server, tmp_path, reference_registry, make_client, request)


def worker_pids(client: TestClient) -> list[int]:
    """The processes that run jobs, as /health lists them: the embedded backend's children, or the Celery
    workers' pool children (from their heartbeats)."""
    return [worker["pid"] for worker in client.get("/health").json()["workers"] if worker["ready"]]


__all__ = ["shared_redis"]  # a fixture, used through request.getfixturevalue


def test_job_runs_to_success_with_progress(
    job_system: Callable[..., TestClient], tmp_path: Path, latches: Latches
) -> None:
    client = job_system()
    # held in its generation step until the test has seen it there: no window to miss on a loaded machine
    job_id = submit(client, "hold progress", steps=10, seed=7)
    latches.wait_started("progress")
    running = wait_status(client, job_id, {"PROGRESS"})
    assert running["meta"]["step"] == "generation_gpu"
    assert 0 <= running["meta"]["progress"] <= 100
    assert running["result"] is None
    latches.release("progress")
    done = wait_status(client, job_id, TERMINAL)
    assert done["status"] == "SUCCESS"
    assert "meta" not in done and "error" not in done
    assert done["result"]["metadata"]["seed"] == 7
    assert (tmp_path / "outputs" / done["result"]["filename"]).is_file()


def test_position_is_the_place_in_the_queue(job_system: Callable[..., TestClient], latches: Latches) -> None:
    client = job_system()
    submit(client, "hold blocker")
    latches.wait_started("blocker")
    answers = [client.post("/generate", json={"prompt": f"job {i}"}).json() for i in range(3)]
    messages = [answer.get("message", answer) for answer in answers]
    latches.release("blocker")
    assert messages == [f"Tâche en file d'attente. Position estimée: {n}" for n in (1, 2, 3)]


def test_queue_full_answers_503(job_system: Callable[..., TestClient]) -> None:
    client = job_system(max_queue=3)
    blocker = submit(client, "hang")
    wait_status(client, blocker, RUNNING)
    waiting = [submit(client, f"waiting {i}") for i in range(3)]
    response = client.post("/generate", json={"prompt": "one too many"})
    assert response.status_code == 503
    assert response.json() == {"detail": "Queue pleine, réessayez plus tard"}
    assert all(client.get(f"/status/{job}").json()["status"] == "PENDING" for job in waiting)


def test_retryable_error_is_retried_then_fails_after_max_attempts(
    job_system: Callable[..., TestClient], execution_log: Path
) -> None:
    client = job_system(max_attempts=3)
    job_id = submit(client, "oom")
    done = wait_status(client, job_id, TERMINAL)
    assert done["status"] == "FAILURE"
    assert "out of memory" in done["error"]
    assert done["result"] is None
    assert execution_log.read_text().splitlines().count("oom") == 3
    # the queue keeps draining after a failed job
    after = submit(client, "next")
    assert wait_status(client, after, TERMINAL)["status"] == "SUCCESS"


def test_error_that_may_pass_succeeds_on_retry(job_system: Callable[..., TestClient], execution_log: Path) -> None:
    client = job_system()
    job_id = submit(client, "oom-once")
    assert wait_status(client, job_id, TERMINAL)["status"] == "SUCCESS"
    assert execution_log.read_text().splitlines().count("oom-once") == 2


def test_error_that_cannot_pass_fails_at_once(job_system: Callable[..., TestClient], execution_log: Path) -> None:
    client = job_system()
    job_id = submit(client, "fatal")
    done = wait_status(client, job_id, TERMINAL)
    assert done["status"] == "FAILURE"
    assert "weight file missing" in done["error"]
    assert execution_log.read_text().splitlines().count("fatal") == 1
    image = client.get(f"/image/{job_id}")
    assert image.status_code == 500
    assert image.json() == {"detail": {"status": "failed", "error": done["error"]}}


def test_timeout_fails_the_job_and_frees_the_worker(job_system: Callable[..., TestClient]) -> None:
    client = job_system(job_timeout_s=1.0)
    stuck = submit(client, "hang")
    following = submit(client, "after the hang")
    done = wait_status(client, stuck, TERMINAL)
    assert done["status"] == "FAILURE"
    assert "Timeout" in done["error"]
    assert wait_status(client, following, TERMINAL)["status"] == "SUCCESS"


def test_worker_killed_mid_job_the_job_still_completes_once(
    job_system: Callable[..., TestClient], tmp_path: Path, latches: Latches
) -> None:
    client = job_system()
    job_id = submit(client, "hold job")
    wait_status(client, job_id, {"PROGRESS"})
    (pid,) = worker_pids(client)
    os.kill(pid, signal.SIGKILL)
    latches.release("job")  # the killed attempt made no image; the next one ends at once
    done = wait_status(client, job_id, TERMINAL, timeout=30)
    assert done["status"] == "SUCCESS"
    assert [p.name for p in (tmp_path / "outputs").glob("*.png")] == [done["result"]["filename"]]
    wait_for(lambda: pid not in worker_pids(client))  # a dead pool child's heartbeat ages out (distributed)


def test_worker_that_crashes_is_replaced_and_the_job_retried(
    job_system: Callable[..., TestClient], execution_log: Path
) -> None:
    client = job_system()
    job_id = submit(client, "crash-once")
    assert wait_status(client, job_id, TERMINAL, timeout=30)["status"] == "SUCCESS"
    assert execution_log.read_text().splitlines().count("crash-once") == 2


def test_results_expire_after_the_ttl(job_system: Callable[..., TestClient], tmp_path: Path) -> None:
    client = job_system(result_ttl_s=1.0)
    job_id = submit(client, "quick")
    done = wait_status(client, job_id, TERMINAL)
    filename = done["result"]["filename"]
    wait_for(lambda: client.get(f"/status/{job_id}").status_code == 404, timeout=10)
    assert client.get(f"/status/{job_id}").json() == {"detail": "Job ID non trouvé"}
    assert client.get(f"/image/{job_id}").status_code == 404
    # the file stays, and /download still serves it
    assert client.get(f"/download/{filename}").status_code == 200


def test_unknown_job_is_404_never_pending(job_system: Callable[..., TestClient]) -> None:
    client = job_system()
    for path in ("/status/", "/image/"):
        response = client.get(path + "7f2b0887-3cdf-46ff-b83b-ff7685ac5b23")
        assert response.status_code == 404
        assert response.json() == {"detail": "Job ID non trouvé"}


def test_jobs_run_in_submission_order_one_at_a_time(
    job_system: Callable[..., TestClient], execution_log: Path
) -> None:
    client = job_system()
    prompts = [f"ordered {i}" for i in range(5)]
    jobs = [submit(client, prompt) for prompt in prompts]
    for job in jobs:
        assert wait_status(client, job, TERMINAL)["status"] == "SUCCESS"
    assert execution_log.read_text().splitlines() == prompts
