"""What the benchmarks share: a free loopback port, waiting for a condition, a private redis-server.

Benchmarks run as scripts (``python bench/x.py``), so this folder is on ``sys.path`` and they ``import harness``.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis


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
