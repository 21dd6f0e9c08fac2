"""The embedded backend's SQLite file under faults, with real files and a real ``imagen serve``.

- Full (a file-size limit stands in for the disk): the same 503, and jobs are taken again once there is room.
- Locked by another writer (a separate connection holding ``BEGIN EXCLUSIVE``): a write answers 503 with a
  French ``detail`` and Retry-After within ``IMAGEN_DATABASE_BUSY_TIMEOUT_S``, the keep-alive connection
  carries on, and the next request on it works once the lock is gone. Reads are not blocked by a writer in WAL
  mode: ``/status`` goes on answering from the file.
- Deleted or replaced under the server: ``/health`` says unavailable (503) and why, submissions answer 503,
  the log says so loudly, and nothing is created at the path.
- Truncated under the server: ``/status`` never answers 500, and SIGTERM still stops the API.
- Damaged at start (header overwritten, truncated, emptied): ``imagen serve`` exits with a message that names
  the file and how to recover, no traceback, and leaves the file as it was.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from imagen.api.app import DATABASE_DOWN
from imagen.jobs.embedded.store import SqliteJobStore
from imagen.jobs.lifecycle import AttemptPolicy
from imagen.jobs.types import NewJob
from tests.conftest import REPO, ServerProcess, submit, wait_for, wait_status

TERMINAL = {"SUCCESS", "FAILURE", "REVOKED"}


def database(tmp_path: Path) -> Path:
    return tmp_path / "data" / "jobs.sqlite3"


def exchange(
    sock: socket.socket, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on an open keep-alive connection, and its whole answer."""
    payload = b"" if body is None else json.dumps(body).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(payload)}\r\n"
    if body is not None:
        head += "Content-Type: application/json\r\n"
    sock.sendall(head.encode() + b"\r\n" + payload)
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed by the server before an answer to {method} {path}"
        received += chunk
    raw_head, _, rest = received.partition(b"\r\n\r\n")
    status_line, *lines = raw_head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of an answer"
        rest += chunk
    return int(status_line.split()[1]), headers, rest[:length]


def test_a_locked_database_answers_503_soon_and_the_keep_alive_connection_carries_on(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = make_server(database_busy_timeout_s="0.5")
    server.start()
    with server.client() as http:
        done = submit(http, "before the lock")
        assert wait_status(http, done, TERMINAL)["status"] == "SUCCESS"
    holder = sqlite3.connect(database(tmp_path), isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")  # as a backup tool or a stray shell would hold it
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            # Old code: a plain-text 500 after the 30 s busy timeout, then a reset connection.
            sock.settimeout(20)
            status, headers, body = exchange(sock, "POST", "/generate", {"prompt": "while locked"})
            assert (status, json.loads(body)) == (503, {"detail": DATABASE_DOWN})
            assert headers["retry-after"].isdigit() and headers.get("connection") != "close"
            status, headers, body = exchange(sock, "POST", f"/cancel/{done}")  # a write too
            assert (status, json.loads(body)) == (503, {"detail": DATABASE_DOWN}) and "retry-after" in headers
            # In WAL mode a writer's lock does not block readers: the truth, not a 503.
            status, _, body = exchange(sock, "GET", f"/status/{done}")
            assert status == 200 and json.loads(body)["status"] == "SUCCESS"
            holder.execute("ROLLBACK")
            # The same connection, once the lock is gone.
            status, _, body = exchange(sock, "POST", "/generate", {"prompt": "after the lock"})
            assert status == 201, body
            job_id = json.loads(body)["job_id"]
    finally:
        holder.close()
    with server.client() as http:
        assert wait_status(http, job_id, TERMINAL)["status"] == "SUCCESS"
    assert "job database" in server.log_path.read_text() and "locked" in server.log_path.read_text()


def test_a_database_that_cannot_grow_answers_503_and_takes_jobs_again_once_it_can(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """A full disk, as an unprivileged test can make one: the server's file-size limit (RLIMIT_FSIZE, set
    from outside with prlimit) stops its write-ahead log from growing. SQLite reports that as a write I/O
    error (a real ENOSPC is SQLITE_FULL): both are the same 503."""
    server = make_server()
    server.start()
    assert server.process is not None
    path = database(tmp_path)
    with server.client() as http:
        assert wait_status(http, submit(http, "before"), TERMINAL)["status"] == "SUCCESS"
        with sqlite3.connect(path) as other:  # the log emptied into the file: new writes must grow it
            other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        limit = server.log_path.stat().st_size + 256 * 1024  # room for the server's log lines
        resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        try:
            for _ in range(2000):  # each accepted job grows the log; bounded in count
                answer = http.post("/generate", json={"prompt": "until the disk is full"})
                if answer.status_code != 201:
                    break
            assert (answer.status_code, answer.json()) == (503, {"detail": DATABASE_DOWN}), answer.text
            assert "retry-after" in answer.headers
        finally:
            resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        after = http.post("/generate", json={"prompt": "room again"})  # the same keep-alive connection
        assert after.status_code == 201, after.text
        assert wait_status(http, after.json()["job_id"], TERMINAL)["status"] == "SUCCESS"
    assert "disk I/O error" in server.log_path.read_text()


def replace_with_a_copy(path: Path) -> None:
    shutil.copy(path, path.with_name("copy.sqlite3"))
    os.replace(path.with_name("copy.sqlite3"), path)  # same content, another file


@pytest.mark.parametrize(
    ("fault", "change", "said"),
    [("deleted", Path.unlink, "deleted while the server runs"), ("replaced", replace_with_a_copy, "replaced")],
)
def test_a_database_deleted_or_replaced_under_the_server_is_reported_and_takes_no_new_job(
    make_server: Callable[..., ServerProcess], tmp_path: Path, fault: str, change: Callable[[Path], None], said: str
) -> None:
    server = make_server()
    server.start()
    path = database(tmp_path)
    with server.client() as http:
        done = submit(http, "before")
        assert wait_status(http, done, TERMINAL)["status"] == "SUCCESS"
        change(path)
        health = http.get("/health")
        assert health.status_code == 503, health.text
        assert health.json()["status"] == "unavailable"
        assert any(said in reason and "job database" in reason for reason in health.json()["reasons"])
        refused = http.post("/generate", json={"prompt": "would be lost"})
        assert (refused.status_code, refused.json()) == (503, {"detail": DATABASE_DOWN})
        assert "retry-after" in refused.headers
    assert (path.exists()) is (fault == "replaced")  # nothing was created where the file was deleted
    wait_for(lambda: f"job database {path}: {said}" in server.log_path.read_text())
    server.stop()


def test_a_database_truncated_under_the_server_never_answers_500_and_sigterm_stops_it(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = make_server()
    server.start()
    path = database(tmp_path)
    with server.client() as http:
        jobs = [submit(http, f"job {n}") for n in range(5)]
        for job_id in jobs:
            assert wait_status(http, job_id, TERMINAL)["status"] == "SUCCESS"
        with sqlite3.connect(path) as other:  # everything into the file itself, then the file cut
            other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        os.truncate(path, 0)
        answers = [http.get(f"/status/{job_id}") for job_id in [*jobs, "0" * 32]]
        assert {answer.status_code for answer in answers} == {503}, [a.text for a in answers]  # never a 500
        assert all(answer.json() == {"detail": DATABASE_DOWN} for answer in answers)
        refused = http.post("/generate", json={"prompt": "after"})
        assert (refused.status_code, refused.json()) == (503, {"detail": DATABASE_DOWN})
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        assert any(reason.startswith("job database damaged") for reason in health.json()["reasons"]), health.text
    server.stop(signal.SIGTERM)  # waits for the exit (bounded): old code never stopped
    # Restarted, it never starts silently over an empty database: it refuses the file, or finds its jobs.
    restarted = run_serve(server)
    if restarted.returncode == 1:
        assert str(path) in restarted.stderr and "Traceback" not in restarted.stderr, restarted.stderr
    else:
        pytest.fail(f"imagen serve started over a truncated database: {restarted.stderr[-2000:]}")


def run_serve(server: ServerProcess) -> subprocess.CompletedProcess[str]:
    """``imagen serve`` that is expected to exit on its own (it refuses to start): bounded in time."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "imagen", "serve", "--host", "127.0.0.1", "--port", str(server.port)],
            env=server.env,
            cwd=str(REPO),
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"imagen serve did not exit: {exc.stderr!r}") from exc


def overwrite_header(path: Path) -> None:
    with path.open("r+b") as handle:
        handle.write(b"garbage garbage!")


def truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def empty(path: Path) -> None:
    os.truncate(path, 0)


@pytest.mark.parametrize("damage", [overwrite_header, truncate_half, empty], ids=["header", "half", "empty"])
def test_imagen_serve_refuses_a_damaged_database_names_it_and_leaves_it_as_it_is(
    make_server: Callable[..., ServerProcess], tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    path = database(tmp_path)
    store = SqliteJobStore(path, policy=AttemptPolicy(max_attempts=3, timeout_s=60), result_ttl_s=3600)
    for n in range(40):
        store.submit(NewJob(job_id=f"{n:032x}", task={"prompt": "x" * 500}, output_name=f"{n}.png"), max_queue=100)
    store.close()  # the last connection: the write-ahead log is copied into the file and removed
    assert not path.with_name("jobs.sqlite3-wal").exists()
    damage(path)
    before = path.read_bytes()
    refused = run_serve(make_server())
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr, refused.stderr
    assert f"The job database {path} is damaged" in refused.stderr
    assert ".recover" in refused.stderr and "aside" in refused.stderr
    assert path.read_bytes() == before  # left as it was: never replaced by an empty database
