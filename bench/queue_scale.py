"""Benchmark: the queue's cost does not grow with its length (printed, not asserted). Target: p99 at 100,000
waiting within 2x of p99 at 100 waiting; >= 500 jobs/s through one Redis with 16 simulated workers.

For each backend (embedded: SQLite; distributed: a private redis-server) and 1 or 1,000 API keys, the queue is
filled to 100, 10,000 and 100,000 waiting jobs (straight into the store: an SQLite transaction, or submissions
from 8 threads), and at each length it measures, median and p99 of ``--samples`` calls (1,000: a p99 of 200
would be the second-worst call, one stall of the machine), the operations taken in turn and the queue held at
its length (each round adds two jobs and claims two):

- through a real ``imagen serve`` (test-pattern engine, ``IMAGEN_MAX_QUEUE`` far above the queue, nothing
  draining it: the embedded server's one worker holds a job of an hour, the distributed one has no worker):
  ``POST /generate`` (its answer gives the job's position) and ``GET /status`` of a job just submitted;
- on the store itself: a submission, a worker's claim of the fair queue's next job, and the position of the
  newest waiting job and of a random one (SQLite counts a job's index within its key from the nearer end of
  the key's queue, so a job in the middle of a long key costs more: that column shows it).

Then 16 processes, each a worker doing no work, claim and complete jobs from the longest Redis queue: jobs/s, and
the CPU Redis used meanwhile (so, what one Redis passes with its thread busy).

    .venv/bin/python bench/queue_scale.py [--quick | --throughput-only] [--backend B] [--keys K] [--samples 1000]
    [--throughput-jobs 4000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import cast

from harness import Headline, JsonClient, Table, imagen_env, redis_server, report, serve

from imagen.jobs.distributed.keys import WAITING
from imagen.jobs.distributed.outcomes import ClaimOutcome
from imagen.jobs.distributed.store import RedisJobStore, connect
from imagen.jobs.embedded.store import SqliteJobStore
from imagen.jobs.lifecycle import AttemptPolicy, OwnerToken
from imagen.jobs.types import JobState, NewJob

SIZES = (100, 10_000, 100_000)
QUICK_SIZES = (100, 10_000)
KEY_COUNTS = (1, 1_000)
MAX_QUEUE = 10_000_000
POLICY = AttemptPolicy(max_attempts=3, timeout_s=3600.0)
FILL_THREADS = 8
WORKERS = 16
OPERATIONS = ("POST /generate", "GET /status", "submit", "claim", "position (newest)", "position (random)")


def new_job(key_name: str) -> NewJob:
    job_id = uuid.uuid4().hex
    return NewJob(job_id=job_id, task={"prompt": "queued"}, output_name=f"{job_id}.png", key_name=key_name)


def median_p99(spent: list[float]) -> tuple[float, float]:
    ordered = sorted(spent)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def ms(value: float) -> str:
    return f"{value * 1000:.2f}"


# -- the two stores, as this benchmark fills and calls them ----------------------------------------------
class SqliteQueue:
    def __init__(self, path: Path) -> None:
        self.store = SqliteJobStore(path, policy=POLICY, result_ttl_s=3600)
        self.owner = OwnerToken.new()

    def fill(self, count: int, keys: int) -> None:
        """``count`` more waiting jobs, in one transaction (the store's triggers index them as a submit would)."""
        jobs = [new_job(f"key{index % keys}") for index in range(count)]
        with self.store.file.transaction() as db:
            db.executemany(
                "INSERT INTO jobs (job_id, state, task, output_name, created_at, key_name) "
                "VALUES (?, ?, '{}', ?, ?, ?)",
                [(job.job_id, JobState.PENDING.value, job.output_name, time.time(), job.key_name) for job in jobs],
            )

    def waiting_ids(self) -> list[str]:
        rows = self.store.file.connection().execute(
            "SELECT job_id FROM jobs WHERE state = ? ORDER BY seq", (JobState.PENDING.value,)
        )
        return [str(row[0]) for row in rows]

    def submit(self, key_name: str) -> None:
        self.store.submit(new_job(key_name), MAX_QUEUE)

    def claim(self) -> None:
        self.store.claim_next(self.owner)

    def position(self, job_id: str) -> None:
        self.store.position(job_id)

    def close(self) -> None:
        self.store.close()


class RedisQueue:
    def __init__(self, url: str) -> None:
        self.url = url
        self.store = RedisJobStore(connect(url), result_ttl_s=3600)

    def fill(self, count: int, keys: int) -> None:
        """``count`` more waiting jobs, submitted and confirmed by ``FILL_THREADS`` threads."""

        def submit_some(part: int) -> None:
            store = RedisJobStore(connect(self.url), result_ttl_s=3600)
            try:
                for index in range(part, count, FILL_THREADS):
                    job = new_job(f"key{index % keys}")
                    store.jobs.submit(job, MAX_QUEUE)
                    store.jobs.confirm(job.job_id)
            finally:
                store.close()

        with ThreadPoolExecutor(FILL_THREADS) as pool:
            list(pool.map(submit_some, range(FILL_THREADS)))

    def waiting_ids(self) -> list[str]:
        return [raw.decode() for raw in cast(list[bytes], self.store.client.zrange(WAITING, 0, -1))]

    def submit(self, key_name: str) -> None:
        job = new_job(key_name)
        self.store.jobs.submit(job, MAX_QUEUE)
        self.store.jobs.confirm(job.job_id)

    def claim(self) -> None:
        claim_next(self.store)

    def position(self, job_id: str) -> None:
        self.store.jobs.position(job_id)

    def close(self) -> None:
        self.store.close()


def claim_next(store: RedisJobStore) -> str | None:
    """A broker message reaches a worker: it starts the fair queue's next job (its id; None if none)."""
    claim = store.attempts.claim_next(
        str(OwnerToken.new(slot=uuid.uuid4().hex[:6])),
        ticket=uuid.uuid4().hex,
        max_attempts=3,
        lock_ttl_s=600.0,
        timeout_s=3600.0,
    )
    return claim.job_id if claim.outcome is ClaimOutcome.CLAIMED else None


Queue = SqliteQueue | RedisQueue


# -- one backend, one key count, every length ------------------------------------------------------------
@contextmanager
def backend_under_test(backend: str, workdir: Path) -> Iterator[tuple[Queue, str]]:
    """The store, and the URL of a real ``imagen serve`` on it with nothing draining the queue."""
    settings: dict[str, object] = {"engine": "test-pattern", "max_queue": MAX_QUEUE}
    if backend == "embedded":
        # The one worker slot holds one job for an hour: every other job waits.
        env = imagen_env(workdir, "embedded", workers=1, test_pattern_seconds=3600, **settings)
        with serve(env, workdir) as server:
            queue = SqliteQueue(workdir / "embedded-data" / "jobs.sqlite3")
            try:
                yield queue, server.url
            finally:
                queue.close()
        return
    with redis_server(workdir) as url:
        # No worker: every job waits. No reconciler publishing a message per waiting job it filled.
        env = imagen_env(workdir, "distributed", broker_url=url, reconcile_after_s=86_400, **settings)
        with serve(env, workdir) as server:
            redis_queue = RedisQueue(url)
            try:
                yield redis_queue, server.url
            finally:
                redis_queue.close()


def measure(queue: Queue, url: str, keys: int, samples: int, rng: random.Random) -> dict[str, list[float]]:
    """``samples`` timings of each operation, interleaved (one of each in turn, so that a stall of the machine
    falls on all of them alike), and the queue held at its length: each round adds two jobs (a POST and a
    submit) and takes two (a timed claim and one more)."""
    client = JsonClient(url)  # connected now: the server closes a keep-alive connection idle while filling
    spent: dict[str, list[float]] = {operation: [] for operation in OPERATIONS}

    def since(operation: str, start: float) -> None:
        spent[operation].append(time.perf_counter() - start)

    for _ in range(samples):
        start = time.perf_counter()
        job_id = client.submit({"prompt": "queued", "steps": 10})
        since("POST /generate", start)
        start = time.perf_counter()
        code, answer = client.call("GET", f"/status/{job_id}")
        since("GET /status", start)
        assert code == 200, answer  # waiting (or the one job the embedded worker holds)
        start = time.perf_counter()
        queue.submit(f"key{rng.randrange(keys)}")
        since("submit", start)
        start = time.perf_counter()
        queue.claim()
        since("claim", start)
        queue.claim()
    waiting = queue.waiting_ids()
    newest = waiting[-1]
    for _ in range(samples):
        start = time.perf_counter()
        queue.position(newest)
        since("position (newest)", start)
        job_id = rng.choice(waiting)
        start = time.perf_counter()
        queue.position(job_id)
        since("position (random)", start)
    return spent


@dataclass(frozen=True)
class Throughput:
    jobs_per_s: float
    redis_cpu: float  # CPU seconds Redis spent per second of the run (its one thread: at most 1)

    def per_redis_core(self) -> float:
        """Jobs/s one Redis would pass with its thread busy all the time, at this cost per job."""
        return self.jobs_per_s / self.redis_cpu if self.redis_cpu > 0 else float("inf")


def run(
    backend: str, keys: int, sizes: tuple[int, ...], samples: int, workdir: Path, throughput_jobs: int
) -> tuple[dict[int, dict[str, list[float]]], Throughput | None]:
    rng = random.Random(7)
    results: dict[int, dict[str, list[float]]] = {}
    rate = None
    with backend_under_test(backend, workdir) as (queue, url):
        for size in sizes:
            waiting = len(queue.waiting_ids())
            queue.fill(max(0, size - waiting), keys)
            results[size] = measure(queue, url, keys, samples, rng)
            print(f"{backend}, {keys} key(s), {size} waiting: measured", flush=True)
        if isinstance(queue, RedisQueue):
            rate = throughput(queue, throughput_jobs)
    return results, rate


def redis_cpu_seconds(queue: RedisQueue) -> float:
    info = queue.store.client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def throughput(queue: RedisQueue, jobs: int) -> Throughput:
    """Jobs per second claimed and completed by ``WORKERS`` processes doing no work, each on its own
    connection, from the queue as it is (topped up first so that it never runs dry). Processes, as workers
    are: threads of one process would measure Python's lock, not Redis."""
    queue.fill(jobs + WORKERS, 1)
    context = multiprocessing.get_context("spawn")
    start_line = context.Barrier(WORKERS + 1)
    shares = [jobs // WORKERS + (1 if index < jobs % WORKERS else 0) for index in range(WORKERS)]
    processes = [context.Process(target=claim_and_complete, args=(queue.url, share, start_line)) for share in shares]
    for process in processes:
        process.start()
    start_line.wait()  # every worker connected and ready
    start, cpu = time.perf_counter(), redis_cpu_seconds(queue)
    for process in processes:
        process.join()
    elapsed, cpu = time.perf_counter() - start, redis_cpu_seconds(queue) - cpu
    if any(process.exitcode != 0 for process in processes):
        raise SystemExit("a simulated worker failed")
    return Throughput(jobs / elapsed, cpu / elapsed)


def claim_and_complete(url: str, count: int, start_line: Barrier) -> None:
    """One simulated worker: ``count`` claims of the fair queue's next job, each completed at once."""
    store = RedisJobStore(connect(url), result_ttl_s=3600)
    try:
        store.client.ping()
        start_line.wait()
        for _ in range(count):
            token = str(OwnerToken.new(slot=uuid.uuid4().hex[:6]))
            claim = store.attempts.claim_next(
                token, ticket=uuid.uuid4().hex, max_attempts=3, lock_ttl_s=600.0, timeout_s=3600.0
            )
            if claim.outcome is ClaimOutcome.CLAIMED:
                name = f"{claim.job_id}.png"
                store.attempts.complete(claim.job_id, token, {"status": "success", "filename": name}, b"\x89PNG")
    finally:
        store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 and 10,000 waiting only")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--throughput-jobs", type=int, default=4000)
    parser.add_argument("--throughput-only", action="store_true", help="Redis throughput only, on 100 waiting")
    parser.add_argument("--backend", choices=("embedded", "distributed"), help="only this backend")
    parser.add_argument("--keys", type=int, choices=KEY_COUNTS, help="only this number of keys")
    args = parser.parse_args()
    sizes = (100,) if args.throughput_only else QUICK_SIZES if args.quick else SIZES
    rows, ratios, rates = [], [], []
    backends = ("distributed",) if args.throughput_only else ("embedded", "distributed")
    for backend in [name for name in backends if args.backend in (None, name)]:
        for keys in [count for count in KEY_COUNTS if args.keys in (None, count)]:
            with tempfile.TemporaryDirectory(prefix="imagen-bench-") as tmp:
                results, rate = run(backend, keys, sizes, args.samples, Path(tmp), args.throughput_jobs)
            for size, spent in results.items():
                figures = [median_p99(spent[operation]) for operation in OPERATIONS]
                rows.append([backend, f"{keys:,}", f"{size:,}", *(f"{ms(med)} / {ms(p99)}" for med, p99 in figures)])
            smallest, largest = results[sizes[0]], results[sizes[-1]]
            ratios.append([backend, f"{keys:,}", *(
                f"{median_p99(largest[operation])[1] / median_p99(smallest[operation])[1]:.2f}"
                for operation in OPERATIONS
            )])  # fmt: skip
            if rate is not None:
                rates.append([f"{keys:,}", f"{sizes[-1]:,}", f"{rate.jobs_per_s:,.0f}", f"{rate.redis_cpu:.2f}",
                              f"{rate.per_redis_core():,.0f}", ">= 500"])
    report(
        f"Queue cost against its length: median / p99 in ms of {args.samples} calls (test-pattern engine, nothing "
        "draining the queue)",
        Table(["backend", "keys", "waiting", *OPERATIONS], rows),
        Table(
            ["backend", "keys", *(f"{operation}: p99 at {sizes[-1]:,} / at {sizes[0]:,}" for operation in OPERATIONS)],
            ratios,
        ),
        Table(["keys", "waiting", f"jobs/s, {WORKERS} workers doing no work, one Redis",
               "Redis CPU (s per s)", "jobs/s at one busy Redis core", "target"], rates),
        notes=[f"Target: p99 ratio <= 2 (longest queue against {sizes[0]:,} waiting); >= 500 jobs/s. The workers "
               "share the machine's cores with Redis: 'jobs/s at one busy Redis core' is the measured rate divided "
               "by the CPU Redis used, what one Redis passes when clients on other cores keep it busy."],
        headlines=[
            *(Headline(f"{row[0]}, {row[1]} keys: worst p99 ratio", max(row[2:], key=float), "<= 2") for row in ratios),
            *(Headline(f"Redis, {row[0]} keys: jobs/s, {WORKERS} workers", row[2], ">= 500") for row in rates),
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
