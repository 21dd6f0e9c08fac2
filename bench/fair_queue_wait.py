"""Benchmark: how long a second key waits behind a first key's batch, on each job backend with one worker
(printed, not asserted). Target: at most one of the first key's jobs starts before the second key's.

Key A submits a batch of jobs, then key B submits one. With first-in, first-out B would wait for A's whole
batch; with the fair queue (``imagen.jobs.fairness``) B starts after at most one of A's jobs. For each
backend (embedded: SQLite and one worker slot; distributed: a private redis-server and one real
``imagen worker`` process), both running the test-pattern engine, it prints B's position at submission,
how many of A's jobs started before B's, and the FIFO figures for comparison.

    .venv/bin/python bench/fair_queue_wait.py [--jobs 50] [--generation-s 0.1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from harness import Headline, Table, new_job, redis_server, report, test_pattern_cluster, wait, wait_finished, workers

from imagen.config import Settings
from imagen.jobs.backend import JobBackend
from imagen.jobs.distributed.backend import CeleryBackend
from imagen.jobs.embedded.backend import EmbeddedBackend


def run_scenario(backend: JobBackend, settings: Settings, jobs: int) -> dict[str, int]:
    """A submits ``jobs`` jobs, then B one; wait for all; B's figures."""
    a_ids = [backend.submit(new_job(settings, f"a {i}", key_name="A")).job_id for i in range(jobs)]
    states = [backend.get(job_id) for job_id in a_ids]
    waiting_before_b = sum(1 for r in states if r is not None and r.state.value == "PENDING")
    b = backend.submit(new_job(settings, "b", key_name="B"))
    records = wait_finished(backend, [*a_ids, b.job_id], 600, interval=0.02)
    b_record = next(r for r in records if r.job_id == b.job_id)
    assert b_record.started_at is not None
    a_before_b = sum(1 for r in records if r.key_name == "A" and (r.started_at or 0.0) < b_record.started_at)
    return {
        "b_position": b.position,
        "a_started_before_b": a_before_b,
        "fifo_b_position": waiting_before_b + 1,
        "fifo_a_started_before_b": jobs,
        "a_started_before_b_was_submitted": jobs - waiting_before_b,  # FIFO or fair alike
    }


def embedded(workdir: Path, jobs: int, generation_s: float) -> dict[str, int]:
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


def distributed(workdir: Path, jobs: int, generation_s: float) -> dict[str, int]:
    with redis_server(workdir) as url:
        env, settings = test_pattern_cluster(url, workdir, generation_s)
        backend = CeleryBackend(settings)
        backend.start()
        try:
            with workers(1, env, workdir):
                wait(lambda: any(beat.get("ready") for beat in backend.store.workers.alive()), 60, "the worker")
                return run_scenario(backend, settings, jobs)
        finally:
            backend.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--generation-s", type=float, default=0.1)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="imagen-bench-") as tmp:
        for name, run in (("embedded", embedded), ("distributed", distributed)):
            results[name] = run(Path(tmp), args.jobs, args.generation_s)
    report(
        f"Fair queue: one worker, test-pattern engine at {args.generation_s:g} s per job; key A submits "
        f"{args.jobs} jobs, then key B submits 1",
        Table(["backend", "B's position at submission (FIFO)", "A's jobs started before B's (FIFO)", "target"], [
            [name, f"{figures['b_position']} ({figures['fifo_b_position']})",
             f"{figures['a_started_before_b']} ({figures['fifo_a_started_before_b']})", "<= 1"]
            for name, figures in results.items()
        ]),
        headlines=[Headline(f"{name}: A's jobs started before B's", str(figures["a_started_before_b"]), "<= 1")
                   for name, figures in results.items()],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
