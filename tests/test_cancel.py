"""POST /cancel/{job_id} on both job systems: a waiting job never starts, a running one stops at its
next step without an image and frees its worker at once, and the cancel is in the store, so it survives an
API restart. The scripted engine's "hold NAME" job reports progress, as a real engine does, until the test
releases its latch (tests/latches.py): a held job that is never released can only end by its cancel, so no
test needs to assume how long anything takes. The last test stops the real diffusers pipeline on the tiny
fixture model through ``pipe._interrupt``.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from imagen.errors import JobCancelled
from imagen.jobs.lifecycle import CANCELLED_BY_CLIENT
from tests.celery_support import CeleryCluster, celery_cluster, own_redis, shared_redis
from tests.conftest import ServerProcess, submit, wait_for, wait_status
from tests.latches import Latches
from tests.test_job_contract import job_system, worker_pids

__all__ = ["celery_cluster", "job_system", "own_redis", "shared_redis"]  # fixtures

TERMINAL = {"SUCCESS", "FAILURE", "REVOKED"}
STEPS = 10
LONG_JOB = "hold long"  # runs until its latch is released: these tests never release it
UNKNOWN_ID = "7f2b0887-3cdf-46ff-b83b-ff7685ac5b23"


def cancel(client: TestClient | httpx.Client, job_id: str) -> tuple[int, Any]:
    """POST /cancel: (status code, JSON body)."""
    response = client.post(f"/cancel/{job_id}")
    return response.status_code, response.json()


def assert_revoked(client: TestClient | httpx.Client, job_id: str) -> None:
    """What every route says about a cancelled job."""
    assert client.get(f"/status/{job_id}").json() == {
        "job_id": job_id, "status": "REVOKED", "result": None, "error": CANCELLED_BY_CLIENT,
    }
    image = client.get(f"/image/{job_id}")
    assert image.status_code == 410
    assert image.json() == {"detail": {"status": "revoked", "error": CANCELLED_BY_CLIENT}}
    assert cancel(client, job_id) == (200, {"job_id": job_id, "status": "REVOKED"})  # a second cancel: the same


def pngs(tmp_path: Path) -> list[str]:
    """The images in the API's outputs folder and in the distributed worker's (another host's) own."""
    return sorted(path.name for folder in ("outputs", "worker-outputs") for path in (tmp_path / folder).glob("*.png"))


# -- both job systems, through the API -----------------------------------------------------------------
def test_a_waiting_job_cancelled_never_runs(
    job_system: Callable[..., TestClient], execution_log: Path, latches: Latches
) -> None:
    client = job_system()
    blocker = submit(client, "hold blocker", steps=STEPS)
    latches.wait_started("blocker")
    waiting = submit(client, "cancelled while waiting")
    behind = submit(client, "queued behind it")

    assert cancel(client, waiting) == (200, {"job_id": waiting, "status": "REVOKED"})
    assert_revoked(client, waiting)
    # it left the queue: the next submission is second in line, behind "queued behind it" only
    assert client.post("/generate", json={"prompt": "last"}).json()["message"].endswith("Position estimée: 2")

    latches.release("blocker")
    assert wait_status(client, behind, TERMINAL)["status"] == "SUCCESS"
    assert wait_status(client, blocker, TERMINAL)["status"] == "SUCCESS"
    # the job behind it ran, so its message (distributed) came and went: dropped, never run
    assert "cancelled while waiting" not in execution_log.read_text().splitlines()
    assert_revoked(client, waiting)


def test_a_running_job_stops_at_its_next_step_and_the_worker_goes_on(
    job_system: Callable[..., TestClient], execution_log: Path, tmp_path: Path, latches: Latches
) -> None:
    client = job_system()
    running = submit(client, LONG_JOB, steps=STEPS)
    wait_for_denoising = wait_status(client, running, {"PROGRESS"})
    assert wait_for_denoising["meta"]["step"] == "generation_gpu"
    # The worker's heartbeat says it is ready (on a loaded machine one may be late: wait for it)
    (pid,) = wait_for(lambda: worker_pids(client))
    following = submit(client, "next job")  # waits for the worker

    assert cancel(client, running) == (200, {"job_id": running, "status": "REVOKED"})
    assert client.get(f"/status/{running}").json()["status"] == "REVOKED"

    done = wait_status(client, following, TERMINAL)
    assert done["status"] == "SUCCESS"
    # Its latch was never released: only the cancel, at the held job's next step, freed the worker.
    assert not (latches.folder / "long.release").exists()
    assert wait_for(lambda: worker_pids(client)) == [pid]  # same process, engine and model kept: nothing reloaded
    assert_revoked(client, running)
    assert pngs(tmp_path) == [done["result"]["filename"]]  # no image for the cancelled job, anywhere
    assert execution_log.read_text().splitlines() == [LONG_JOB, "next job"]


def test_cancel_answers_404_for_an_unknown_job_and_409_once_finished(job_system: Callable[..., TestClient]) -> None:
    client = job_system()
    assert cancel(client, UNKNOWN_ID) == (404, {"detail": "Job ID non trouvé"})

    succeeded, failed = submit(client, "quick"), submit(client, "fatal")
    for job_id, state in ((succeeded, "SUCCESS"), (failed, "FAILURE")):
        assert wait_status(client, job_id, TERMINAL)["status"] == state
        assert cancel(client, job_id) == (409, {"detail": {"status": state, "message": "Job déjà terminé"}})
        assert client.get(f"/status/{job_id}").json()["status"] == state  # unchanged
    assert client.get(f"/image/{succeeded}").status_code == 200


# -- durability: the cancel is in the store, not in the API process -------------------------------------
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL], ids=["graceful", "killed"])
def test_embedded_cancel_survives_a_restart(
    make_server: Callable[..., ServerProcess], execution_log: Path, tmp_path: Path, stop_signal: int
) -> None:
    server = make_server()
    server.start()
    with server.client() as http:
        running = submit(http, LONG_JOB, steps=STEPS)
        wait_status(http, running, {"PROGRESS"})
        waiting = submit(http, "cancelled while waiting")
        # the waiting one first: else the worker, freed, could start it before its cancel
        assert cancel(http, waiting)[0] == cancel(http, running)[0] == 200
    server.stop(stop_signal)  # at once: the child may not even have read its Cancel

    restarted = make_server()
    restarted.start()
    with restarted.client() as http:
        after = submit(http, "after the restart")
        done = wait_status(http, after, TERMINAL)
        assert done["status"] == "SUCCESS"
        for job_id in (running, waiting):
            assert_revoked(http, job_id)
    # neither ran again after the restart (a running job stopped by a restart normally does)
    assert execution_log.read_text().splitlines() == [LONG_JOB, "after the restart"]
    assert pngs(tmp_path) == [done["result"]["filename"]]


def test_distributed_cancel_survives_an_api_restart_and_reaches_the_worker(
    celery_cluster: CeleryCluster, make_server: Callable[..., ServerProcess], execution_log: Path, tmp_path: Path
) -> None:
    cluster = celery_cluster
    worker = cluster.start_worker()
    (pid,) = worker.children()
    server = make_server(broker_url=cluster.redis.url, job_lock_ttl_s="1.5")
    server.start()
    with server.client() as http:
        running = submit(http, LONG_JOB, steps=STEPS)
        wait_status(http, running, {"PROGRESS"})
        waiting = submit(http, "cancelled while waiting")
        following = submit(http, "next job")
        assert cancel(http, waiting)[0] == 200
        assert cancel(http, running)[0] == 200
    server.stop(signal.SIGKILL)  # the API goes; the worker learns of the cancel from Redis alone

    restarted = make_server(broker_url=cluster.redis.url, job_lock_ttl_s="1.5")
    restarted.start()
    with restarted.client() as http:
        done = wait_status(http, following, TERMINAL)
        assert done["status"] == "SUCCESS"  # the held job, never released, was stopped by its cancel
        for job_id in (running, waiting):
            assert_revoked(http, job_id)
    assert worker.children() == [pid]
    assert execution_log.read_text().splitlines() == [LONG_JOB, "next job"]
    assert pngs(tmp_path) == [done["result"]["filename"]]


# -- the real diffusers pipeline ----------------------------------------------------------------------
def test_the_diffusers_engine_stops_through_pipe_interrupt_and_writes_nothing(tmp_path: Path) -> None:
    from imagen.generation.base import STEP_GENERATION
    from imagen.generation.diffusers.engine import DiffusersEngine
    from imagen.generation.runner import run_task
    from tests.engine_fixtures import engine_settings, fixtures_registry, task

    engine = DiffusersEngine(fixtures_registry(), engine_settings(tmp_path / "data"))
    job = task(steps=STEPS)
    engine.generate(job, lambda step, percent: None)  # loads the model
    pipe = engine._models[job.model].pipe
    unet_calls: list[int] = []
    hook = pipe.unet.register_forward_hook(lambda *_: unet_calls.append(1))
    steps_reported: list[int] = []

    def cancel_after_three_steps(step: str, percent: int) -> None:
        if step == STEP_GENERATION and percent > 0:
            steps_reported.append(percent)
            if len(steps_reported) == 3:
                raise JobCancelled

    with pytest.raises(JobCancelled):
        run_task(engine, job, "cancelled.png", tmp_path / "outputs", cancel_after_three_steps)
    assert len(unet_calls) == 3  # the remaining 7 denoising steps were skipped: pipe._interrupt
    assert len(steps_reported) == 3
    assert pngs(tmp_path) == []

    unet_calls.clear()
    result = run_task(engine, job, "next.png", tmp_path / "outputs", lambda step, percent: None)
    hook.remove()
    assert len(unet_calls) == STEPS  # the same pipeline runs the next job in full
    assert engine.stats.model_loads == 1  # nothing reloaded
    assert pngs(tmp_path) == [result["filename"]]
