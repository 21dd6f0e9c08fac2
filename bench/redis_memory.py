"""Redis memory after many jobs on the distributed backend (printed, not asserted).

A private redis-server, one `imagen serve` (the API, a real process) and one `imagen worker`, both with
the test-pattern engine at 1024x1024. N jobs go through POST /generate and are polled to SUCCESS; then
Redis's ``used_memory`` and ``used_memory_peak`` are printed, with what the PNG index still holds. Finished
PNGs leave Redis once the API replica has copied them (``--slow-replica`` registers a replica that never
copies, to show ``IMAGEN_PNG_REDIS_MAX_BYTES`` at work instead).

    .venv/bin/python bench/redis_memory.py [--jobs 500] [--size 1024] [--slow-replica]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis
from harness import free_port, start_redis, wait

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--slow-replica", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imagen-redis-memory-"))
    registry = work / "registry.yaml"
    registry.write_text(f"models:\n  - id: sdxl-base\n    name: SDXL\n    path: m.safetensors\n    size: {args.size}\n")
    redis_process, url = start_redis(work, appendonly=False)
    api_port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "IMAGEN_BROKER_URL": url,
        "IMAGEN_ENGINE": "test-pattern",
        "IMAGEN_REGISTRY_PATH": str(registry),
        "IMAGEN_MAX_QUEUE": str(args.jobs + 10),
        "IMAGEN_DATA_DIR": str(work / "data"),
    }
    processes = [redis_process]
    client = redis.Redis.from_url(url)
    try:
        if args.slow_replica:
            client.zadd("imagen:replicas", {"slow replica": (time.time() + 3600) * 1000})
        logs = (work / "api.log").open("wb"), (work / "worker.log").open("wb")
        api_env = {**env, "IMAGEN_OUTPUTS_DIR": str(work / "api-outputs")}
        worker_env = {**env, "IMAGEN_OUTPUTS_DIR": str(work / "worker-outputs")}
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "imagen", "serve", "--host", "127.0.0.1", "--port", str(api_port)],
                env=api_env,
                stdout=logs[0],
                stderr=logs[0],
            )
        )
        processes.append(
            subprocess.Popen([sys.executable, "-m", "imagen", "worker"], env=worker_env, stdout=logs[1], stderr=logs[1])
        )
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30) as http:
            wait(lambda: _healthy(http), 60, "the API")
            started = time.monotonic()
            ids = [http.post("/generate", json={"prompt": f"job {i}"}).json()["job_id"] for i in range(args.jobs)]
            for job_id in ids:
                wait(lambda job_id=job_id: http.get(f"/status/{job_id}").json()["status"] == "SUCCESS", 600, job_id)
            elapsed = time.monotonic() - started
        copies = len(list((work / "api-outputs").glob("*.png")))
        wait(lambda: args.slow_replica or not list(client.scan_iter(match="imagen:png:*")), 30, "PNGs released")
        memory = client.info("memory")
        pngs = list(client.scan_iter(match="imagen:png:*"))
        print(
            f"jobs: {args.jobs} at {args.size}x{args.size} (test-pattern engine), all SUCCESS in {elapsed:.1f} s; "
            f"PNGs copied to the API replica: {copies}"
        )
        print(
            f"PNG size: {client.strlen(pngs[0]) if pngs else _png_size(work)} bytes; PNGs still in Redis: "
            f"{len(pngs)} ({int(client.get('imagen:png_bytes') or 0)} bytes indexed)"
        )
        print(
            f"used_memory: {memory['used_memory']} ({memory['used_memory_human']}); "
            f"used_memory_peak: {memory['used_memory_peak']} ({memory['used_memory_peak_human']})"
        )
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def _healthy(http: httpx.Client) -> bool:
    try:
        return http.get("/health").json().get("queue_broker") == "connected"
    except httpx.HTTPError:
        return False


def _png_size(work: Path) -> int:
    files = sorted((work / "api-outputs").glob("*.png"))
    return files[0].stat().st_size if files else 0


if __name__ == "__main__":
    main()
