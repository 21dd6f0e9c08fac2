"""GET /events/{job_id} (live progress over Server-Sent Events) on both job systems.

A stream is read with a real HTTP client, to its end: it must close by itself after the terminal status
event. Every event's data is compared with what /status answers, the one shape both share.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from imagen.generation.base import StepMeter
from imagen.jobs.lifecycle import CANCELLED_BY_CLIENT
from tests.celery_support import TEST_LOCK_TTL_S, CeleryCluster, RedisServer, shared_redis, start_celery_system
from tests.conftest import ServerProcess, submit, wait_for, wait_status
from tests.latches import Latches
from tests.test_job_contract import job_system

__all__ = ["job_system", "shared_redis"]  # fixtures

TERMINAL = {"SUCCESS", "FAILURE", "REVOKED"}
STATUS_KEYS = {"job_id", "status", "result"}
UNKNOWN_ID = "7f2b0887-3cdf-46ff-b83b-ff7685ac5b23"


@dataclass
class Event:
    id: int
    name: str
    data: dict[str, Any]


def read_events(
    client: TestClient | httpx.Client,
    job_id: str,
    *,
    last_event_id: str | None = None,
    stop_after: int | None = None,
    preview: bool = False,
) -> list[Event]:
    """The stream's events until it closes (or the first ``stop_after``); asserts it is an event stream."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    params = {"preview": "1"} if preview else {}
    events: list[Event] = []
    fields: dict[str, str] = {}
    with client.stream("GET", f"/events/{job_id}", headers=headers, params=params) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line:
                if not line.startswith(":"):  # a comment is a keep-alive
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")
                continue
            if fields:
                events.append(Event(int(fields["id"]), fields["event"], json.loads(fields["data"])))
                fields = {}
                if stop_after is not None and len(events) >= stop_after:
                    break
    return events


def assert_status_shape(event: Event, job_id: str) -> None:
    """The keys /status answers for this state, and nothing else."""
    data = event.data
    assert event.name == "status"
    assert data["job_id"] == job_id
    expected = set(STATUS_KEYS)
    if data["status"] in ("FAILURE", "REVOKED"):
        expected.add("error")
    elif data["status"] in ("STARTED", "PROGRESS") and "meta" in data:
        expected.add("meta")
    assert set(data) == expected, data


def assert_well_formed(events: list[Event], client: TestClient, job_id: str) -> None:
    """Increasing ids, /status's shape, one terminal event at the end, equal to what /status says now."""
    assert [e.id for e in events] == sorted({e.id for e in events})
    for event in events:
        assert_status_shape(event, job_id)
    assert [e.data["status"] in TERMINAL for e in events] == [False] * (len(events) - 1) + [True]
    assert events[-1].data == client.get(f"/status/{job_id}").json()


def read_in_background(client: TestClient, job_id: str, **options: Any) -> tuple[threading.Thread, list[Event]]:
    """A stream read to its end in a thread; returns once the stream is connected (the feed watches it)."""
    feed = client.app.state.backend.feed  # type: ignore[attr-defined]
    watched_before = feed.watched()
    events: list[Event] = []
    reader = threading.Thread(target=lambda: events.extend(read_events(client, job_id, **options)))
    reader.start()
    wait_for(lambda: feed.watched() > watched_before)
    return reader, events


def test_events_follow_a_job_from_pending_to_success(
    job_system: Callable[..., TestClient], latches: Latches
) -> None:
    client = job_system()
    submit(client, "hold blocker")
    latches.wait_started("blocker")
    job_id = submit(client, "sleep 1.0", steps=10)
    reader, events = read_in_background(client, job_id)  # connected while the job certainly waits
    latches.release("blocker")
    reader.join(timeout=60)
    assert not reader.is_alive()
    assert_well_formed(events, client, job_id)
    states = [e.data["status"] for e in events]
    assert states[0] == "PENDING"
    assert "PROGRESS" in states and states[-1] == "SUCCESS"
    metas = [e.data["meta"] for e in events if e.data["status"] == "PROGRESS"]
    assert len(metas) >= 3  # one event per step reported
    assert [m["progress"] for m in metas] == sorted(m["progress"] for m in metas)
    denoising = [m for m in metas if m["step"] == "generation_gpu"]
    assert {m["total_steps"] for m in denoising} == {10}
    assert [m["current_step"] for m in denoising] == sorted(m["current_step"] for m in denoising)
    assert all(m["eta_s"] is None or 0 <= m["eta_s"] <= 5 for m in denoising)  # a 1 s job
    assert any(m["eta_s"] for m in denoising)
    assert events[-1].data["result"]["filename"]


def test_step_meter_finds_the_step_from_the_percent_engines_report() -> None:
    now = [0.0]
    for steps in range(10, 101):  # every step count a request may ask for
        meter = StepMeter(steps, clock=lambda: now[0])
        assert meter("loading_model", 0) is None
        assert meter("generation_gpu", 0) == {"current_step": 0, "total_steps": steps, "eta_s": None}
        for done in range(1, steps + 1):
            now[0] += 0.5
            percent = min(100, int(100 * done / steps))  # as the diffusers engine reports step `done`
            assert meter("generation_gpu", percent) == {
                "current_step": done, "total_steps": steps, "eta_s": round(0.5 * (steps - done), 2),
            }


def test_a_cancelled_job_ends_its_stream_with_revoked(job_system: Callable[..., TestClient]) -> None:
    client = job_system()
    job_id = submit(client, "hold never-released", steps=10)
    wait_status(client, job_id, {"PROGRESS"})
    box: dict[str, list[Event]] = {}
    reader = threading.Thread(target=lambda: box.setdefault("events", read_events(client, job_id)))
    reader.start()
    assert client.post(f"/cancel/{job_id}").status_code == 200
    reader.join(timeout=15)
    assert not reader.is_alive(), "the stream did not close after REVOKED"
    events = box["events"]
    assert_well_formed(events, client, job_id)
    assert events[-1].data == {"job_id": job_id, "status": "REVOKED", "result": None, "error": CANCELLED_BY_CLIENT}


def test_reconnecting_with_last_event_id_gets_the_current_status_at_once(
    job_system: Callable[..., TestClient], latches: Latches
) -> None:
    client = job_system()
    job_id = submit(client, "hold job", steps=10)
    wait_status(client, job_id, {"PROGRESS"})
    first = read_events(client, job_id, stop_after=1)  # the client goes away after one event
    assert first[0].data["status"] == "PROGRESS"
    reader, again = read_in_background(client, job_id, last_event_id=str(first[0].id))
    latches.release("job")
    reader.join(timeout=60)
    assert not reader.is_alive()
    assert again[0].id > first[0].id
    assert again[0].data["status"] == "PROGRESS"  # the job was still held when the client came back
    assert_well_formed(again, client, job_id)
    # Once finished: the terminal event at once, and the stream ends.
    final = read_events(client, job_id, last_event_id=str(again[-1].id))
    assert [(e.id, e.data) for e in final] == [(again[-1].id + 1, again[-1].data)]


def test_unknown_job_is_a_404_not_a_stream(job_system: Callable[..., TestClient]) -> None:
    client = job_system()
    response = client.get(f"/events/{UNKNOWN_ID}")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"detail": "Job ID non trouvé"}


def test_fifty_streams_on_one_job_all_get_the_terminal_event(job_system: Callable[..., TestClient]) -> None:
    client = job_system()
    job_id = submit(client, "sleep 2", steps=10)
    results: list[list[Event]] = []
    lock = threading.Lock()

    def follow() -> None:
        events = read_events(client, job_id)
        with lock:
            results.append(events)

    readers = [threading.Thread(target=follow) for _ in range(50)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(timeout=30)
    assert not any(reader.is_alive() for reader in readers)
    assert len(results) == 50
    final = client.get(f"/status/{job_id}").json()
    assert final["status"] == "SUCCESS"
    for events in results:
        assert events[-1].data == final
    wait_for(lambda: client.app.state.backend.feed.watched() == 0, timeout=5)  # every watcher gone


def test_a_quiet_stream_gets_keep_alive_comments(
    job_system: Callable[..., TestClient], latches: Latches
) -> None:
    client = job_system(events_ping_s=0.2)
    job_id = submit(client, "hold quiet", steps=10)
    comments: list[str] = []
    with client.stream("GET", f"/events/{job_id}") as response:
        for line in response.iter_lines():
            if line.startswith(":"):
                comments.append(line)
                if len(comments) == 3:  # pings came while the job was held; now let it end the stream
                    latches.release("quiet")
    assert len(comments) >= 3, comments


def test_streams_outlive_a_lost_redis_subscription(
    shared_redis: RedisServer,
    tmp_path: Path,
    reference_registry: Path,
    make_client: Callable[..., TestClient],
    request: pytest.FixtureRequest,
) -> None:
    """The API's pub/sub connection is killed mid-job: the listener subscribes again and the stream goes on
    (without it, the stream would only learn the end at its next resync, 30 s later)."""
    client = start_celery_system(shared_redis, tmp_path, reference_registry, make_client, request)()
    latches = request.getfixturevalue("latches")
    job_id = submit(client, "hold job", steps=10)
    wait_status(client, job_id, {"PROGRESS"})
    reader, events = read_in_background(client, job_id)
    assert shared_redis.client().client_kill_filter(_type="pubsub") >= 1
    latches.release("job")  # the job ends only after the subscription was lost
    reader.join(timeout=10)
    assert not reader.is_alive(), "the stream missed the job's end"
    assert events[-1].data["status"] == "SUCCESS"


async def follow_raw(port: int, job_id: str) -> bytes:
    """One stream over a raw socket (500 of them are cheap), read until its HTTP body ends."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /events/{job_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    received = b""
    try:
        while not received.endswith(b"\r\n0\r\n\r\n"):  # the last chunk: the server ended the stream
            chunk = await reader.read(65536)
            if not chunk:
                break
            received += chunk
    finally:
        writer.close()
    return received


@pytest.mark.parametrize("backend", ["embedded", "celery"])
def test_five_hundred_streams_on_one_job_in_a_real_server(
    backend: str,
    make_server: Callable[..., ServerProcess],
    tmp_path: Path,
    reference_registry: Path,
    make_client: Callable[..., TestClient],
    request: pytest.FixtureRequest,
) -> None:
    settings: dict[str, str] = {}
    if backend == "celery":
        redis_server: RedisServer = request.getfixturevalue("shared_redis")
        redis_server.client().flushall()
        cluster = CeleryCluster(redis_server, tmp_path, reference_registry, make_client)
        request.addfinalizer(cluster.stop)
        cluster.start_worker()
        settings = {"broker_url": redis_server.url, "job_lock_ttl_s": str(TEST_LOCK_TTL_S)}
    server = make_server(**settings)
    server.start()
    with server.client() as client:
        job_id = submit(client, "sleep 3", steps=10)

        async def follow_all() -> list[bytes]:
            return await asyncio.wait_for(asyncio.gather(*(follow_raw(server.port, job_id) for _ in range(500))), 60)

        bodies = asyncio.run(follow_all())
        final = client.get(f"/status/{job_id}").json()
    assert final["status"] == "SUCCESS"
    last_event = ("data: " + json.dumps(final, ensure_ascii=False, separators=(",", ":"))).encode()
    assert all(last_event in body for body in bodies)
