"""Benchmark: the fair queue, on each job backend with one worker (printed, not asserted).

Key A submits a batch of jobs, then key B submits one. With first-in, first-out B would wait for A's whole
batch; with the fair queue (``imagen.jobs.fairness``) B starts after at most one of A's jobs. For each
backend (embedded: SQLite and one worker slot; distributed: a private redis-server and one real
``imagen worker`` process), both running the test-pattern engine, it prints B's position at submission,
how many of A's jobs started before B's, and the FIFO figures for comparison.

    .venv/bin/python bench/fair_queue.py [--jobs 50] [--generation-s 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness import start_redis, test_pattern_cluster, wait  # noqa: E402

from imagen.api.schemas import GenerationRequest  # noqa: E402
from imagen.api.submission import prepare_job  # noqa: E402
from imagen.config import Settings  # noqa: E402
from imagen.jobs.backend import JobBackend  # noqa: E402
from imagen.jobs.distributed.backend import CeleryBackend  # noqa: E402
from imagen.jobs.embedded.backend import EmbeddedBackend  # noqa: E402
from imagen.jobs.types import JobRecord, NewJob  # noqa: E402
from imagen.registry import load_registry  # noqa: E402


def new_job(settings: Settings, key_name: str, prompt: str) -> NewJob:
    job = prepare_job(GenerationRequest(prompt=prompt, steps=10), load_registry(settings.registry_path), settings)
    return replace(job, key_name=key_name)


def run_scenario(backend: JobBackend, settings: Settings, jobs: int) -> dict[str, Any]:
    """A submits ``jobs`` jobs, then B one; wait for all; B's figures."""
    a_ids = [backend.submit(new_job(settings, "A", f"a {i}")).job_id for i in range(jobs)]
    states = [backend.get(job_id) for job_id in a_ids]
    waiting_before_b = sum(1 for r in states if r is not None and r.state.value == "PENDING")
    b = backend.submit(new_job(settings, "B", "b"))
    records: list[JobRecord] = []

    def done() -> bool:
        nonlocal records
        found = [backend.get(job_id) for job_id in [*a_ids, b.job_id]]
        records = [r for r in found if r is not None and r.state.is_terminal()]
        return len(records) == jobs + 1

    wait(done, 600, "the jobs", interval=0.02)
    assert all(r.state.value == "SUCCESS" for r in records), [r.error for r in records if r.error]
    b_record = next(r for r in records if r.job_id == b.job_id)
    assert b_record.started_at is not None
    a_before_b = sum(1 for r in records if r.key_name == "A" and (r.started_at or 0.0) < b_record.started_at)
    a_before_b_submitted = jobs - waiting_before_b  # started before B was even submitted (FIFO or fair alike)
    return {
        "b_position": b.position,
        "a_started_before_b": a_before_b,
        "fifo_b_position": waiting_before_b + 1,
        "fifo_a_started_before_b": jobs,
        "a_started_before_b_was_submitted": a_before_b_submitted,
    }


def embedded(workdir: Path, jobs: int, generation_s: float) -> dict[str, Any]:
    settings = Settings(
        engine="test-pattern",
        test_pattern_seconds=generation_s,
        workers=1,
        data_dir=workdir / "embedded-data",
        outputs_dir=workdir / "embedded-outputs",
        max_queue=1000,
    )
    backend = EmbeddedBackend(settings)
    backend.start()
    try:
        wait(lambda: all(w.ready for w in backend.health().workers), 60, "the embedded worker")
        return run_scenario(backend, settings, jobs)
    finally:
        backend.stop()


def distributed(workdir: Path, jobs: int, generation_s: float) -> dict[str, Any]:
    redis_process, url = start_redis(workdir, appendonly=False)
    env, settings = test_pattern_cluster(url, workdir, generation_s)
    backend = CeleryBackend(settings)
    backend.start()
    log = (workdir / "worker.log").open("ab")
    worker = subprocess.Popen(
        [sys.executable, "-m", "imagen", "worker"],
        env=env,
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait(lambda: any(beat.get("ready") for beat in backend.store.workers.alive()), 60, "the worker")
        return run_scenario(backend, settings, jobs)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)
        backend.stop()
        os.killpg(redis_process.pid, signal.SIGKILL)
        redis_process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--generation-s", type=float, default=0.1)
    args = parser.parse_args()
    print(f"one worker, test-pattern engine at {args.generation_s:g} s per job; key A submits {args.jobs} jobs, "
          "then key B submits 1")
    results = {}
    with tempfile.TemporaryDirectory(prefix="imagen-bench-") as tmp:
        for name, run in (("embedded", embedded), ("distributed", distributed)):
            figures = run(Path(tmp), args.jobs, args.generation_s)
            results[name] = figures
            print(
                f"{name:11}: B's position at submission {figures['b_position']} (FIFO: {figures['fifo_b_position']}); "
                f"A's jobs started before B's: {figures['a_started_before_b']} (FIFO: "
                f"{figures['fifo_a_started_before_b']}; target <= 1)"
            )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
