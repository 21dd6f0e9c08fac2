"""Benchmark: the service's own overhead and /status throughput (printed, not asserted).

1. Overhead: a real `imagen serve` with the test-pattern engine taking a fixed time per job. For each
   job, the time from POST /generate to /status answering SUCCESS, minus that fixed time. Median of N.
   Target: <= 15 ms.
2. Throughput: GET /status requests per second served by the API pinned to one core, while a job runs,
   with the load generator (keep-alive connections, this file) on the other core. Target: >= 2,000/s.

    .venv/bin/python bench/service_overhead.py [--jobs 40] [--generation-s 0.2] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from harness import Headline, JsonClient, Table, imagen_env, report, serve


def measure_overhead(url: str, jobs: int, generation_s: float) -> list[float]:
    client = JsonClient(url, timeout=10)  # keep-alive, as a client would
    overheads = []
    for index in range(jobs + 2):
        start = time.perf_counter()
        job_id = client.submit({"prompt": f"benchmark {index}", "steps": 10})
        while (state := client.call("GET", f"/status/{job_id}")[1])["status"] not in ("SUCCESS", "FAILURE"):
            time.sleep(0.001)
        elapsed = time.perf_counter() - start
        assert state["status"] == "SUCCESS", state
        if index >= 2:  # the first jobs warm the worker
            overheads.append(elapsed - generation_s)
    client.close()
    return overheads


async def _status_load(host: str, port: int, path: str, seconds: float, connections: int) -> int:
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    done = 0
    stop_at = time.perf_counter() + seconds

    async def one_connection() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection(host, port)
        while time.perf_counter() < stop_at:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.decode())
            done += 1
        writer.close()

    await asyncio.gather(*(one_connection() for _ in range(connections)))
    return done


def measure_status_throughput(url: str, port: int, seconds: float, connections: int) -> tuple[float, str]:
    client = JsonClient(url, timeout=10)
    job_id = client.submit({"prompt": "long running job", "steps": 100})
    while client.call("GET", f"/status/{job_id}")[1]["status"] != "PROGRESS":
        time.sleep(0.01)
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    asyncio.run(_status_load("127.0.0.1", port, f"/status/{job_id}", 0.5, connections))  # warm-up
    count = asyncio.run(_status_load("127.0.0.1", port, f"/status/{job_id}", seconds, connections))
    state = str(client.call("GET", f"/status/{job_id}")[1]["status"])
    client.close()
    return count / seconds, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--generation-s", type=float, default=0.2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imagen-bench-") as tmp:
        workdir = Path(tmp)
        env = imagen_env(workdir, "serve", engine="test-pattern", test_pattern_seconds=args.generation_s)
        with serve(env, workdir) as server:
            overheads = measure_overhead(server.url, args.jobs, args.generation_s)
        # a long job for the throughput part; the API on core 0, the load generator on core 1
        env = imagen_env(workdir, "serve", engine="test-pattern", test_pattern_seconds=120)
        with serve(env, workdir, cpu=0) as server:
            rate, state_after = measure_status_throughput(server.url, server.port, args.seconds, args.connections)
    ms = sorted(o * 1000 for o in overheads)
    median, p90 = statistics.median(ms), ms[int(0.9 * (len(ms) - 1))]
    overhead = f"median {median:.1f} ms, p90 {p90:.1f} ms, min {ms[0]:.1f} ms"
    throughput = f"{rate:,.0f} requests/s"
    report(
        "The service's own overhead (test-pattern engine)",
        Table(["what", "measured", "target"], [
            [f"POST /generate -> SUCCESS minus {args.generation_s * 1000:.0f} ms generation ({len(ms)} jobs)",
             overhead, "<= 15 ms"],
            [f"GET /status on one core while a job runs ({state_after}), {args.connections} keep-alive connections",
             throughput, ">= 2,000/s"],
        ]),
        headlines=[Headline("service overhead per job (median)", f"{median:.1f} ms", "<= 15 ms"),
                   Headline("GET /status on one core", throughput, ">= 2,000/s")],
    )


if __name__ == "__main__":
    main()
