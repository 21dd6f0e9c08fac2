"""Durability with real processes: stop or kill the service with jobs queued and start it again."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, wait_for
from tests.latches import Latches

TERMINAL = {"SUCCESS", "FAILURE"}


def _state(server: ServerProcess, job_id: str) -> str:
    with server.client() as http:
        status: str = http.get(f"/status/{job_id}").json()["status"]
        return status


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL], ids=["graceful", "killed"])
def test_restart_runs_every_queued_job_exactly_once(
    make_server: Callable[..., ServerProcess], execution_log: Path, tmp_path: Path, stop_signal: int,
    latches: Latches,
) -> None:
    server = make_server()
    server.start()
    with server.client() as http:
        running = http.post("/generate", json={"prompt": "hold job", "steps": 10}).json()["job_id"]
        wait_for(lambda: _state(server, running) == "PROGRESS", timeout=30)
        queued = {http.post("/generate", json={"prompt": f"queued {i}"}).json()["job_id"]: f"queued {i}"
                  for i in range(4)}
    server.stop(stop_signal)
    latches.release("job")  # stopped while held; after the restart it runs again and ends at once

    restarted = make_server()
    restarted.start()
    every_job = [running, *queued]
    wait_for(lambda: all(_state(restarted, job) in TERMINAL for job in every_job), timeout=60, interval=0.1)
    with restarted.client() as http:
        results = {job: http.get(f"/status/{job}").json() for job in every_job}
    assert {job: body["status"] for job, body in results.items()} == dict.fromkeys(every_job, "SUCCESS")

    runs = execution_log.read_text().splitlines()
    for prompt in queued.values():
        assert runs.count(prompt) == 1, runs
    # the job that was running when the process stopped ran again, and still left exactly one image
    assert runs.count("hold job") == 2
    images = sorted(p.name for p in (tmp_path / "outputs").glob("*.png"))
    assert images == sorted(body["result"]["filename"] for body in results.values())
