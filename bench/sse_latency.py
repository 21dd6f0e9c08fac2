"""Benchmark: the delay from a change in the job store to the event at a client, with many
`GET /events` streams open (printed, not asserted). Targets: p99 <= 50 ms embedded, <= 100 ms distributed.

A real `imagen serve` (pinned to one core when there are two) and, in this process (the other core), the
clients: raw asyncio sockets, so the client side adds as little as it can. Each round queues a job that
stays PENDING (embedded: behind a job that runs for an hour; distributed: no worker runs), opens N streams
on it, waits until each has its first event, then cancels the job: the store change is the REVOKED write.
A client's delay is from just before the cancel request is sent to the moment it reads the REVOKED event,
so it also counts the cancel request's own time (an upper bound of the store-to-client delay).

    .venv/bin/python bench/sse_latency.py [--streams 500] [--rounds 4] [--backend embedded|distributed|both]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness import free_port, start_redis, wait  # noqa: E402


def start_api(env: dict[str, str], workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "imagen", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if (os.cpu_count() or 1) > 1 and shutil.which("taskset"):
        command = ["taskset", "-c", "0", *command]  # one API process on one core
    log = (workdir / "api.log").open("ab")
    process = subprocess.Popen(command, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait(healthy, 60, "the API")
    return process, url


def submit(url: str, prompt: str) -> str:
    response = httpx.post(f"{url}/generate", json={"prompt": prompt, "steps": 10}, timeout=10)
    response.raise_for_status()
    job_id: str = response.json()["job_id"]
    return job_id


async def follow(port: int, job_id: str, opened: asyncio.Event, counter: list[int], total: int) -> float:
    """Open a stream; count it once its first event arrived; the time (perf_counter) REVOKED arrives."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /events/{job_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    seen = b""
    first = True
    try:
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                raise RuntimeError("stream closed before REVOKED")
            seen = seen[-200:] + chunk
            if first and b"event: status" in seen:
                first = False
                counter[0] += 1
                if counter[0] == total:
                    opened.set()
            if b'"REVOKED"' in seen:
                return time.perf_counter()
    finally:
        writer.close()


async def one_round(url: str, streams: int) -> list[float]:
    port = int(url.rsplit(":", 1)[1])
    job_id = submit(url, "stays pending")
    opened = asyncio.Event()
    counter = [0]
    tasks = [asyncio.create_task(follow(port, job_id, opened, counter, streams)) for _ in range(streams)]
    await asyncio.wait_for(opened.wait(), 60)
    await asyncio.sleep(0.5)  # quiet before the change
    async with httpx.AsyncClient(base_url=url) as client:
        changed_at = time.perf_counter()
        response = await client.post(f"/cancel/{job_id}")
        assert response.status_code == 200, response.text
    arrivals = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    return [(arrival - changed_at) * 1000 for arrival in arrivals]


def measure(name: str, env: dict[str, str], workdir: Path, streams: int, rounds: int) -> None:
    api, url = start_api(env, workdir)
    try:
        if name == "embedded":
            blocker = submit(url, "runs for an hour")  # the only worker slot is busy: new jobs stay PENDING
            wait(lambda: httpx.get(f"{url}/status/{blocker}").json()["status"] != "PENDING", 30, "the blocker")
        asyncio.run(one_round(url, streams))  # warm-up: connections, threads, their SQLite connections
        delays: list[float] = []
        for _ in range(rounds):
            delays += (got := asyncio.run(one_round(url, streams)))
            print(f"  round: min {min(got):.1f} max {max(got):.1f}")
        delays.sort()
        p50 = statistics.median(delays)
        p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
        print(f"{name}: {streams} streams x {rounds} rounds, store change -> client event: "
              f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {delays[-1]:.1f} ms")
    finally:
        os.killpg(api.pid, signal.SIGTERM)
        api.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--backend", choices=["embedded", "distributed", "both"], default="both")
    args = parser.parse_args()
    if (os.cpu_count() or 1) > 1 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {1})  # the clients off the API's core
    with tempfile.TemporaryDirectory(prefix="imagen-bench-") as tmp:
        workdir = Path(tmp)
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "IMAGEN_ENGINE": "test-pattern",
            "IMAGEN_TEST_PATTERN_SECONDS": "3600",
            "IMAGEN_DATA_DIR": str(workdir / "data"),
            "IMAGEN_OUTPUTS_DIR": str(workdir / "outputs"),
            "IMAGEN_MAX_QUEUE": "10000",
        }
        if args.backend in ("embedded", "both"):
            measure("embedded", env, workdir, args.streams, args.rounds)
        if args.backend in ("distributed", "both"):
            redis_process, redis_url = start_redis(workdir, appendonly=False)
            try:
                measure("distributed", {**env, "IMAGEN_BROKER_URL": redis_url}, workdir, args.streams, args.rounds)
            finally:
                redis_process.terminate()
                redis_process.wait(timeout=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
