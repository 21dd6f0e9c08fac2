"""The OpenAI and AUTOMATIC1111 routes wait for their job and answer with the image. A wait must not outlive
its use: a client that goes away ends it, and its job is cancelled (``IMAGEN_CANCEL_ON_DISCONNECT``, on by
default: nobody else can fetch that image, and an SDK that retries would make a second one); a server that
stops (SIGTERM) ends every wait with a 503 instead of waiting for the jobs.

Real servers: uvicorn in a thread (tests/http_thread.py) in front of the app on both job backends, and a real
``imagen serve`` for SIGTERM. Jobs are held running by the test engine (``hold NAME``) until the test
releases them, so "the job is running" is a condition, never a timing.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.celery_support import shared_redis
from tests.conftest import ServerProcess, wait_for, wait_status
from tests.http_thread import http_server
from tests.latches import Latches
from tests.test_job_contract import job_system

__all__ = ["job_system", "shared_redis"]  # fixtures (job_system runs a test on both backends)

OPENAI = "/v1/images/generations"
TERMINAL = {"SUCCESS", "FAILURE", "REVOKED"}
A1111 = "/sdapi/v1/txt2img"


@contextmanager
def waiting_request(url: str, path: str, prompt: str) -> Iterator[socket.socket]:
    """A compatibility request sent on a raw connection, its answer not read: the connection is the
    client; closing it is the client going away."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": prompt, "steps": 10}).encode()
    sock = socket.create_connection((host, int(port)))
    try:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        yield sock
    finally:
        sock.close()


def a1111_job_id(client: TestClient) -> str:
    """The running /sdapi job of the caller, as A1111's own /progress shows it (shown while its request waits)."""
    job_id: str = wait_for(lambda: client.get("/sdapi/v1/progress").json()["state"]["job"])
    return job_id


def openai_job_id(database: Path, prompt: str) -> str:
    """OpenAI's API tells its client no job id: the embedded job database is read."""
    with sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True) as db:
        (row,) = db.execute("SELECT job_id FROM jobs WHERE task LIKE ?", (f'%"{prompt}"%',)).fetchall()
    return str(row[0])


def test_an_openai_client_that_goes_away_has_its_job_cancelled(
    make_client: Callable[..., TestClient], latches: Latches, tmp_path: Path
) -> None:
    client = make_client()
    with http_server(client) as url:
        try:
            with waiting_request(url, OPENAI, "hold gone"):
                latches.wait_started("gone")
                job_id = openai_job_id(tmp_path / "data" / "jobs.sqlite3", "hold gone")
                assert client.get(f"/status/{job_id}").json()["status"] in {"STARTED", "PROGRESS"}
            # the client went away while its job ran: the job ends without an image (old code: SUCCESS)
            assert wait_status(client, job_id, TERMINAL)["status"] == "REVOKED"
        finally:
            latches.release("gone")  # whatever happened, no worker stays held


def test_an_a1111_client_that_goes_away_has_its_job_cancelled_on_both_backends(
    job_system: Callable[..., TestClient], latches: Latches
) -> None:
    client = job_system()
    with http_server(client) as url:
        try:
            with waiting_request(url, A1111, "hold gone"):
                latches.wait_started("gone")
                job_id = a1111_job_id(client)
            assert wait_status(client, job_id, TERMINAL)["status"] == "REVOKED"
        finally:
            latches.release("gone")


def test_without_cancel_on_disconnect_the_job_runs_on(
    make_client: Callable[..., TestClient], latches: Latches, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="imagen.api")
    client = make_client(cancel_on_disconnect=False)
    with http_server(client) as url:
        try:
            with waiting_request(url, A1111, "hold kept"):
                latches.wait_started("kept")
                job_id = a1111_job_id(client)
            wait_for(lambda: f"job {job_id}: no longer waited for (its client went away); it runs on" in caplog.text)
        finally:
            latches.release("kept")
        assert wait_status(client, job_id, TERMINAL)["status"] == "SUCCESS"


@pytest.mark.parametrize("path", [OPENAI, A1111], ids=["openai", "a1111"])
def test_sigterm_ends_a_waiting_request_with_503_and_the_server_stops(
    make_server: Callable[..., ServerProcess], latches: Latches, tmp_path: Path, path: str
) -> None:
    server = make_server()
    server.start()
    assert server.process is not None
    try:
        with waiting_request(server.url, path, "hold stop") as sock:
            latches.wait_started("stop")
            server.process.send_signal(signal.SIGTERM)
            # Old code: uvicorn waited for the request, i.e. for the job (up to 32 minutes): never exited.
            server.process.wait(timeout=60)
            sock.settimeout(10)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:300]
    except subprocess.TimeoutExpired:
        pytest.fail("imagen serve did not stop while a request waited for its job")
    finally:
        latches.release("stop")
    with sqlite3.connect(f"{(tmp_path / 'data' / 'jobs.sqlite3').resolve().as_uri()}?mode=ro", uri=True) as db:
        assert db.execute("SELECT state FROM jobs").fetchall() == [("REVOKED",)]  # cancelled, not left to run


def test_a_request_that_comes_while_the_server_stops_answers_503(
    make_client: Callable[..., TestClient], latches: Latches
) -> None:
    client = make_client()
    client.app.state.waiters.end_all()  # what the server's shutdown does first (compat_jobs.Waiters)
    try:
        for path, prompt in [(OPENAI, "hold late-openai"), (A1111, "hold late-a1111")]:
            answer = client.post(path, json={"prompt": prompt, "steps": 10})
            assert answer.status_code == 503, answer.text
        assert answer.json()["detail"] == "the server is restarting; try again"
    finally:
        latches.release("late-openai")
        latches.release("late-a1111")
