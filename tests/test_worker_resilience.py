"""Distributed workers that stay useful when something around them breaks (real redis-server, real
``imagen worker`` processes): an engine that cannot load on one host, Redis out of memory, Redis killed
and restarted, a claim that fails on the connection."""

from __future__ import annotations

import socket
from pathlib import Path

from fastapi.testclient import TestClient
from kombu import Connection, Queue

from imagen.jobs.distributed.app import ResilientRedisTransport
from tests.celery_support import CeleryCluster, RedisServer, WorkerProcess, celery_cluster, celery_tool, own_redis
from tests.conftest import submit, wait_for, wait_status
from tests.latches import Latches

TERMINAL = {"SUCCESS", "FAILURE"}
__all__ = ["celery_cluster", "own_redis"]  # fixtures


def statuses(client: TestClient, jobs: list[str], timeout: float = 60) -> list[str]:
    return [wait_status(client, job, TERMINAL, timeout=timeout)["status"] for job in jobs]


def assert_alive(*workers: WorkerProcess) -> None:
    for worker in workers:
        assert worker.process is not None and worker.process.poll() is None, worker.log()
        assert "Unrecoverable error" not in worker.log(), worker.log()


def test_a_worker_whose_engine_cannot_load_takes_no_job_and_health_says_why(celery_cluster: CeleryCluster) -> None:
    cluster = celery_cluster
    # The real diffusers engine, with the reference registry whose model files are not on this host.
    broken = cluster.start_worker(wait=False, engine="diffusers", warm_up_steps=1)
    healthy = cluster.start_worker()
    client = cluster.api()
    jobs = [submit(client, f"job {i}") for i in range(20)]
    assert statuses(client, jobs) == ["SUCCESS"] * 20

    def broken_worker_reported() -> dict[str, object] | None:
        workers = client.get("/health").json()["workers"]
        return next((w for w in workers if w["pid"] in broken.children() and w.get("error")), None)

    report = wait_for(broken_worker_reported, timeout=60, interval=0.2)
    assert report["ready"] is False and "file not found" in str(report["error"]), report
    assert report["host"] == socket.gethostname()
    assert "ERROR imagen.worker: engine failed to load (attempt 1)" in broken.log()
    assert "file not found" in broken.log()
    assert "job " not in broken.log()  # it never received a message
    # Celery's own view: only the healthy worker consumes the job queue.
    queues = celery_tool(cluster.redis.url, "inspect", "active_queues", "--timeout", "2").stdout
    healthy_node, broken_node = f"imagen-{healthy.pid}@", f"imagen-{broken.pid}@"
    assert healthy_node in queues and broken_node in queues, queues
    assert "'name': 'imagen'" in queues.split(healthy_node)[1].split("imagen-")[0]
    assert "'name': 'imagen'" not in queues.split(broken_node)[1].split("->")[0], queues
    assert_alive(broken, healthy)


def test_workers_survive_redis_out_of_memory_and_the_jobs_complete(
    celery_cluster: CeleryCluster, execution_log: Path, latches: Latches
) -> None:
    cluster = celery_cluster
    workers = [cluster.start_worker(), cluster.start_worker()]
    client = cluster.api()
    before = [submit(client, f"hold before-{i}", steps=10) for i in range(4)]
    latches.wait_started("before-0")
    latches.wait_started("before-1")
    admin = cluster.redis.client()
    admin.config_set("maxmemory", 1)  # every write is refused from now on: OutOfMemoryError
    for i in range(4):
        latches.release(f"before-{i}")  # the two running jobs end into the refusal
    try:
        refused = client.post("/generate", json={"prompt": "while Redis is full"})
        assert refused.status_code == 503, refused.text
        # Both workers ran into the refusal (finishing their job) and kept going.
        wait_for(lambda: all("OutOfMemoryError" in w.log() for w in workers), timeout=30, interval=0.2)
        assert_alive(*workers)
    finally:
        admin.config_set("maxmemory", 0)
    after = [submit(client, f"after {i}") for i in range(4)]
    assert statuses(client, before + after, timeout=90) == ["SUCCESS"] * 8
    assert_alive(*workers)
    runs = execution_log.read_text().splitlines()
    assert all(runs.count(f"after {i}") == 1 for i in range(4))


def test_a_worker_that_receives_a_message_while_redis_is_full_stays_up(celery_cluster: CeleryCluster) -> None:
    cluster = celery_cluster
    client = cluster.api()
    queued = [submit(client, f"queued {i}") for i in range(3)]
    admin = cluster.redis.client()
    admin.config_set("maxmemory", 1)
    try:
        # Consuming writes to Redis (queue bindings; kombu records a taken message as unacknowledged): refused.
        # Kombu calls that a channel error; the worker must treat it as a lost connection (retry), not die.
        worker = cluster.start_worker(wait=False)
        wait_for(lambda: "command not allowed when used memory" in worker.log(), timeout=30, interval=0.2)
        assert_alive(worker)
    finally:
        admin.config_set("maxmemory", 0)
    # A message taken out of the queue and lost with the refused write comes back through the reconciler.
    assert statuses(client, queued, timeout=60) == ["SUCCESS"] * 3
    assert_alive(worker)


def test_worker_reconnects_after_redis_is_killed_and_restarted(celery_cluster: CeleryCluster) -> None:
    cluster = celery_cluster
    worker = cluster.start_worker()
    client = cluster.api()
    assert statuses(client, [submit(client, "before the crash")]) == ["SUCCESS"]
    cluster.redis.kill()  # SIGKILL: no clean shutdown; the append-only file has every write
    cluster.redis.start()  # same port, same folder
    assert statuses(client, [submit(client, f"after the crash {i}") for i in range(3)]) == ["SUCCESS"] * 3
    assert_alive(worker)


def test_a_claim_that_fails_on_the_connection_puts_the_message_back(
    celery_cluster: CeleryCluster, execution_log: Path
) -> None:
    cluster = celery_cluster
    # More failures than the task body retries within one delivery: the message must go back to the broker
    # (never acknowledged with the job still waiting), and the next delivery claims it.
    worker = cluster.start_worker(engine="tests.celery_support:ClaimsFailEngine", test_fail_claims=6)
    client = cluster.api()
    job = submit(client, "claimed at last")
    assert statuses(client, [job]) == ["SUCCESS"]
    assert f"job {job}: claim failed" in worker.log() and "message back to the queue" in worker.log()
    assert execution_log.read_text().splitlines().count("claimed at last") == 1


def test_an_acknowledgement_redis_refuses_still_frees_the_worker_for_the_next_message(own_redis: RedisServer) -> None:
    """Redis at maxmemory refuses the write that acknowledges a finished job's message. Kombu's own QoS then
    keeps the message counted as in flight, and a worker taking one message at a time never takes another
    (seen under load in the out-of-memory scenario). Ours frees the slot; the refused record stays and comes
    back later, to be dropped by the claim."""
    admin = own_redis.client()
    with Connection(own_redis.url, transport=ResilientRedisTransport) as connection:
        channel = connection.channel()
        channel.basic_qos(0, 1, False)  # one message at a time, as an imagen worker
        queue = Queue("resilience", routing_key="resilience")
        producer = connection.Producer(channel)
        for body in ("first", "second"):
            producer.publish(body, routing_key="resilience", declare=[queue])
        first = queue(channel).get()
        assert first is not None and first.payload == "first"
        assert not channel.qos.can_consume()
        admin.config_set("maxmemory", 1)
        try:
            first.ack()  # refused by Redis: logged, not raised
        finally:
            admin.config_set("maxmemory", 0)
        assert channel.qos.can_consume()
        assert admin.hlen("unacked") == 1  # the refused record, redelivered after the visibility timeout
        second = queue(channel).get()
        assert second is not None and second.payload == "second"
        second.ack()
