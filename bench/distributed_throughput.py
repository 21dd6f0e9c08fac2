"""Benchmark: the distributed backend with one worker, then two (printed, not asserted).

A private redis-server, real `imagen worker` processes running the test-pattern engine (a generator that
takes a fixed time, as a GPU would), and the API side's ``CeleryBackend`` in this process.

1. Throughput: N jobs queued at once; jobs per second from the first enqueue to the last SUCCESS, with one
   worker and with two. Target: two workers >= 1.8x one.
2. Dispatch latency: jobs sent one at a time to an idle worker; the time from enqueue (record created) to a
   worker starting it (record claimed). Median; target <= 20 ms.

    .venv/bin/python bench/distributed_throughput.py [--jobs 24] [--generation-s 0.5] [--latency-jobs 40]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness import start_redis, test_pattern_cluster, wait  # noqa: E402

from imagen.api.schemas import GenerationRequest  # noqa: E402
from imagen.api.submission import prepare_job  # noqa: E402
from imagen.config import Settings  # noqa: E402
from imagen.jobs.distributed.backend import CeleryBackend  # noqa: E402
from imagen.jobs.types import JobRecord  # noqa: E402
from imagen.registry import load_registry  # noqa: E402


def start_workers(
    count: int, env: dict[str, str], workdir: Path, backend: CeleryBackend
) -> list[subprocess.Popen[bytes]]:
    workers = []
    for index in range(count):
        log = (workdir / f"worker-{index}.log").open("ab")
        workers.append(
            subprocess.Popen(
                [sys.executable, "-m", "imagen", "worker", "--gpu", str(index)],
                env=env,
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    wait(lambda: len(backend.store.workers.alive()) >= count, 60, f"{count} worker(s)")
    return workers


def stop_workers(workers: list[subprocess.Popen[bytes]], backend: CeleryBackend) -> None:
    for worker in workers:
        os.killpg(worker.pid, signal.SIGTERM)
    for worker in workers:
        worker.wait(timeout=30)
    backend.store.client.delete(*backend.store.client.keys("imagen:worker:*") or ["imagen:none"])


def submit(backend: CeleryBackend, settings: Settings, prompt: str) -> str:
    registry = load_registry(settings.registry_path)
    job = prepare_job(GenerationRequest(prompt=prompt, steps=10), registry, settings)
    return backend.submit(job).job_id


def finished(backend: CeleryBackend, job_ids: list[str]) -> list[JobRecord] | None:
    records = [backend.store.jobs.get(job_id) for job_id in job_ids]
    if all(r is not None and r.state.is_terminal() for r in records):
        return [r for r in records if r is not None]
    return None


def throughput(backend: CeleryBackend, settings: Settings, jobs: int) -> float:
    started = time.time()
    job_ids = [submit(backend, settings, f"throughput {i}") for i in range(jobs)]
    records: list[JobRecord] = []

    def done() -> bool:
        nonlocal records
        records = finished(backend, job_ids) or []
        return bool(records)

    wait(done, 600, "the throughput jobs", interval=0.005)
    assert all(r.state.value == "SUCCESS" for r in records), [r.error for r in records]
    last = max(r.finished_at or 0.0 for r in records)
    return jobs / (last - started)


def dispatch_latencies(backend: CeleryBackend, settings: Settings, jobs: int) -> list[float]:
    latencies = []
    for index in range(jobs):
        job_id = submit(backend, settings, f"latency {index}")
        records: list[JobRecord] = []

        def done(job_id: str = job_id) -> bool:
            nonlocal records
            records = finished(backend, [job_id]) or []
            return bool(records)

        wait(done, 60, "a latency job", interval=0.005)
        record = records[0]
        assert record.started_at is not None
        latencies.append(record.started_at - record.created_at)
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--generation-s", type=float, default=0.5)
    parser.add_argument("--latency-jobs", type=int, default=40)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="imagen-bench-") as tmp:
        workdir = Path(tmp)
        redis_process, url = start_redis(workdir, appendonly=True)
        env, settings = test_pattern_cluster(url, workdir, args.generation_s)
        backend = CeleryBackend(settings)
        backend.start()
        try:
            results: dict[int, float] = {}
            for count in (1, 2):
                workers = start_workers(count, env, workdir, backend)
                try:
                    submit_and_wait_one = dispatch_latencies(backend, settings, 2)  # warm-up
                    del submit_and_wait_one
                    results[count] = throughput(backend, settings, args.jobs)
                    if count == 1:
                        latencies = dispatch_latencies(backend, settings, args.latency_jobs)
                finally:
                    stop_workers(workers, backend)
            ideal = 1 / args.generation_s
            print(f"generator: test-pattern, {args.generation_s:g} s per 1024x1024 PNG; {args.jobs} jobs")
            print(f"1 worker : {results[1]:.2f} jobs/s ({results[1] / ideal:.0%} of one generator's rate)")
            print(f"2 workers: {results[2]:.2f} jobs/s ({results[2] / ideal:.0%})")
            print(f"throughput ratio 2 workers / 1 worker: {results[2] / results[1]:.2f}x (target >= 1.8x)")
            ms = sorted(1000 * value for value in latencies)
            print(
                f"enqueue -> worker start, {len(ms)} jobs to an idle worker: "
                f"median {statistics.median(ms):.1f} ms, "
                f"p90 {ms[int(0.9 * (len(ms) - 1))]:.1f} ms, max {ms[-1]:.1f} ms (target median <= 20 ms)"
            )
            print(
                json.dumps(
                    {
                        "throughput_1": results[1],
                        "throughput_2": results[2],
                        "ratio": results[2] / results[1],
                        "median_dispatch_ms": statistics.median(ms),
                    }
                )
            )
        finally:
            backend.stop()
            os.killpg(redis_process.pid, signal.SIGKILL)
            redis_process.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
