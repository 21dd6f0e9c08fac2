"""Each way an OpenAI or AUTOMATIC1111 request can end without its images, answered as that API's clients
expect, to the byte: status, body (key order included) and Retry-After.

Both layers run their job on one shared path (``compat_jobs.run_job``: submit, wait, the job's end) and keep
only the answer each outcome gets in their API's shape; these tests pin those answers, one outcome at a time:
a job the submission refuses, a full queue, an unreachable job database, a full outputs disk, a wait that
runs out, a server that stops, a failed job and a cancelled one. Real app, real engine processes (the
scripted test engine); a job that must be running is held on a latch, never timed.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
from fastapi.testclient import TestClient

from imagen.api import compat_jobs
from imagen.api.compat_jobs import Outcome
from imagen.jobs.lifecycle import CANCELLED_BY_CLIENT
from tests.conftest import submit, wait_for, wait_status
from tests.http_thread import http_server
from tests.latches import Latches
from tests.test_full_disk import FULL_DISK_ENGINE, disk_full

__all__ = ["disk_full"]  # a fixture

OPENAI = "/v1/images/generations"
A1111 = "/sdapi/v1/txt2img"
TERMINAL = {"SUCCESS", "FAILURE", "REVOKED"}
JOB_ID = re.compile(r"job ([0-9a-f-]{36})")


class Answer(Protocol):
    """An HTTP answer, from httpx or from the test client (which brings its own httpx)."""

    @property
    def status_code(self) -> int: ...
    @property
    def content(self) -> bytes: ...
    @property
    def text(self) -> str: ...
    @property
    def headers(self) -> Mapping[str, str]: ...


def rendered(body: Any) -> bytes:
    """A JSON body exactly as the API writes it (Starlette's ``JSONResponse``)."""
    return json.dumps(body, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()


def openai_error(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return rendered({"error": {"message": message, "type": type_, "param": param, "code": code}})


def a1111_error(detail: str, error: str = "HTTPException") -> bytes:
    return rendered({"error": error, "detail": detail, "body": "", "errors": ""})


def assert_answer(answer: Answer, status: int, body: bytes, retry_after: str | None = None) -> None:
    assert (answer.status_code, answer.content) == (status, body), answer.text
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers.get("retry-after") == retry_after


def test_a_job_the_submission_refuses(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_loras=1)
    two = [{"name": "anime-style"}, {"name": "character-detail"}]
    too_many = "at most 1 LoRAs per request on this server (IMAGEN_MAX_LORAS), not 2"
    assert_answer(
        client.post(OPENAI, json={"prompt": "fox", "loras": two}),
        400, openai_error(too_many, "invalid_request_error", None, "loras"),
    )
    unknown = "unknown LoRA 'nope'; available: anime-style, character-detail"
    assert_answer(
        client.post(OPENAI, json={"prompt": "fox", "loras": [{"name": "nope"}]}),
        400, openai_error(unknown, "invalid_request_error", None, "loras"),
    )
    assert_answer(
        client.post(A1111, json={"prompt": "fox <lora:anime-style:1> <lora:character-detail:1>"}),
        422, a1111_error(f"prompt's <lora:…> tags: {too_many}", "ValidationError"),
    )
    # every problem, each after its field as A1111's clients name it
    answer = client.post("/sdapi/v1/img2img", json={
        "prompt": "fox <lora:anime-style:1> <lora:character-detail:1>", "init_images": ["bm90IGFuIGltYWdl"],
    })
    assert_answer(answer, 422, a1111_error(
        f"prompt's <lora:…> tags: {too_many}; init_images: not a PNG, JPEG or WebP image", "ValidationError"
    ))


def test_a_full_queue(make_client: Callable[..., TestClient], latches: Latches) -> None:
    client = make_client(max_queue=1)
    try:
        submit(client, "hold full")
        latches.wait_started("full")
        submit(client, "waiting")
        assert_answer(
            client.post(OPENAI, json={"prompt": "one too many"}), 429,
            openai_error("Too many jobs waiting: 1 jobs waiting (max 1); try again later", "rate_limit_exceeded",
                         "queue_full"),
            "30",
        )
        assert_answer(
            client.post(A1111, json={"prompt": "one too many"}), 429,
            a1111_error("queue full (1 jobs waiting (max 1)); try again later"),
        )
    finally:
        latches.release("full")


def test_an_unreachable_job_database(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    client = make_client()
    (tmp_path / "data" / "jobs.sqlite3").unlink()  # deleted under the server: it takes no job
    assert_answer(
        client.post(OPENAI, json={"prompt": "would be lost"}), 503,
        openai_error("The job queue is unreachable; try again later", "server_error", "queue_unavailable"), "10",
    )
    assert_answer(
        client.post(A1111, json={"prompt": "would be lost"}), 503,
        a1111_error("the job queue is unreachable; try again later"),
    )


def test_a_full_outputs_disk(make_client: Callable[..., TestClient], disk_full: Path, tmp_path: Path) -> None:
    client = make_client(engine=FULL_DISK_ENGINE)
    disk_full.touch()
    job = submit(client, "an image it cannot write")
    wait_for(lambda: client.get("/health").status_code == 503, timeout=30)
    why = f"outputs disk full ({tmp_path / 'outputs'})"
    try:
        assert_answer(
            client.post(OPENAI, json={"prompt": "while the disk is full"}), 503,
            openai_error(f"The service cannot take jobs now ({why}); try again later", "server_error",
                         "service_unavailable"),
            "30",
        )
        assert_answer(
            client.post(A1111, json={"prompt": "while the disk is full"}), 503,
            a1111_error(f"the service cannot take jobs now ({why}); try again later"),
        )
    finally:
        disk_full.unlink()
    assert wait_status(client, job, TERMINAL, timeout=60)["status"] == "SUCCESS"


def test_a_wait_that_runs_out(
    make_client: Callable[..., TestClient], latches: Latches, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client()
    settings = client.app.state.settings  # type: ignore[attr-defined]
    # A wait of 0 s: it ends at its first look, while the job is held (never by a clock racing the job).
    monkeypatch.setattr(compat_jobs, "WAIT_MARGIN_S", -settings.job_timeout_s * settings.max_attempts)
    try:
        answer = client.post(OPENAI, json={"prompt": "hold late"})
        job_id = JOB_ID.search(answer.text)
        assert job_id is not None, answer.text
        assert_answer(answer, 504, openai_error(f"job {job_id[1]} did not end within 0 s", "server_error", "timeout"))
        answer = client.post(A1111, json={"prompt": "hold late"})
        job_id = JOB_ID.search(answer.text)
        assert job_id is not None, answer.text
        assert_answer(answer, 504, a1111_error(f"job {job_id[1]} did not end within 0 s"))
    finally:
        latches.release("late")


def test_a_server_that_stops(make_client: Callable[..., TestClient], latches: Latches) -> None:
    client = make_client()
    client.app.state.waiters.end_all()  # type: ignore[attr-defined]  # the server's shutdown, first thing
    try:
        assert_answer(
            client.post(OPENAI, json={"prompt": "hold stop"}), 503,
            openai_error("The server is restarting; try again", "server_error", "server_stopping"), "10",
        )
        assert_answer(
            client.post(A1111, json={"prompt": "hold stop"}), 503, a1111_error("the server is restarting; try again")
        )
    finally:
        latches.release("stop")


def test_a_failed_job(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    error = "weight file missing: /models/nowhere.safetensors"
    assert_answer(
        client.post(OPENAI, json={"prompt": "fatal"}), 500,
        openai_error(f"The image generation failed: {error}", "server_error", "generation_failed"),
    )
    assert_answer(
        client.post(A1111, json={"prompt": "fatal"}), 500, a1111_error(f"generation failed: {error}", "GenerationError")
    )


def held_request(url: str, path: str, body: dict[str, Any]) -> tuple[threading.Thread, list[httpx.Response]]:
    answers: list[httpx.Response] = []
    sending = threading.Thread(target=lambda: answers.append(httpx.post(url + path, json=body, timeout=60)))
    sending.start()
    return sending, answers


def test_a_cancelled_job(make_client: Callable[..., TestClient], latches: Latches, tmp_path: Path) -> None:
    client = make_client()
    with http_server(client) as url:
        try:
            sending, answers = held_request(url, OPENAI, {"prompt": "hold openai"})
            latches.wait_started("openai")
            with sqlite3.connect(f"{(tmp_path / 'data' / 'jobs.sqlite3').as_uri()}?mode=ro", uri=True) as db:
                (job_id,) = db.execute("SELECT job_id FROM jobs WHERE state != 'REVOKED'").fetchone()
            assert client.post(f"/cancel/{job_id}").status_code == 200
            sending.join(60)
            assert_answer(answers[0], 500, openai_error(
                f"The image generation failed: {CANCELLED_BY_CLIENT}", "server_error", "cancelled"
            ))

            # A1111 answers an interrupted generation with what it has: no image, its request echoed
            body = {"prompt": "hold a1111", "steps": 10, "extra": [1, "é"]}
            sending, answers = held_request(url, A1111, body)
            latches.wait_started("a1111")
            assert client.post("/sdapi/v1/interrupt").status_code == 200
            sending.join(60)
            assert answers[0].status_code == 200
            assert answers[0].content == rendered({"images": [], "parameters": body, "info": '{"interrupted": true}'})
            assert answers[0].headers.get("retry-after") is None
        finally:
            latches.release("openai")
            latches.release("a1111")


# Each outcome of the shared path, and the test above that pins both layers' answer to it.
OUTCOME_TESTS = {
    Outcome.REFUSED: test_a_job_the_submission_refuses,
    Outcome.QUEUE_FULL: test_a_full_queue,
    Outcome.QUEUE_UNREACHABLE: test_an_unreachable_job_database,
    Outcome.UNAVAILABLE: test_a_full_outputs_disk,
    Outcome.TIMED_OUT: test_a_wait_that_runs_out,
    Outcome.ABANDONED: test_a_server_that_stops,
    Outcome.FAILED: test_a_failed_job,
    Outcome.CANCELLED: test_a_cancelled_job,
}


def test_every_outcome_is_pinned() -> None:
    """A new way for a job to end without images gets its answers pinned here before a client meets them."""
    assert set(OUTCOME_TESTS) == set(Outcome)
