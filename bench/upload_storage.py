"""Benchmark: what one upload costs in storage, on each job backend (printed, not asserted).

N photos' worth of noise (a JPEG at quality 80: noise is the worst case for any re-encoding) go through
``POST /uploads`` of an in-process app. Embedded: the bytes the data folder (SQLite file, WAL and all) grew
by, then what it holds once the uploads expired and the store's own sweep ran. Distributed: Redis
``used_memory`` growth and ``MEMORY USAGE`` of one upload's key (a private redis-server; no worker runs), then
what a queued job takes in Redis, without and with an input image.

    .venv/bin/python bench/upload_storage.py [--uploads 3] [--size 4096] [--queued-jobs 20]
"""

from __future__ import annotations

import argparse
import base64
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis
from harness import Headline, Table, redis_server, report
from PIL import Image

from imagen.api.app import create_app
from imagen.config import Settings


def noise_jpeg(size: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def settings(work: Path, **overrides: Any) -> Settings:
    registry = work / "registry.yaml"
    registry.write_text("models:\n  - id: sdxl-base\n    name: SDXL\n    path: m.safetensors\n    size: 64\n")
    values: dict[str, Any] = {
        "data_dir": work / "data", "outputs_dir": work / "outputs", "registry_path": registry,
        "engine": "test-pattern", "key_max_upload_bytes": 1 << 40, "key_max_uploads": 1000, "max_queue": 1000,
    }  # fmt: skip
    values.update(overrides)
    return Settings(**values)


def post(client: Any, data: bytes) -> str:
    answer = client.post("/uploads", files={"file": ("noise.jpg", data, "image/jpeg")})
    assert answer.status_code == 201, answer.text[:300]
    return str(answer.json()["upload_id"])


def embedded(files: list[bytes], work: Path, ttl_s: float) -> list[object]:
    """The data folder's growth for ``files``, as a row of the report."""
    from fastapi.testclient import TestClient

    app = create_app(settings(work, upload_ttl_s=ttl_s))
    with TestClient(app) as client:
        before = folder_bytes(work / "data")
        for data in files:
            post(client, data)
        grown = folder_bytes(work / "data") - before
        time.sleep(ttl_s)  # a benchmark may wait; the tests expire uploads through the store's clock instead
        app.state.backend.store.purge_expired()
        left = folder_bytes(work / "data") - before
    sent = sum(map(len, files))
    return ["embedded: the data folder (SQLite file, WAL and all)", sent, f"{grown} ({grown / sent:.2f}x)",
            f"{left} bytes above the start after expiry and the sweep"]


def distributed(files: list[bytes], work: Path, jobs: int) -> tuple[list[object], list[object], float]:
    """Redis's growth for ``files`` and one upload's key, as rows of the report; a queued job's bytes without
    and with an init image, and the ratio of Redis's growth to the bytes sent."""
    from fastapi.testclient import TestClient

    with redis_server(work) as url:
        client = redis.Redis.from_url(url)
        app = create_app(settings(work, broker_url=url))
        with TestClient(app) as http:
            # Queued jobs first (no worker runs: they stay queued): text only, then each with a 1024² init image.
            queued = []
            init = "data:image/jpeg;base64," + base64.b64encode(noise_jpeg(1024, 99)).decode()
            for extra in ({}, {"init_image": init}):
                start = int(client.info("memory")["used_memory"])
                for index in range(jobs):
                    answer = http.post("/generate", json={"prompt": f"a queued job {index}", **extra})
                    assert answer.status_code == 201, answer.text[:300]
                queued.append((int(client.info("memory")["used_memory"]) - start) / jobs)
            before = int(client.info("memory")["used_memory"])
            ids = [post(http, data) for data in files]
            grown = int(client.info("memory")["used_memory"]) - before
            one = int(client.memory_usage(f"imagen:upload:{ids[0]}") or 0)
        client.close()
    sent = sum(map(len, files))
    uploads: list[object] = ["distributed: Redis used_memory", sent, f"{grown} ({grown / sent:.2f}x)",
                             f"MEMORY USAGE of one upload: {one} bytes for {len(files[0])} sent "
                             f"({one / len(files[0]):.2f}x)"]
    jobs_row: list[object] = [f"distributed: {jobs} queued jobs, bytes each", f"{queued[0]:.0f}", f"{queued[1]:.0f}"]
    return uploads, jobs_row, grown / sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", type=int, default=3)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--ttl-s", type=float, default=3.0)
    parser.add_argument("--queued-jobs", type=int, default=20)
    args = parser.parse_args()
    files = [noise_jpeg(args.size, seed) for seed in range(args.uploads)]
    with tempfile.TemporaryDirectory(prefix="imagen-uploads-") as tmp:
        (Path(tmp) / "embedded").mkdir()
        (Path(tmp) / "distributed").mkdir()
        embedded_row = embedded(files, Path(tmp) / "embedded", args.ttl_s)
        uploads_row, jobs_row, redis_ratio = distributed(files, Path(tmp) / "distributed", args.queued_jobs)
    report(
        f"Upload storage: {args.uploads} noise JPEGs of {args.size}x{args.size} at quality 80, "
        f"{len(files[0])} bytes each, through POST /uploads",
        Table(["where", "bytes sent", "grew by (bytes)", "then"], [embedded_row, uploads_row]),
        Table(["queued jobs", "text only", "with a 1024x1024 noise init image (kept as the normalised PNG the "
               "worker reads)"], [jobs_row]),
        headlines=[Headline("Redis growth per byte uploaded", f"{redis_ratio:.2f}x")],
    )


if __name__ == "__main__":
    main()
