"""``GET /health`` tells the truth on both backends: the reference's shape (``status``, ``gpu_available``,
``queue_broker``) plus ``reasons`` and ``workers``; ``status`` is ``ok``, ``degraded`` (200: jobs are still
accepted, they wait for a worker) or ``unavailable`` (503: a load balancer sends work elsewhere).

No worker ready is ``degraded`` on both backends, not ``unavailable``: jobs queue and run once a worker is
ready (and for a distributed cluster, taking this API replica out of rotation would not bring a worker).
The embedded job database deleted, replaced or damaged: tests/test_database_faults.py.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from imagen.jobs.distributed.keys import WORKERS, worker_key
from imagen.jobs.distributed.store import RedisJobStore, connect
from tests.celery_support import CeleryCluster, RedisServer, celery_cluster, own_redis
from tests.conftest import wait_for

__all__ = ["celery_cluster", "own_redis"]  # fixtures


def health_of(client: TestClient) -> tuple[int, dict[str, Any]]:
    response = client.get("/health")
    body: dict[str, Any] = response.json()
    return response.status_code, body


def test_embedded_health_is_degraded_while_no_worker_can_take_a_job(make_client: Callable[..., TestClient]) -> None:
    client = make_client(engine="tests.engines:NoSuchEngine")
    wait_for(lambda: health_of(client)[1]["workers"][0].get("error"))
    code, body = health_of(client)
    assert (code, body["status"], body["queue_broker"]) == (200, "degraded", "embedded")
    (reason,) = body["reasons"]
    assert reason.startswith("no worker ready: ") and "NoSuchEngine" in reason
    # degraded, not unavailable: a job is still accepted (it waits for a worker)
    assert client.post("/generate", json={"prompt": "waits for a worker"}).status_code == 201


def test_embedded_health_is_ok_once_a_worker_is_ready(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    code, body = wait_for(lambda: (found := health_of(client))[1]["status"] == "ok" and found)
    assert code == 200 and body["reasons"] == [] and body["workers"][0]["ready"] is True


def test_distributed_health_follows_its_workers_and_its_broker(celery_cluster: CeleryCluster) -> None:
    cluster = celery_cluster
    client = cluster.api()
    code, body = health_of(client)
    assert (code, body["status"], body["queue_broker"], body["workers"]) == (200, "degraded", "connected", [])
    assert body["reasons"] == ["no worker ready (none started yet, or engines still loading)"]

    cluster.start_worker()  # returns once the worker's heartbeat says ready
    code, body = health_of(client)
    assert (code, body["status"], body["reasons"]) == (200, "ok", [])

    cluster.redis.kill()
    code, body = health_of(client)
    assert (code, body["status"], body["queue_broker"]) == (503, "unavailable", "disconnected")
    assert [reason.split(":")[0] for reason in body["reasons"]] == ["job broker (Redis) unreachable"]

    cluster.redis.start()
    wait_for(lambda: health_of(client)[0] == 200, timeout=30)


def test_a_worker_that_beats_again_between_a_read_and_its_cleanup_stays_listed(own_redis: RedisServer) -> None:
    # A heartbeat that expired on a loaded machine: a reader of /health finds its key gone and drops it from
    # the index, while the worker beats again meanwhile. The drop must not hide the live worker.
    store = RedisJobStore(connect(own_redis.url), result_ttl_s=60)
    try:
        key = worker_key(socket.gethostname(), 4242)
        store.client.sadd(WORKERS, key)  # indexed, its value gone: what the reader's MGET saw
        store.workers.beat(4242, {"ready": True}, ttl_s=30)  # back before the reader's cleanup
        assert store.workers.forget_expired([key]) == 0
        assert [beat["pid"] for beat in store.workers.alive()] == [4242]
        store.client.delete(key)  # gone for good this time
        assert store.workers.forget_expired([key]) == 1
        assert store.workers.alive() == [] and not store.client.sismember(WORKERS, key)
    finally:
        store.close()
