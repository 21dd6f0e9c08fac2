"""The API side of the distributed backend while Redis stalls, pauses, runs out of memory or is down:
quick 503s that leave nothing behind, and routes that do not need Redis keep answering (real
redis-server, real `imagen serve` where the event loop matters)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from imagen.api.app import BROKER_DOWN
from imagen.jobs.distributed.store import connect
from tests.celery_support import CeleryCluster, RedisServer, celery_cluster, own_redis
from tests.conftest import ServerProcess, wait_for, wait_status

__all__ = ["celery_cluster", "own_redis"]  # fixtures
TERMINAL = {"SUCCESS", "FAILURE"}
QUICK_503_S = 2.0  # docs/distributed.md: with Redis down, "the 503 comes at once"


def redis_command(server: RedisServer, *command: str | int) -> threading.Thread:
    """Run a blocking admin command (DEBUG SLEEP, ...) in the background, on a connection of its own."""
    client = redis.Redis(port=server.port, socket_timeout=None)
    thread = threading.Thread(target=client.execute_command, args=command, daemon=True)
    thread.start()
    return thread


def is_stalled(server: RedisServer) -> bool:
    try:
        connect(server.url, socket_timeout=0.2, retries=0).ping()
    except redis.TimeoutError:
        return True
    return False


def leftovers(server: RedisServer) -> tuple[int, list[bytes]]:
    client = server.client()
    return client.zcard("imagen:waiting"), list(client.scan_iter(match="imagen:job:*"))


def test_a_503_during_a_redis_stall_leaves_no_ghost_job(celery_cluster: CeleryCluster) -> None:
    cluster = celery_cluster
    client = cluster.api(reconcile_after_s=1.0, broker_timeout_s=1.0)
    stall = redis_command(cluster.redis, "DEBUG", "SLEEP", 10)
    wait_for(lambda: is_stalled(cluster.redis), timeout=5)
    response = client.post("/generate", json={"prompt": "while Redis sleeps"})
    assert response.status_code == 503 and response.json() == {"detail": BROKER_DOWN}
    assert stall.is_alive()  # the answer came while Redis still slept: the request gave up, it did not wait
    stall.join(timeout=20)
    # The submission reached Redis after the API gave up: its unconfirmed record expires, its slot frees.
    wait_for(lambda: leftovers(cluster.redis) == (0, []), timeout=10, interval=0.1)
    accepted = client.post("/generate", json={"prompt": "on an idle cluster"})
    assert accepted.status_code == 201
    assert accepted.json()["message"] == "Tâche en file d'attente. Position estimée: 1"


def test_redis_down_answers_503_within_a_second_or_two(celery_cluster: CeleryCluster) -> None:
    cluster = celery_cluster
    client = cluster.api()
    assert client.post("/generate", json={"prompt": "before"}).status_code == 201
    cluster.redis.kill()
    for _ in range(3):
        started = time.monotonic()
        response = client.post("/generate", json={"prompt": "while Redis is down"})
        assert response.status_code == 503 and time.monotonic() - started < QUICK_503_S


def test_redis_out_of_memory_gives_503_never_500_and_the_api_recovers(celery_cluster: CeleryCluster) -> None:
    cluster = celery_cluster
    worker = cluster.start_worker()
    client = cluster.api()
    done = client.post("/generate", json={"prompt": "before the memory runs out"}).json()["job_id"]
    assert wait_status(client, done, TERMINAL)["status"] == "SUCCESS"
    admin = cluster.redis.client()
    admin.config_set("maxmemory", 1)
    try:
        for _ in range(5):
            response = client.post("/generate", json={"prompt": "while Redis is out of memory"})
            assert response.status_code == 503 and response.json() == {"detail": BROKER_DOWN}
            assert client.get(f"/status/{done}").json()["status"] == "SUCCESS"  # reads still work
            assert client.get("/health").status_code == 200
    finally:
        admin.config_set("maxmemory", 0)
    assert admin.zcard("imagen:waiting") == 0
    after = client.post("/generate", json={"prompt": "after the memory is back"})
    assert after.status_code == 201
    assert wait_status(client, after.json()["job_id"], TERMINAL, timeout=30)["status"] == "SUCCESS", worker.log()


@pytest.fixture
def served(
    own_redis: RedisServer, make_server: Callable[..., ServerProcess], tmp_path: Path
) -> Iterator[tuple[ServerProcess, str]]:
    """`imagen serve` on the distributed backend, with one image already in its outputs folder."""
    name = "sdxl_base_20260101_000000_deadbeef.png"
    (tmp_path / "outputs").mkdir(parents=True, exist_ok=True)
    (tmp_path / "outputs" / name).write_bytes(b"\x89PNG\r\n\x1a\n local file")
    server = make_server(broker_url=own_redis.url)
    server.start()
    yield server, name


def answered_during_pause(http: httpx.Client, path: str, paused_until: float) -> httpx.Response:
    """GET ``path``, asserting the answer came while Redis was still paused: a route that waited on Redis
    would answer only after the pause ends (a condition on the pause, far longer than any answer takes)."""
    response = http.get(path)
    assert time.monotonic() < paused_until, f"{path} waited for the Redis pause to end"
    return response


def test_routes_without_redis_answer_while_redis_is_paused(
    served: tuple[ServerProcess, str], own_redis: RedisServer
) -> None:
    server, name = served
    paused_until = time.monotonic() + 10
    own_redis.client().execute_command("CLIENT", "PAUSE", 10_000)
    with server.client() as http:
        models = answered_during_pause(http, "/models", paused_until)
        download = answered_during_pause(http, f"/download/{name}", paused_until)
        health = answered_during_pause(http, "/health", paused_until)
    assert models.status_code == 200
    assert download.status_code == 200 and download.content.startswith(b"\x89PNG")
    assert health.json()["queue_broker"] == "disconnected"


def test_health_answers_while_clients_poll_status_through_a_long_pause(
    served: tuple[ServerProcess, str], own_redis: RedisServer
) -> None:
    server, _ = served
    with server.client() as http:
        job_id = http.post("/generate", json={"prompt": "polled"}).json()["job_id"]
    admin = own_redis.client()
    stop = threading.Event()

    polling = threading.Semaphore(0)

    def poll() -> None:
        with server.client() as poller:
            while not stop.is_set():
                polling.release()
                poller.get(f"/status/{job_id}")

    pollers = [threading.Thread(target=poll, daemon=True) for _ in range(5)]
    paused_until = time.monotonic() + 15
    admin.execute_command("CLIENT", "PAUSE", 15_000)
    try:
        for thread in pollers:
            thread.start()
        for _ in pollers:  # every poller has sent a request that waits on Redis
            assert polling.acquire(timeout=10)
        with server.client() as http:
            answers = [answered_during_pause(http, "/health", paused_until) for _ in range(3)]
    finally:
        stop.set()  # (CLIENT UNPAUSE would itself wait for the pause to end)
        for thread in pollers:
            thread.join(timeout=20)
    for health in answers:
        assert health.json()["queue_broker"] == "disconnected"
