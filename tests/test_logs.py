"""Logs: one line per job event with structured fields; ``IMAGEN_LOG_FORMAT=json`` makes every line of
``imagen serve`` (uvicorn's own lines and the generation children's included) and ``imagen worker`` a JSON
object; the request's id is on the lines logged while it is handled."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from imagen.logs import REQUEST_ID, make_handler
from tests.celery_support import CeleryCluster, celery_cluster, own_redis
from tests.conftest import ServerProcess, submit, wait_for, wait_status

__all__ = ["celery_cluster", "own_redis"]  # fixtures

TERMINAL = {"SUCCESS", "FAILURE", "REVOKED"}
# A line in the text format: what a logger left unconfigured would write.
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def events(lines: list[dict[str, Any]], job_id: str) -> dict[str, dict[str, Any]]:
    return {line["event"]: line for line in lines if line.get("job_id") == job_id and "event" in line}


def test_serve_logs_json_lines_with_job_events_and_request_ids(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server(log_format="json", max_attempts="2")
    server.start()
    with server.client() as client:
        headers = {"X-Request-ID": "req-json-1"}
        ok = client.post("/generate", json={"prompt": "quick"}, headers=headers).json()["job_id"]
        retried = submit(client, "oom-once")
        failed = submit(client, "fatal")
        for job_id in (ok, retried, failed):
            wait_status(client, job_id, TERMINAL)
    server.stop()
    text = server.log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON

    assert all({"timestamp", "level", "logger", "message"} <= line.keys() for line in lines)
    ok_events = events(lines, ok)
    assert set(ok_events) == {"submitted", "started", "finished"}
    assert ok_events["submitted"]["request_id"] == "req-json-1"  # logged while the request was handled
    assert ok_events["submitted"]["key_name"] == ""  # no keys configured
    finished = ok_events["finished"]
    assert finished["state"] == "SUCCESS"
    assert finished["queue_wait_seconds"] >= 0 and finished["run_seconds"] >= 0
    assert finished["end_to_end_seconds"] >= finished["run_seconds"]
    assert "service_overhead_seconds" in finished
    assert events(lines, retried)["retried"]["error"].startswith("CUDA out of memory")
    assert events(lines, retried)["finished"]["state"] == "SUCCESS"
    assert events(lines, failed)["finished"]["state"] == "FAILURE"
    assert "weight file missing" in events(lines, failed)["finished"]["error"]
    # One line per event: the job's lines carry no duplicate of an event.
    assert sum(1 for line in lines if line.get("job_id") == ok and line.get("event") == "finished") == 1
    # uvicorn's access line for that request, with its id.
    access = [line for line in lines if line["logger"] == "uvicorn.access" and line.get("request_id") == "req-json-1"]
    assert len(access) == 1 and "POST /generate" in access[0]["message"]
    # The generation child (a process of its own) logs JSON too.
    assert any(line["logger"] == "imagen.worker" and "fatal" in line["message"] for line in lines)
    assert not any("color_message" in line for line in lines)


def test_worker_logs_json_job_events(celery_cluster: CeleryCluster) -> None:
    celery_cluster.settings = {"log_format": "json"}
    worker = celery_cluster.start_worker()
    client: TestClient = celery_cluster.api()
    ok = submit(client, "quick")
    cancelled = submit(client, "hold never-released", steps=50)
    wait_status(client, ok, TERMINAL)
    wait_status(client, cancelled, {"PROGRESS"})
    client.post(f"/cancel/{cancelled}")
    wait_status(client, cancelled, TERMINAL)

    def worker_lines() -> list[dict[str, Any]] | None:
        text = worker.log_path.read_text(errors="replace")
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        return lines if "finished" in events(lines, ok) else None

    lines = wait_for(worker_lines, timeout=10)
    text = worker.log_path.read_text(errors="replace")
    assert [json.loads(line) for line in text.splitlines() if line.strip()] == lines  # every line is JSON
    assert any(line["logger"].startswith("celery") for line in lines)
    ok_events = events(lines, ok)
    assert {"started", "finished"} <= set(ok_events)
    assert ok_events["finished"]["state"] == "SUCCESS"
    assert ok_events["finished"]["run_seconds"] >= 0 and ok_events["started"]["queue_wait_seconds"] >= 0
    assert "started" in events(lines, cancelled)  # its REVOKED is the API's event (the cancel ended it)


def test_text_lines_carry_the_request_id() -> None:
    stream = io.StringIO()
    handler = make_handler("text")
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    logger = logging.getLogger("tests.text_lines")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("outside")
        token = REQUEST_ID.set("abc123")
        try:
            logger.warning("inside")
        finally:
            REQUEST_ID.reset(token)
    finally:
        logger.removeHandler(handler)
    outside, inside = stream.getvalue().splitlines()
    assert TEXT_LINE.match(outside) and outside.endswith("tests.text_lines: outside")
    assert inside.endswith("tests.text_lines: inside [request abc123]")


def test_json_lines_carry_extra_fields() -> None:
    stream = io.StringIO()
    handler = make_handler("json")
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    record = logging.LogRecord("imagen.jobs.events", logging.INFO, __file__, 1, "job %s: %s", ("j1", "SUCCESS"), None)
    record.job_id, record.state, record.run_seconds = "j1", "SUCCESS", 1.5
    handler.handle(record)
    line = json.loads(stream.getvalue())
    assert line["message"] == "job j1: SUCCESS"
    assert (line["level"], line["logger"], line["job_id"], line["state"], line["run_seconds"]) == (
        "INFO", "imagen.jobs.events", "j1", "SUCCESS", 1.5
    )
    assert not {"msg", "args", "pathname", "lineno"} & line.keys()  # LogRecord internals stay out
