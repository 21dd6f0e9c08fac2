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
import statistics
import tempfile
import time
from pathlib import Path

from harness import Headline, Table, new_job, redis_server, report, test_pattern_cluster, wait, wait_finished, workers

from imagen.config import Settings
from imagen.jobs.distributed.backend import CeleryBackend


def submit(backend: CeleryBackend, settings: Settings, prompt: str) -> str:
    return backend.submit(new_job(settings, prompt)).job_id


def throughput(backend: CeleryBackend, settings: Settings, jobs: int) -> float:
    started = time.time()
    job_ids = [submit(backend, settings, f"throughput {i}") for i in range(jobs)]
    records = wait_finished(backend, job_ids, 600, interval=0.005)
    last = max(r.finished_at or 0.0 for r in records)
    return jobs / (last - started)


def dispatch_latencies(backend: CeleryBackend, settings: Settings, jobs: int) -> list[float]:
    latencies = []
    for index in range(jobs):
        record = wait_finished(backend, [submit(backend, settings, f"latency {index}")], 60, interval=0.005)[0]
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
        with redis_server(workdir, appendonly=True) as url:
            env, settings = test_pattern_cluster(url, workdir, args.generation_s)
            backend = CeleryBackend(settings)
            backend.start()
            try:
                results: dict[int, float] = {}
                for count in (1, 2):
                    with workers(count, env, workdir):
                        wait(lambda: len(backend.store.workers.alive()) >= count, 60, f"{count} worker(s)")  # noqa: B023 - called at once
                        dispatch_latencies(backend, settings, 2)  # warm-up
                        results[count] = throughput(backend, settings, args.jobs)
                        if count == 1:
                            latencies = dispatch_latencies(backend, settings, args.latency_jobs)
                    # the stopped workers' heartbeats, so that the next count waits for live ones
                    backend.store.client.delete(*backend.store.client.keys("imagen:worker:*") or ["imagen:none"])
            finally:
                backend.stop()
    ideal = 1 / args.generation_s
    ms = sorted(1000 * value for value in latencies)
    ratio = results[2] / results[1]
    median = statistics.median(ms)
    report(
        f"Distributed backend: test-pattern engine at {args.generation_s:g} s per 1024x1024 PNG",
        Table(["what", "measured", "target"], [
            [f"1 worker, {args.jobs} jobs", f"{results[1]:.2f} jobs/s ({results[1] / ideal:.0%} of one generator's "
             "rate)", ""],
            [f"2 workers, {args.jobs} jobs", f"{results[2]:.2f} jobs/s ({results[2] / ideal:.0%})", ""],
            ["throughput ratio 2 workers / 1 worker", f"{ratio:.2f}x", ">= 1.8x"],
            [f"enqueue -> worker start, {len(ms)} jobs to an idle worker",
             f"median {median:.1f} ms, p90 {ms[int(0.9 * (len(ms) - 1))]:.1f} ms, max {ms[-1]:.1f} ms",
             "median <= 20 ms"],
        ]),
        headlines=[Headline("throughput, 2 workers / 1", f"{ratio:.2f}x", ">= 1.8x"),
                   Headline("enqueue -> worker start (median)", f"{median:.1f} ms", "<= 20 ms")],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
