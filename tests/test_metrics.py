"""``GET /metrics`` on both job systems: after a few jobs (a success, a retried success, a failure, two
cancels), the Prometheus text has the expected families and types, counts what happened, labels HTTP
requests by route template and never labels anything with a job id or a file name."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.celery_support import RedisServer, own_redis, shared_redis
from tests.conftest import submit, wait_for, wait_status
from tests.test_job_contract import job_system

__all__ = ["job_system", "own_redis", "shared_redis"]  # fixtures

TERMINAL = {"SUCCESS", "FAILURE", "REVOKED"}

EXPECTED_TYPES = {
    "imagen_job_store_up": "gauge",
    "imagen_jobs_waiting": "gauge",
    "imagen_jobs_running": "gauge",
    "imagen_jobs_submitted": "counter",
    "imagen_jobs_finished": "counter",
    "imagen_jobs_retried": "counter",
    "imagen_jobs_revoked": "counter",
    "imagen_job_queue_wait_seconds": "histogram",
    "imagen_job_generation_seconds": "histogram",
    "imagen_job_end_to_end_seconds": "histogram",
    "imagen_job_service_overhead_seconds": "histogram",
    "imagen_worker_up": "gauge",
    "imagen_worker_model_load_seconds": "gauge",
    "imagen_worker_model_loads": "counter",
    "imagen_http_requests": "counter",
    "imagen_http_request_duration_seconds": "histogram",
}


def scrape(client: TestClient) -> dict[str, Any]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def value(families: dict[str, Any], sample_name: str, **labels: str) -> float | None:
    family_name = sample_name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    for sample in families[family_name].samples:
        if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return float(sample.value)
    return None


def test_metrics_count_what_happened(job_system: Callable[..., TestClient]) -> None:
    client = job_system(max_attempts=3)
    backend = "embedded" if client.app.state.settings.broker_url is None else "distributed"  # type: ignore[attr-defined]
    jobs = {name: submit(client, prompt, steps=10) for name, prompt in [("ok", "quick"), ("retried", "oom-once")]}
    jobs["failed"] = submit(client, "fatal")
    for name in ("ok", "retried", "failed"):
        wait_status(client, jobs[name], TERMINAL)
    jobs["running"] = submit(client, "hold never-released", steps=50)
    wait_status(client, jobs["running"], {"PROGRESS"})
    jobs["waiting"] = submit(client, "never runs")
    assert client.post(f"/cancel/{jobs['waiting']}").status_code == 200
    assert client.post(f"/cancel/{jobs['running']}").status_code == 200
    states = {name: wait_status(client, job_id, TERMINAL)["status"] for name, job_id in jobs.items()}
    assert states == {"ok": "SUCCESS", "retried": "SUCCESS", "failed": "FAILURE", "running": "REVOKED",
                      "waiting": "REVOKED"}
    filename = client.get(f"/status/{jobs['ok']}").json()["result"]["filename"]
    assert client.get(f"/download/{filename}").status_code == 200
    health = client.get("/health").json()

    # Distributed: the worker adds its outcomes to Redis right after its write; wait for the last one.
    wait_for(lambda: value(scrape(client), "imagen_jobs_finished_total", state="SUCCESS") == 2, timeout=10)
    wait_for(lambda: value(scrape(client), "imagen_jobs_running", backend=backend) == 0, timeout=10)
    families = scrape(client)

    for name, kind in EXPECTED_TYPES.items():
        assert families[name].type == kind, name
    assert value(families, "imagen_job_store_up") == 1
    assert value(families, "imagen_jobs_submitted_total") == 5
    assert value(families, "imagen_jobs_finished_total", state="SUCCESS") == 2
    assert value(families, "imagen_jobs_finished_total", state="FAILURE") == 1
    assert value(families, "imagen_jobs_finished_total", state="REVOKED") == 2
    assert value(families, "imagen_jobs_retried_total") == 1
    assert value(families, "imagen_jobs_revoked_total") == 2
    assert value(families, "imagen_jobs_waiting", backend=backend) == 0
    # Histograms: a job is observed once, when it ends, under its final state.
    assert value(families, "imagen_job_end_to_end_seconds_count", state="SUCCESS") == 2
    assert value(families, "imagen_job_end_to_end_seconds_count", state="REVOKED") == 2
    assert value(families, "imagen_job_queue_wait_seconds_count", state="SUCCESS") == 2
    assert value(families, "imagen_job_queue_wait_seconds_count", state="REVOKED") == 1  # the one that ran
    assert value(families, "imagen_job_generation_seconds_count", state="FAILURE") == 1
    assert value(families, "imagen_job_service_overhead_seconds_count", state="SUCCESS") == 2
    revoked_run = value(families, "imagen_job_generation_seconds_sum", state="REVOKED")
    assert revoked_run is not None and 0 < revoked_run < 5  # cancelled mid-run
    buckets = [s for s in families["imagen_job_end_to_end_seconds"].samples if s.name.endswith("_bucket")]
    assert any(s.labels["le"] == "+Inf" and s.value == 2 for s in buckets if s.labels["state"] == "SUCCESS")
    # Workers: the one /health lists, by host:pid, engine loaded.
    (worker,) = health["workers"]
    name = f"{worker['host']}:{worker['pid']}"
    assert value(families, "imagen_worker_up", backend=backend, worker=name) == 1
    load_seconds = value(families, "imagen_worker_model_load_seconds", worker=name)
    assert load_seconds is not None and load_seconds >= 0
    assert value(families, "imagen_worker_model_loads_total", worker=name) == 1  # its jobs' one model
    # HTTP: route templates only.
    handlers = {s.labels["handler"] for s in families["imagen_http_requests"].samples}
    assert {"/generate", "/status/{job_id}", "/cancel/{job_id}", "/download/{filename:path}"} <= handlers
    assert value(families, "imagen_http_requests_total", handler="/generate", method="POST", status="2xx") == 5
    # No label carries a job id or a file name.
    secrets = [*jobs.values(), filename]
    for family in families.values():
        for sample in family.samples:
            for label in sample.labels.values():
                assert not any(secret in label for secret in secrets), (sample.name, label)


def test_a_workers_heartbeat_reaches_metrics(make_client: Callable[..., TestClient], own_redis: RedisServer) -> None:
    """A distributed worker on another host (here, its heartbeat as it writes it) shows in the API's
    /metrics with its GPU memory and model load time, and disappears with its heartbeat."""
    client = make_client(broker_url=own_redis.url)
    beat = {
        "host": "gpu-host-2", "pid": 4242, "ready": True, "error": None, "device": "cuda:0", "gpu_available": True,
        "model_load_seconds": 12.5, "gpu_memory_used_bytes": 7_000_000_000,
        "gpu_memory_total_bytes": 85_000_000_000, "model_loads": 3, "at": time.time(),
    }
    own_redis.client().set("imagen:worker:gpu-host-2:4242", json.dumps(beat), px=60_000)
    own_redis.client().sadd("imagen:workers", "imagen:worker:gpu-host-2:4242")  # the heartbeats' index
    families = scrape(client)
    worker = "gpu-host-2:4242"
    assert value(families, "imagen_worker_up", backend="distributed", worker=worker) == 1
    assert value(families, "imagen_worker_model_load_seconds", worker=worker) == 12.5
    assert value(families, "imagen_worker_gpu_memory_used_bytes", worker=worker) == 7e9
    assert value(families, "imagen_worker_gpu_memory_total_bytes", worker=worker) == 85e9
    assert families["imagen_worker_gpu_memory_used_bytes"].type == "gauge"
    assert value(families, "imagen_worker_model_loads_total", worker=worker) == 3
    assert value(families, "imagen_jobs_waiting", backend="distributed") == 0
    own_redis.client().delete("imagen:worker:gpu-host-2:4242")
    assert value(scrape(client), "imagen_worker_up", backend="distributed", worker=worker) is None


def test_metrics_say_when_redis_is_down(make_client: Callable[..., TestClient], own_redis: RedisServer) -> None:
    client = make_client(broker_url=own_redis.url)
    assert value(scrape(client), "imagen_job_store_up") == 1
    own_redis.kill()
    families = scrape(client)  # still answers: the HTTP numbers are there, the job numbers are not
    assert value(families, "imagen_job_store_up") == 0
    assert "imagen_jobs_submitted" not in families
    assert "imagen_http_requests" in families
