"""Benchmark: Redis memory after many jobs on the distributed backend (printed, not asserted).

A private redis-server, one `imagen serve` (the API, a real process) and one `imagen worker`, both with
the test-pattern engine at 1024x1024. N jobs go through POST /generate and are polled to SUCCESS; then
Redis's ``used_memory`` and ``used_memory_peak`` are printed, with what the PNG index still holds. Finished
PNGs leave Redis once the API replica has copied them (``--slow-replica`` registers a replica that never
copies, to show ``IMAGEN_PNG_REDIS_MAX_BYTES`` at work instead). Target: no PNG left in Redis.

    .venv/bin/python bench/redis_memory.py [--jobs 500] [--size 1024] [--slow-replica]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import redis
from harness import Headline, JsonClient, Table, imagen_env, redis_server, report, serve, wait, workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--slow-replica", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imagen-redis-memory-") as tmp:
        measure(Path(tmp), args)


def measure(work: Path, args: argparse.Namespace) -> None:
    registry = work / "registry.yaml"
    registry.write_text(f"models:\n  - id: sdxl-base\n    name: SDXL\n    path: m.safetensors\n    size: {args.size}\n")
    with redis_server(work) as url:
        client = redis.Redis.from_url(url)
        if args.slow_replica:
            client.zadd("imagen:replicas", {"slow replica": (time.time() + 3600) * 1000})
        common = {"broker_url": url, "engine": "test-pattern", "registry_path": registry, "max_queue": args.jobs + 10}
        with serve(imagen_env(work, "api", **common), work) as server, \
                workers(1, imagen_env(work, "worker", **common), work):
            http = JsonClient(server.url, timeout=30)
            started = time.monotonic()
            ids = [http.submit({"prompt": f"job {i}"}) for i in range(args.jobs)]
            for job_id in ids:
                wait(lambda: http.call("GET", f"/status/{job_id}")[1]["status"] == "SUCCESS", 600, job_id)  # noqa: B023 - called at once
            elapsed = time.monotonic() - started
            http.close()
        copies = sorted((work / "api-outputs").glob("*.png"))
        wait(lambda: args.slow_replica or not list(client.scan_iter(match="imagen:png:*")), 30, "PNGs released")
        memory = client.info("memory")
        pngs = list(client.scan_iter(match="imagen:png:*"))
        png_size = client.strlen(pngs[0]) if pngs else copies[0].stat().st_size if copies else 0
        indexed = int(client.get("imagen:png_bytes") or 0)
        client.close()
    report(
        f"Redis memory after {args.jobs} jobs at {args.size}x{args.size} (test-pattern engine, one API replica"
        f"{', one replica that never copies' if args.slow_replica else ''})",
        Table(["what", "measured"], [
            ["jobs, all SUCCESS", f"{args.jobs} in {elapsed:.1f} s"],
            ["PNGs copied to the API replica", len(copies)],
            ["PNG size", f"{png_size} bytes"],
            ["PNGs still in Redis", f"{len(pngs)} ({indexed} bytes indexed)"],
            ["used_memory", f"{memory['used_memory']} ({memory['used_memory_human']})"],
            ["used_memory_peak", f"{memory['used_memory_peak']} ({memory['used_memory_peak_human']})"],
        ]),
        headlines=[Headline(f"Redis used_memory after {args.jobs} jobs", memory["used_memory_human"]),
                   Headline("PNGs left in Redis", str(len(pngs)), "0")],
    )


if __name__ == "__main__":
    main()
