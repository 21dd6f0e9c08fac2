"""Benchmark: the service's own overhead and /status throughput (printed, not asserted).

1. Overhead: a real `imagen serve` with the test-pattern engine taking a fixed time per job. For each
   job, the time from POST /generate to /status answering SUCCESS, minus that fixed time. Median of N.
2. Throughput: GET /status requests per second served by the API pinned to one core, while a job runs,
   with the load generator (keep-alive connections, this file) on the other core.

    .venv/bin/python bench/service_overhead.py [--jobs 40] [--generation-s 0.2] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_json(method: str, url: str, body: dict[str, object] | None = None) -> tuple[int, dict[str, object]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def start_server(workdir: Path, generation_s: float, api_cpu: int | None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "IMAGEN_ENGINE": "test-pattern", "IMAGEN_TEST_PATTERN_SECONDS": str(generation_s),
           "IMAGEN_DATA_DIR": str(workdir / "data"), "IMAGEN_OUTPUTS_DIR": str(workdir / "outputs"),
           "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "imagen", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if api_cpu is not None and shutil.which("taskset"):
        command = ["taskset", "-c", str(api_cpu), *command]
    process = subprocess.Popen(command, env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if http_json("GET", f"{url}/health")[0] == 200:
                return process, url
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("server did not start")


def measure_overhead(url: str, jobs: int, generation_s: float) -> list[float]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)  # keep-alive, as a client would

    def call(method: str, path: str, body: dict[str, object] | None = None) -> tuple[int, dict[str, Any]]:
        payload = json.dumps(body).encode() if body is not None else None
        connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())

    overheads = []
    for index in range(jobs + 2):
        start = time.perf_counter()
        status, body = call("POST", "/generate", {"prompt": f"benchmark {index}", "steps": 10})
        assert status == 201, body
        job_id = body["job_id"]
        while True:
            _, state = call("GET", f"/status/{job_id}")
            if state["status"] in ("SUCCESS", "FAILURE"):
                break
            time.sleep(0.001)
        elapsed = time.perf_counter() - start
        assert state["status"] == "SUCCESS", state
        if index >= 2:  # the first jobs warm the worker
            overheads.append(elapsed - generation_s)
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


def measure_status_throughput(url: str, seconds: float, connections: int) -> tuple[float, str]:
    _, body = http_json("POST", f"{url}/generate", {"prompt": "long running job", "steps": 100})
    job_id = body["job_id"]
    while http_json("GET", f"{url}/status/{job_id}")[1]["status"] != "PROGRESS":
        time.sleep(0.01)
    host, port = url.removeprefix("http://").split(":")
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    asyncio.run(_status_load(host, int(port), f"/status/{job_id}", 0.5, connections))  # warm-up
    count = asyncio.run(_status_load(host, int(port), f"/status/{job_id}", seconds, connections))
    state = http_json("GET", f"{url}/status/{job_id}")[1]["status"]
    return count / seconds, str(state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--generation-s", type=float, default=0.2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imagen-bench-") as tmp:
        process, url = start_server(Path(tmp), args.generation_s, api_cpu=None)
        try:
            overheads = measure_overhead(url, args.jobs, args.generation_s)
        finally:
            process.kill()
            process.wait()
        # a long job for the throughput part; the API on core 0, the load generator on core 1
        process, url = start_server(Path(tmp), 120.0, api_cpu=0)
        try:
            rate, state_after = measure_status_throughput(url, args.seconds, args.connections)
        finally:
            process.kill()
            process.wait()
    ms = sorted(o * 1000 for o in overheads)
    print(f"service overhead, POST /generate -> SUCCESS minus {args.generation_s * 1000:.0f} ms generation "
          f"({len(ms)} jobs): median {statistics.median(ms):.1f} ms, p90 {ms[int(0.9 * (len(ms) - 1))]:.1f} ms, "
          f"min {ms[0]:.1f} ms  (target <= 15 ms)")
    print(f"GET /status on one core while a job runs ({state_after}): {rate:,.0f} requests/s "
          f"with {args.connections} keep-alive connections  (target >= 2,000/s)")


if __name__ == "__main__":
    main()
