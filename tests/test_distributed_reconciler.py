"""The reconciler: a waiting job whose broker message is missing still runs (real redis-server, real
workers). Faults are injected where they happen in production: a record written with no message (the API
killed between the two), a claim that fails on the connection after Celery took the message, a publish
that fails after the reaper put a job back."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from imagen.config import Settings
from imagen.generation.base import GenerationTask
from imagen.jobs.distributed.app import create_celery, publish
from imagen.jobs.distributed.keys import lock_key
from imagen.jobs.distributed.outcomes import ClaimOutcome
from imagen.jobs.distributed.reaper import Housekeeper, message_ids
from imagen.jobs.distributed.store import RedisJobStore, connect
from imagen.jobs.types import JobState, NewJob
from tests.celery_support import CeleryCluster, RedisServer, celery_cluster, own_redis
from tests.conftest import submit, wait_for, wait_status

__all__ = ["celery_cluster", "own_redis"]  # fixtures
TERMINAL = {"SUCCESS", "FAILURE"}
RECONCILE_AFTER_S = 1.0


def new_job(prompt: str) -> NewJob:
    task = GenerationTask(
        prompt=prompt,
        negative_prompt="",
        model="sdxl-base",
        loras=(),
        steps=4,
        guidance_scale=7.0,
        seed=1,
        ip_strength=0.0,
    )
    return NewJob(job_id=str(uuid.uuid4()), task=task.as_dict(), output_name=f"sdxl_base_{uuid.uuid4().hex[:8]}.png")


def test_a_job_recorded_but_never_published_runs(celery_cluster: CeleryCluster) -> None:
    cluster = celery_cluster
    cluster.settings = {"reconcile_after_s": RECONCILE_AFTER_S}  # the workers reconcile too
    cluster.start_worker()
    client = cluster.api(reconcile_after_s=RECONCILE_AFTER_S)
    # What the API leaves when it is killed between writing the record and publishing its message.
    store = RedisJobStore(connect(cluster.redis.url), result_ttl_s=60)
    job = new_job("recorded, never published")
    store.jobs.submit(job, max_queue=100)
    assert store.jobs.confirm(job.job_id)
    assert cluster.redis.client().llen("imagen") == 0
    assert wait_status(client, job.job_id, TERMINAL, timeout=30)["status"] == "SUCCESS"


@pytest.mark.parametrize("failure", ["connection", "acked"])
def test_a_claim_that_fails_does_not_lose_the_job(celery_cluster: CeleryCluster, tmp_path: Path, failure: str) -> None:
    cluster = celery_cluster
    marker = tmp_path / "fail-next-claim"
    cluster.settings = {"reconcile_after_s": RECONCILE_AFTER_S}
    worker = cluster.start_worker(engine="tests.celery_support:ClaimFailsOnceEngine", test_claim_failure=marker)
    client = cluster.api(reconcile_after_s=RECONCILE_AFTER_S)
    marker.write_text(failure)
    job_id = submit(client, "its first claim fails")
    wait_for(lambda: not marker.exists(), timeout=20)  # the worker took the message; its claim failed
    assert wait_status(client, job_id, TERMINAL, timeout=30)["status"] == "SUCCESS", worker.log()
    assert "injected: " in worker.log()
    after = submit(client, "the next job")
    assert wait_status(client, after, TERMINAL)["status"] == "SUCCESS"


def test_a_job_put_back_by_the_reaper_is_published_again_when_its_publish_failed(
    own_redis: RedisServer,
) -> None:
    settings = Settings(broker_url=own_redis.url, job_lock_ttl_s=1.0, reconcile_after_s=RECONCILE_AFTER_S)
    store = RedisJobStore(connect(own_redis.url), result_ttl_s=60)
    job = new_job("its worker died")
    store.jobs.submit(job, max_queue=100)
    store.jobs.confirm(job.job_id)
    claim = store.attempts.claim(job.job_id, "host|1|dead", max_attempts=3, lock_ttl_s=60, timeout_s=600)
    assert claim.outcome is ClaimOutcome.CLAIMED
    own_redis.client().delete(lock_key(job.job_id))  # its lock expired: the worker is dead
    published: list[str] = []
    broker_down = True

    def flaky_publish(job_id: str) -> None:
        if broker_down:
            raise ConnectionError("injected: publish failed")
        published.append(job_id)

    housekeeper = Housekeeper(settings, store, flaky_publish, "imagen")
    housekeeper.run_once()  # the reaper puts the job back; its publish fails
    record = store.jobs.get(job.job_id)
    assert record is not None and record.state is JobState.PENDING and published == []
    broker_down = False
    housekeeper.run_once()  # missing for less than reconcile_after_s: not yet
    assert published == []
    wait_for(lambda: housekeeper.run_once() or published, timeout=5, interval=0.1)
    assert published == [job.job_id]


def test_a_job_with_a_message_in_the_queue_is_left_alone(own_redis: RedisServer) -> None:
    settings = Settings(broker_url=own_redis.url, reconcile_after_s=0.2)
    store = RedisJobStore(connect(own_redis.url), result_ttl_s=60)
    job = new_job("published")
    store.jobs.submit(job, max_queue=100)
    app = create_celery(settings)
    publish(app, job.job_id)
    store.jobs.confirm(job.job_id)
    raw = own_redis.client().lrange("imagen", 0, -1)
    assert message_ids(raw) == [job.job_id]  # kombu's own message format
    republished: list[str] = []
    housekeeper = Housekeeper(settings, store, republished.append, "imagen")
    for _ in range(5):
        housekeeper.run_once()
    assert republished == []
    app.close()


def test_the_reconciler_publishes_what_the_waiting_jobs_lack_counting_messages_not_names(
    own_redis: RedisServer,
) -> None:
    """Messages are tickets: one that started a job (whichever) no longer counts; the shortage is published."""
    settings = Settings(broker_url=own_redis.url, reconcile_after_s=0.3)
    store = RedisJobStore(connect(own_redis.url), result_ttl_s=60)
    jobs = [new_job(f"job {i}") for i in range(3)]
    for job in jobs:
        store.jobs.submit(job, max_queue=100)
        store.jobs.confirm(job.job_id)
    app = create_celery(settings)
    publish(app, jobs[2].job_id)  # one message for three waiting jobs (two publishes were lost)
    app.close()
    republished: list[str] = []
    housekeeper = Housekeeper(settings, store, republished.append, "imagen")
    housekeeper.run_once()
    assert republished == []  # not for the whole reconcile_after_s yet
    wait_for(lambda: housekeeper.run_once() or republished, timeout=5, interval=0.05)
    assert len(republished) == 2  # the difference, once

    # A worker takes the message (kombu moves it to its unacknowledged table) and it starts the fair queue's
    # first job, not the one it names: it is used, so the two jobs left have no message of their own.
    client = own_redis.client()
    raw = client.rpop("imagen")
    assert raw is not None
    client.hset("unacked", "tag-1", json.dumps([json.loads(raw), "", "imagen"]))
    client.zadd("unacked_index", {"tag-1": time.time()})
    claim = store.attempts.claim_next("host|1|w", ticket=jobs[2].job_id, max_attempts=3, lock_ttl_s=60, timeout_s=600)
    assert claim.outcome is ClaimOutcome.CLAIMED and claim.job_id == jobs[0].job_id
    republished.clear()
    wait_for(lambda: housekeeper.run_once() or republished, timeout=5, interval=0.05)
    assert sorted(republished) == sorted([jobs[1].job_id, jobs[2].job_id])


def test_a_message_names_an_unconfirmed_job_it_may_start_but_never_another_one(own_redis: RedisServer) -> None:
    store = RedisJobStore(connect(own_redis.url), result_ttl_s=60)
    first, second = new_job("first"), new_job("second")
    store.jobs.submit(first, max_queue=100)
    store.jobs.submit(second, max_queue=100)  # both unconfirmed: their API has not heard back from the broker
    options = {"max_attempts": 3, "lock_ttl_s": 60, "timeout_s": 600}
    assert store.attempts.claim_next("host|1|a", ticket="m", **options).outcome is ClaimOutcome.UNCONFIRMED
    claim = store.attempts.claim_next("host|1|a", ticket=second.job_id, named=second.job_id, **options)
    assert claim.outcome is ClaimOutcome.CLAIMED and claim.job_id == second.job_id  # its own message is out
    store.jobs.forget(first.job_id)  # its publish failed: withdrawn, output owner included
    assert store.jobs.output_owner(first.output_name) is None
    assert store.attempts.claim_next("host|1|b", ticket="n", **options).outcome is ClaimOutcome.NONE
