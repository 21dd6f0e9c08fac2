"""A full outputs disk is a condition to wait out, never a reason to fail jobs or lose images.

Embedded: the generation worker's writes of its PNG fail with a real ``ENOSPC`` from the kernel (the test
engine sends them to ``/dev/full`` while a marker file exists). The finished image is kept in the worker,
which tries again with a growing delay; meanwhile ``/health`` says why it is unavailable, ``/metrics`` shows
it, and ``POST /generate`` answers 503. Once space is back every job ends SUCCESS, with one attempt. The job
database's disk filling up (by default the same disk) is waited out too: the real store's writes fail with a
real ``SQLITE_FULL`` (from a SQLite database capped by ``max_page_count``, as the store maps it), and no job
loses its image or an attempt for it.

Distributed: the API replica cannot write its outputs folder (a regular file stands where the folder should
be, which stops root too; or its writes go to ``/dev/full``). The PNGs wait in Redis, past ``png_ttl_s``,
until the replica has copied them; when they fill ``png_redis_max_bytes`` new jobs get a 503 and workers
take none. Once the folder is writable every ``/image`` answers 200.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import imagen.jobs.distributed.image_transfer
import imagen.outputs.png
from imagen.errors import DatabaseUnavailableError
from imagen.jobs.embedded.backend import EmbeddedBackend
from tests.celery_support import CeleryCluster, celery_cluster, own_redis
from tests.conftest import submit, wait_for, wait_status
from tests.engines import ScriptedEngine
from tests.latches import Latches

__all__ = ["celery_cluster", "own_redis"]  # fixtures

DISK_FULL_ENV = "IMAGEN_TEST_DISK_FULL"
FULL_DISK_ENGINE = f"{__name__}:FullDiskEngine"
TERMINAL = {"SUCCESS", "FAILURE", "REVOKED"}
OUTPUTS_FULL_DETAIL = "Disque des images plein, réessayez plus tard"
IMAGE_BACKLOG_DETAIL = "Trop d'images en attente de copie, réessayez plus tard"


class FullDiskEngine(ScriptedEngine):
    """Fault injection for the worker process it runs in: while the file ``$IMAGEN_TEST_DISK_FULL`` exists,
    every PNG written by the real save path goes to ``/dev/full``, whose writes fail with ``ENOSPC``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        marker = Path(os.environ[DISK_FULL_ENV])
        write = imagen.outputs.png.write_atomically

        def write_unless_full(destination: Path, data: bytes) -> None:
            if marker.exists():
                with open("/dev/full", "wb") as device:
                    device.write(data)
            write(destination, data)

        imagen.outputs.png.write_atomically = write_unless_full


def backend_of(client: TestClient) -> EmbeddedBackend:
    backend = client.app.state.backend  # type: ignore[attr-defined]
    assert isinstance(backend, EmbeddedBackend)
    return backend


@pytest.fixture
def disk_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    marker = tmp_path / "disk-full"
    monkeypatch.setenv(DISK_FULL_ENV, str(marker))
    return marker


def test_embedded_jobs_wait_out_a_full_outputs_disk(
    make_client: Callable[..., TestClient], disk_full: Path, tmp_path: Path
) -> None:
    client = make_client(engine=FULL_DISK_ENGINE, workers=2)
    disk_full.touch()
    jobs = [submit(client, f"image {i}") for i in range(6)]

    def unavailable() -> dict[str, Any] | None:
        response = client.get("/health")
        return response.json() if response.status_code == 503 else None

    health = wait_for(unavailable, timeout=30)
    outputs = tmp_path / "outputs"
    assert health["status"] == "unavailable"
    assert f"outputs disk full ({outputs})" in health["reasons"]
    assert "imagen_outputs_disk_full 1.0" in client.get("/metrics").text
    refused = client.post("/generate", json={"prompt": "while the disk is full"})
    assert refused.status_code == 503
    assert refused.json() == {"detail": OUTPUTS_FULL_DETAIL}
    assert int(refused.headers["Retry-After"]) > 0
    openai = client.post("/v1/images/generations", json={"prompt": "while the disk is full"})
    assert openai.status_code == 503 and openai.json()["error"]["code"] == "service_unavailable"
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "while the disk is full"}).status_code == 503
    # Both workers hold a finished image they cannot write; nothing failed, the other jobs wait their turn.
    wait_for(lambda: len(backend_of(client).health().unavailable) == 1 and all(
        slot.waiting_for_space for slot in backend_of(client)._slots), timeout=30)
    assert not {client.get(f"/status/{job}").json()["status"] for job in jobs} & TERMINAL

    disk_full.unlink()  # space is back
    bodies = [wait_status(client, job, TERMINAL, timeout=60) for job in jobs]
    assert [body["status"] for body in bodies] == ["SUCCESS"] * len(jobs)
    for job, body in zip(jobs, bodies, strict=True):
        assert (outputs / body["result"]["filename"]).read_bytes().startswith(b"\x89PNG")
        record = backend_of(client).store.get(job)
        assert record is not None and record.attempts == 1
    assert not list(outputs.glob(".partial-*"))  # no half-written file left behind
    assert client.get("/health").json()["status"] != "unavailable"
    assert "imagen_outputs_disk_full 0.0" in client.get("/metrics").text
    assert wait_status(client, submit(client, "after"), TERMINAL)["status"] == "SUCCESS"


def test_embedded_a_job_waiting_for_room_can_be_cancelled(
    make_client: Callable[..., TestClient], disk_full: Path, tmp_path: Path
) -> None:
    client = make_client(engine=FULL_DISK_ENGINE)
    disk_full.touch()
    job = submit(client, "cancelled while it waits")
    wait_for(lambda: client.get("/health").status_code == 503, timeout=30)
    assert client.post(f"/cancel/{job}").status_code == 200
    assert wait_status(client, job, TERMINAL)["status"] == "REVOKED"
    wait_for(lambda: client.get("/health").json()["status"] != "unavailable", timeout=30)
    assert not list((tmp_path / "outputs").glob("*.png"))
    disk_full.unlink()
    assert wait_status(client, submit(client, "next"), TERMINAL)["status"] == "SUCCESS"


def database_full_error(backend: EmbeddedBackend) -> DatabaseUnavailableError:
    """What the store raises when its disk is full: ``DatabaseUnavailableError`` caused by a real ``SQLITE_FULL``
    (from a SQLite database capped by ``max_page_count``)."""
    capped = sqlite3.connect(":memory:")
    capped.execute("PRAGMA max_page_count = 2")
    capped.execute("CREATE TABLE filler (data BLOB)")
    try:
        capped.execute("INSERT INTO filler VALUES (zeroblob(100000))")
    except sqlite3.OperationalError as full:
        assert full.sqlite_errorcode == sqlite3.SQLITE_FULL
        error = DatabaseUnavailableError(backend.settings.database_path, f"disk full: {full}")
        error.__cause__ = full
        return error
    raise AssertionError("the capped database took the row")


class FullDatabase:
    """Makes the named writes of a real ``SqliteJobStore`` fail, while ``full`` is set, with the error its disk
    being full gives (``database_full_error``)."""

    def __init__(self, backend: EmbeddedBackend, monkeypatch: pytest.MonkeyPatch, *methods: str) -> None:
        self.full = threading.Event()
        self.refused = 0
        for method in methods:
            original = getattr(backend.store, method)

            def write(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
                if self.full.is_set():
                    self.refused += 1
                    raise database_full_error(backend)
                return _original(*args, **kwargs)

            monkeypatch.setattr(backend.store, method, write)


def test_embedded_a_full_database_disk_costs_a_running_job_neither_its_image_nor_an_attempt(
    make_client: Callable[..., TestClient], latches: Latches, execution_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client()
    backend = backend_of(client)
    database = FullDatabase(backend, monkeypatch, "heartbeat", "report_progress", "complete")
    job = submit(client, "hold db-full")
    latches.wait_started("db-full")
    (child,) = [worker["pid"] for worker in client.get("/health").json()["workers"]]
    database.full.set()
    latches.release("db-full")  # its progress, heartbeats and success are refused while the disk is full
    reasons = wait_for(lambda: client.get("/health").json()["reasons"] if database.refused >= 3 else None)
    assert f"job database disk full ({backend.settings.database_path})" in reasons
    assert client.get(f"/status/{job}").json()["status"] == "PROGRESS"
    database.full.clear()
    assert wait_status(client, job, TERMINAL)["status"] == "SUCCESS"
    record = backend.store.get(job)
    assert record is not None and record.attempts == 1
    assert execution_log.read_text().splitlines().count("hold db-full") == 1  # its image was not made twice
    assert [worker["pid"] for worker in client.get("/health").json()["workers"]] == [child]


def test_embedded_a_full_database_disk_keeps_an_idle_worker_and_its_model(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client()
    backend = backend_of(client)
    wait_for(lambda: all(worker["ready"] for worker in client.get("/health").json()["workers"]))
    (child,) = [worker["pid"] for worker in client.get("/health").json()["workers"]]
    database = FullDatabase(backend, monkeypatch, "claim_next")
    database.full.set()
    wait_for(lambda: database.refused >= 3, timeout=30)  # claims refused again and again
    assert f"job database disk full ({backend.settings.database_path})" in client.get("/health").json()["reasons"]
    job = submit(client, "after the disk is freed")
    database.full.clear()
    assert wait_status(client, job, TERMINAL, timeout=60)["status"] == "SUCCESS"
    assert [worker["pid"] for worker in client.get("/health").json()["workers"]] == [child]


def images_of(client: TestClient, jobs: list[str]) -> list[int]:
    return [client.get(f"/image/{job}").status_code for job in jobs]


def test_distributed_images_wait_in_redis_past_their_ttl_until_the_outputs_folder_is_writable(
    celery_cluster: CeleryCluster, tmp_path: Path
) -> None:
    cluster = celery_cluster
    cluster.settings = {"png_ttl_s": 1.0}
    cluster.start_worker()
    client = cluster.api()
    redis_client = cluster.redis.client()

    def pngs_in_redis() -> set[str]:
        return {key.decode().removeprefix("imagen:png:") for key in redis_client.scan_iter(match="imagen:png:*")}

    outputs = tmp_path / "outputs"
    shutil.rmtree(outputs)
    outputs.write_bytes(b"a file where the outputs folder should be")  # no write goes in, even as root
    jobs = [submit(client, f"image {i}") for i in range(5)]
    for job in jobs:
        assert wait_status(client, job, TERMINAL)["status"] == "SUCCESS"
    done_at = time.monotonic()
    names = {str(client.get(f"/status/{job}").json()["result"]["filename"]) for job in jobs}
    # The scenario: the folder stays unwritable for longer than png_ttl_s.
    wait_for(lambda: time.monotonic() > done_at + 3 * 1.0, timeout=10, interval=0.1)
    assert pngs_in_redis() == names  # none expired: no replica has them yet
    reasons = client.get("/health").json()["reasons"]
    assert any(f"not copied into {outputs}" in reason for reason in reasons), reasons
    assert set(images_of(client, jobs)) == {404}  # not here yet, and said so

    outputs.unlink()
    outputs.mkdir()  # fixed: the next request, or the next retry, copies each image
    assert images_of(client, jobs) == [200] * len(jobs)
    wait_for(lambda: not pngs_in_redis(), timeout=30)  # every live replica has them now: Redis lets go
    assert {path.name for path in outputs.glob("*.png")} == names


def test_distributed_full_outputs_disk_fills_the_png_backlog_and_new_jobs_get_503(
    celery_cluster: CeleryCluster, disk_full: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = celery_cluster
    cluster.settings = {"png_redis_max_bytes": 1}  # one uncopied PNG fills it
    write = imagen.jobs.distributed.image_transfer.write_atomically

    def write_unless_full(destination: Path, data: bytes) -> None:  # this API replica's writes of its copies
        if disk_full.exists():
            with open("/dev/full", "wb") as device:
                device.write(data)
        write(destination, data)

    monkeypatch.setattr(imagen.jobs.distributed.image_transfer, "write_atomically", write_unless_full)
    client = cluster.api()
    disk_full.touch()
    jobs = [submit(client, f"image {i}") for i in range(3)]  # accepted while Redis holds no image
    worker = cluster.start_worker()
    assert wait_status(client, jobs[0], TERMINAL)["status"] == "SUCCESS"

    def unavailable() -> dict[str, Any] | None:
        response = client.get("/health")
        return response.json() if response.status_code == 503 else None

    reasons = wait_for(unavailable, timeout=30)["reasons"]
    assert any("waiting for an API replica's copy fill Redis" in reason for reason in reasons), reasons
    assert f"outputs disk full ({tmp_path / 'outputs'})" in reasons
    refused = client.post("/generate", json={"prompt": "while images wait"})
    assert refused.status_code == 503 and refused.json() == {"detail": IMAGE_BACKLOG_DETAIL}
    assert int(refused.headers["Retry-After"]) > 0
    metrics = client.get("/metrics").text
    assert "imagen_outputs_disk_full 1.0" in metrics and "imagen_png_backlog_bytes 0.0" not in metrics
    wait_for(lambda: "takes no job until copies make room" in worker.log(), timeout=30)

    disk_full.unlink()  # room again: the images are copied, the worker takes the rest of the queue
    bodies = [wait_status(client, job, TERMINAL, timeout=90) for job in jobs]
    assert [body["status"] for body in bodies] == ["SUCCESS"] * len(jobs)
    assert images_of(client, jobs) == [200] * len(jobs)
    assert wait_status(client, submit(client, "after"), TERMINAL, timeout=60)["status"] == "SUCCESS"
    assert "imagen_outputs_disk_full 0.0" in client.get("/metrics").text


def test_distributed_a_full_worker_scratch_disk_is_waited_out(
    celery_cluster: CeleryCluster, disk_full: Path
) -> None:
    cluster = celery_cluster
    client = cluster.api()
    disk_full.touch()
    worker = cluster.start_worker(engine=FULL_DISK_ENGINE)  # its writes of finished images fail with ENOSPC
    job = submit(client, "on a full worker disk")
    wait_for(lambda: "scratch disk is full" in worker.log(), timeout=30)
    assert client.get(f"/status/{job}").json()["status"] == "PROGRESS"
    disk_full.unlink()
    assert wait_status(client, job, TERMINAL, timeout=60)["status"] == "SUCCESS"
    assert int(cluster.redis.client().hget(f"imagen:job:{job}", "attempts") or 0) == 1
    assert images_of(client, [job]) == [200]
