"""Bodies over ``IMAGEN_MAX_BODY_BYTES`` get 413 at once, and the API reads no more than the limit.

Against a real ``imagen serve`` process: a 300 MB body, declared or chunked, is refused quickly, the
client could not push most of it, and the server's peak memory (VmHWM) barely moves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from imagen.api.body_limit import too_large_detail
from imagen.config import Settings
from tests.conftest import ServerProcess

BODY_BYTES = 300 * 1024 * 1024
CHUNK = b"x" * (64 * 1024)
LIMIT = Settings.model_fields["max_body_bytes"].default


def _peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


class _Body:
    """A 300 MB body produced as it is sent; counts what the client managed to push."""

    def __init__(self) -> None:
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        while self.sent < BODY_BYTES:
            self.sent += len(CHUNK)
            yield CHUNK


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_300_mb_body_gets_413_without_being_read(make_server: Callable[..., ServerProcess], declared: bool) -> None:
    server = make_server()
    server.start()
    assert server.process is not None
    with server.client() as client:
        assert client.post("/generate", json={"prompt": "warm up"}).status_code == 201
    peak_before = _peak_rss_bytes(server.process.pid)

    body = _Body()
    headers = {"Content-Type": "application/json"}
    if declared:
        headers["Content-Length"] = str(BODY_BYTES)
    started = time.monotonic()
    response = httpx.post(f"{server.url}/generate", content=body, headers=headers, timeout=30)
    elapsed = time.monotonic() - started

    assert response.status_code == 413
    assert response.json() == {"detail": too_large_detail(LIMIT)}
    assert elapsed < 10, elapsed
    assert body.sent < BODY_BYTES / 4, body.sent  # the server stopped reading: the rest could not be sent
    growth = _peak_rss_bytes(server.process.pid) - peak_before
    assert growth < LIMIT + 32 * 1024 * 1024, growth  # the body is 300 MB; before the limit the peak grew by 1.3 GB
    with server.client() as client:
        assert client.get("/health").status_code == 200


def test_declared_length_over_the_limit_is_refused_at_once(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_body_bytes=4096)
    body = json.dumps({"prompt": "x" * 5000}).encode()
    response = client.post("/generate", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json() == {"detail": "Requête trop volumineuse (max 4096 octets)"}
    assert response.headers["connection"] == "close"
    assert client.app.state.backend.store.count_waiting() == 0  # type: ignore[attr-defined]


def test_chunked_body_is_counted_as_it_streams(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_body_bytes=4096)
    over = json.dumps({"prompt": "x" * 5000}).encode()
    response = client.post("/generate", content=iter([over[:3000], over[3000:]]),
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json() == {"detail": "Requête trop volumineuse (max 4096 octets)"}


def test_a_body_at_the_limit_is_read(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_body_bytes=4096)
    prefix, suffix = b'{"prompt": "', b'"}'
    exactly = prefix + b"x" * (4096 - len(prefix) - len(suffix)) + suffix
    chunked = client.post("/generate", content=iter([exactly[:2000], exactly[2000:]]),
                          headers={"Content-Type": "application/json"})
    declared = client.post("/generate", content=exactly, headers={"Content-Type": "application/json"})
    assert chunked.status_code == declared.status_code == 201
