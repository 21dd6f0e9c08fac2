"""The fair queue end to end, on both job backends with a real worker: keys take turns.

Routes do not pass key names yet, so jobs are submitted through the backend the API runs
(``app.state.backend``), each with its ``key_name``; the scripted engine logs the order jobs ran in.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient

from imagen.generation.base import GenerationTask
from imagen.jobs.backend import JobBackend
from imagen.jobs.types import NewJob
from tests.conftest import wait_status
from tests.latches import Latches
from tests.test_job_contract import job_system, shared_redis

__all__ = ["job_system", "shared_redis"]  # fixtures
TERMINAL = {"SUCCESS", "FAILURE"}


def keyed_job(key_name: str, prompt: str) -> NewJob:
    task = GenerationTask(
        prompt=prompt, negative_prompt="", model="sdxl-base", loras=(), steps=4, guidance_scale=7.0, seed=1,
        ip_strength=0.0,
    )
    return NewJob(
        job_id=str(uuid.uuid4()),
        task=task.as_dict(),
        output_name=f"sdxl_base_{uuid.uuid4().hex[:12]}.png",
        key_name=key_name,
    )


def test_a_second_key_starts_after_at_most_one_job_of_the_first(
    job_system: Callable[..., TestClient], execution_log: Path, latches: Latches
) -> None:
    client = job_system()
    backend: JobBackend = client.app.state.backend  # type: ignore[attr-defined]
    a_jobs = [keyed_job("alice", "hold a0"), *(keyed_job("alice", f"sleep 0.3 a{i}") for i in range(1, 5))]
    for job in a_jobs:
        backend.submit(job)
    latches.wait_started("a0")  # alice's first runs, her four others wait
    b_job = keyed_job("bob", "sleep 0.3 b0")
    submitted = backend.submit(b_job, key_max_waiting=1)
    latches.release("a0")
    assert submitted.position == 1  # only alice's running job is ahead of it
    for job in (*a_jobs, b_job):
        assert wait_status(client, job.job_id, TERMINAL, timeout=60)["status"] == "SUCCESS"
    ran = [line.split()[-1] for line in execution_log.read_text().splitlines()]
    assert sorted(ran) == sorted(["a0", "a1", "a2", "a3", "a4", "b0"])
    assert ran.index("b0") <= 1, ran  # bob's job did not wait for alice's whole batch
    assert [name for name in ran if name.startswith("a")] == ["a0", "a1", "a2", "a3", "a4"]  # FIFO per key
    record = backend.get(b_job.job_id)
    assert record is not None and record.key_name == "bob"
    assert backend.output_owner(b_job.output_name) == "bob"
    assert backend.output_owner(a_jobs[0].output_name) == "alice"
