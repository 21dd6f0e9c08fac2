"""The embedded backend's worker slot under unexpected errors: no job stays STARTED, the slot goes on.

Faults are injected for real: a child process that writes something the pipe protocol does not allow,
and the real SQLite store object whose methods raise ``database is locked`` (what SQLite raises when
another writer holds the file past the busy timeout) or kill the slot's thread outright.
"""

from __future__ import annotations

import gc
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from imagen.generation.base import NO_INPUTS, GeneratedImage, GenerationTask, InputImages, ProgressCallback
from imagen.jobs.embedded import backend as embedded_backend
from imagen.jobs.embedded.backend import EmbeddedBackend
from tests.conftest import submit, wait_for, wait_status
from tests.engines import ScriptedEngine
from tests.latches import Latches

TERMINAL = {"SUCCESS", "FAILURE"}
MALFORMED_ENGINE = f"{__name__}:MalformedMessageEngine"


class MalformedMessageEngine(ScriptedEngine):
    """On its first run of a prompt ``malformed <kind>``, writes something malformed on the pipe to the
    API process before going on: ``tuple`` (a message of the old tuple protocol) or ``bytes`` (bytes that
    do not unpickle)."""

    def generate(
        self, task: GenerationTask, progress: ProgressCallback, inputs: InputImages = NO_INPUTS
    ) -> list[GeneratedImage]:
        words = task.prompt.split()
        log = Path(os.environ["IMAGEN_TEST_EXECUTION_LOG"])
        if words[:1] == ["malformed"] and (not log.exists() or task.prompt not in log.read_text().splitlines()):
            with log.open("a") as handle:  # this run counts as an execution, as ScriptedEngine's do
                handle.write(task.prompt + "\n")
            (pipe,) = [obj for obj in gc.get_objects() if isinstance(obj, Connection) and not obj.closed]
            if words[1] == "tuple":
                pipe.send(("progress", "generation_gpu", 50))
            else:
                pipe.send_bytes(b"\x80\x05not a pickle")
            time.sleep(60)  # the API process kills this child: it cannot trust it any more
        return super().generate(task, progress, inputs)


def worker_pids(client: TestClient) -> list[int]:
    return [worker["pid"] for worker in client.get("/health").json()["workers"] if worker["ready"]]


def backend_of(client: TestClient) -> EmbeddedBackend:
    backend = client.app.state.backend  # type: ignore[attr-defined]
    assert isinstance(backend, EmbeddedBackend)
    return backend


def attempts(client: TestClient, job_id: str) -> int:
    record = backend_of(client).store.get(job_id)
    assert record is not None
    return record.attempts


def inject(
    monkeypatch: pytest.MonkeyPatch, target: object, method: str, error: BaseException, times: int = 1
) -> list[int]:
    """Make ``target.method`` raise ``error`` on its next ``times`` calls; returns the count of raises."""
    original: Callable[..., Any] = getattr(target, method)
    raised = [0]
    lock = threading.Lock()

    def failing(*args: Any, **kwargs: Any) -> Any:
        with lock:
            fail = raised[0] < times
            raised[0] += fail
        if fail:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(target, method, failing)
    return raised


def locked() -> sqlite3.OperationalError:
    return sqlite3.OperationalError("database is locked")


def assert_next_job_runs(client: TestClient) -> None:
    after = submit(client, "the next job")
    assert wait_status(client, after, TERMINAL)["status"] == "SUCCESS"
    assert attempts(client, after) == 1


@pytest.mark.parametrize("kind", ["tuple", "bytes"])
def test_malformed_message_from_the_child_retries_the_job_on_a_new_child(
    make_client: Callable[..., TestClient], execution_log: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    client = make_client(engine=MALFORMED_ENGINE)
    (first_child,) = wait_for(lambda: worker_pids(client))
    job_id = submit(client, f"malformed {kind}")
    done = wait_status(client, job_id, TERMINAL, timeout=30)
    assert done["status"] == "SUCCESS"
    assert attempts(client, job_id) == 2
    assert execution_log.read_text().splitlines().count(f"malformed {kind}") == 2
    assert first_child not in worker_pids(client)  # the confused child was replaced
    assert "unexpected error while supervising it" in caplog.text
    assert_next_job_runs(client)


@pytest.mark.parametrize("method", ["report_progress", "complete", "heartbeat"])
def test_database_locked_during_a_job_retries_it(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, method: str,
    latches: Latches,
) -> None:
    client = make_client()
    raised = inject(monkeypatch, backend_of(client).store, method, locked())
    if method == "heartbeat":  # held until its heartbeat (every 2 s) has met the locked database
        job_id = submit(client, "hold job", steps=10)
        wait_for(lambda: raised == [1], timeout=60)
        latches.release("job")
    else:
        job_id = submit(client, "sleep 0.3", steps=10)
    done = wait_status(client, job_id, TERMINAL, timeout=30)
    assert raised == [1]
    assert done["status"] == "SUCCESS"
    assert attempts(client, job_id) == 2
    assert [p.name for p in (tmp_path / "outputs").glob("*.png")] == [done["result"]["filename"]]
    assert_next_job_runs(client)


def test_database_locked_while_claiming_delays_the_job_only(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client()
    raised = inject(monkeypatch, backend_of(client).store, "claim_next", locked(), times=2)
    job_id = submit(client, "quick")
    assert wait_status(client, job_id, TERMINAL, timeout=30)["status"] == "SUCCESS"
    assert raised == [2]
    assert attempts(client, job_id) == 1  # no attempt was started by the failed claims


def test_database_locked_while_recording_the_failed_attempt_is_retried(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client()
    store = backend_of(client).store
    inject(monkeypatch, store, "report_progress", locked())
    recording = inject(monkeypatch, store, "fail_attempt", locked(), times=2)
    job_id = submit(client, "sleep 0.3", steps=10)
    assert wait_status(client, job_id, TERMINAL, timeout=30)["status"] == "SUCCESS"
    assert recording == [2]
    assert attempts(client, job_id) == 2


def test_a_store_that_stays_locked_fails_the_job_with_the_reason(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client(max_attempts=2)
    inject(monkeypatch, backend_of(client).store, "report_progress", locked(), times=1_000_000)
    job_id = submit(client, "sleep 0.2", steps=10)
    done = wait_status(client, job_id, TERMINAL, timeout=30)
    assert done["status"] == "FAILURE"
    assert done["error"] == (
        "internal error while supervising the job: OperationalError: database is locked (after 2 attempts)"
    )
    monkeypatch.undo()  # the database works again: so does the slot
    assert_next_job_runs(client)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected death
def test_a_slot_whose_thread_dies_is_replaced_and_its_job_retried(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded_backend, "REAPER_PERIOD_S", 0.2)
    client = make_client()
    backend = backend_of(client)
    (first_slot,) = backend._slots
    # SystemExit is no Exception: the slot's loop does not catch it and its thread ends
    inject(monkeypatch, backend.store, "report_progress", SystemExit())
    job_id = submit(client, "sleep 0.3", steps=10)
    done = wait_status(client, job_id, TERMINAL, timeout=30)
    assert done["status"] == "SUCCESS"
    assert attempts(client, job_id) == 2
    assert not first_slot.is_alive() and backend._slots[0] is not first_slot
    assert_next_job_runs(client)
