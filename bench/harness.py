"""What the benchmarks share: a free loopback port, waiting for a condition, a private redis-server, and the
settings of a test-pattern cluster on it.

Benchmarks run as scripts (``python bench/x.py``), so this folder is on ``sys.path`` and they ``import harness``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import redis

if TYPE_CHECKING:
    from imagen.config import Settings

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(interval)


def start_redis(workdir: Path, *, appendonly: bool) -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server on 127.0.0.1 (its own session, so Ctrl-C goes to the benchmark); its URL."""
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
         "--appendonly", "yes" if appendonly else "no", "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    client = redis.Redis(port=port)

    def pings() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    wait(pings, 10, "redis-server")
    client.close()
    return process, f"redis://127.0.0.1:{port}/0"


def test_pattern_cluster(url: str, workdir: Path, generation_s: float) -> tuple[dict[str, str], Settings]:
    """For a distributed run on the Redis at ``url`` with the test-pattern engine: the environment of an
    ``imagen worker`` process (its own data and outputs folders) and the API side's settings."""
    from imagen.config import Settings  # the benchmark has put the repository on sys.path by now

    worker_env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "IMAGEN_BROKER_URL": url,
        "IMAGEN_ENGINE": "test-pattern",
        "IMAGEN_TEST_PATTERN_SECONDS": str(generation_s),
        "IMAGEN_DATA_DIR": str(workdir / "wdata"),
        "IMAGEN_OUTPUTS_DIR": str(workdir / "worker-outputs"),
    }
    api_settings = Settings(
        broker_url=url,
        engine="test-pattern",
        outputs_dir=workdir / "api-outputs",
        data_dir=workdir / "data",
        max_queue=1000,
    )
    return worker_env, api_settings
