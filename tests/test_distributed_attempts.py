"""What the Redis store's attempt writes answer, on a real redis-server: each outcome is the Enum member that
the callers compare by identity, whatever the Lua script replied or the Python side decided."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from imagen.jobs.distributed.keys import lock_key
from imagen.jobs.distributed.outcomes import AttemptOutcome, ClaimOutcome, ProgressOutcome
from imagen.jobs.distributed.store import RedisJobStore, connect
from imagen.jobs.types import JobState, NewJob
from tests.celery_support import RedisServer, shared_redis
from tests.test_store_contract import Clock

__all__ = ["shared_redis"]  # fixtures
TIMEOUT_S = 100.0
OPTIONS: dict[str, Any] = {"max_attempts": 2, "lock_ttl_s": 60.0, "timeout_s": TIMEOUT_S}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(shared_redis: RedisServer, clock: Clock) -> Iterator[RedisJobStore]:
    shared_redis.client().flushall()
    store = RedisJobStore(connect(shared_redis.url), result_ttl_s=60, clock=clock)
    yield store
    store.close()


def waiting_job(store: RedisJobStore) -> str:
    job = NewJob(job_id=str(uuid.uuid4()), task={"prompt": "x"}, output_name=f"{uuid.uuid4().hex}.png")
    store.jobs.submit(job, max_queue=10)
    assert store.jobs.confirm(job.job_id)
    return job.job_id


def test_a_progress_write_answers_recorded_lost_or_cancelled(store: RedisJobStore) -> None:
    job_id = waiting_job(store)
    claim = store.attempts.claim_next("host|1|a", ticket="m", **OPTIONS)
    assert claim.outcome is ClaimOutcome.CLAIMED and claim.job_id == job_id
    assert store.attempts.report_progress(job_id, "host|1|a", "denoise", 10) is ProgressOutcome.RECORDED
    assert store.attempts.report_progress(job_id, "host|1|b", "denoise", 20) is ProgressOutcome.LOST
    assert store.jobs.cancel(job_id) is JobState.REVOKED
    assert store.attempts.report_progress(job_id, "host|1|a", "denoise", 30) is ProgressOutcome.CANCELLED
    assert store.attempts.fail(job_id, "host|1|a", "too late") is AttemptOutcome.LOST


def test_a_claim_says_why_it_started_nothing(store: RedisJobStore) -> None:
    assert store.attempts.claim("no-such-job", "host|1|a", **OPTIONS).outcome is ClaimOutcome.MISSING
    assert store.attempts.claim_next("host|1|a", ticket="m", **OPTIONS).outcome is ClaimOutcome.NONE
    job_id = waiting_job(store)
    takeover = store.attempts.claim(job_id, "host|1|a", expect="running", **OPTIONS)
    assert takeover.outcome is ClaimOutcome.WAITING  # a waiting job is the fair queue's to start
    assert store.attempts.claim_next("host|1|a", ticket="m", **OPTIONS).outcome is ClaimOutcome.CLAIMED
    busy = store.attempts.claim(job_id, "host|1|b", expect="running", **OPTIONS)
    assert busy.outcome is ClaimOutcome.BUSY and busy.holder == "host|1|a"  # its owner's lock is alive
    picked = store.attempts.claim(job_id, "host|1|b", expect="waiting", **OPTIONS)
    assert picked.outcome is ClaimOutcome.RUNNING
    assert store.attempts.complete(job_id, "host|1|a", {"filename": "x.png"}, b"\x89PNG")
    assert store.attempts.claim(job_id, "host|1|b", **OPTIONS).outcome is ClaimOutcome.FINISHED


def test_a_dead_owners_job_is_failed_by_the_claim_that_finds_it_past_its_limits(
    store: RedisJobStore, shared_redis: RedisServer, clock: Clock
) -> None:
    timed_out = waiting_job(store)
    assert store.attempts.claim_next("host|1|a", ticket="m", **OPTIONS).outcome is ClaimOutcome.CLAIMED
    shared_redis.client().delete(lock_key(timed_out))  # its worker died
    clock.now += TIMEOUT_S + 1
    assert store.attempts.claim(timed_out, "host|1|b", expect="running", **OPTIONS).outcome is ClaimOutcome.TIMEOUT
    record = store.jobs.get(timed_out)
    assert record is not None and record.state is JobState.FAILURE

    used_up = waiting_job(store)
    for owner in ("host|1|c", "host|1|d"):  # max_attempts=2: the second attempt is the last
        assert store.attempts.claim_next(owner, ticket="m", **OPTIONS).outcome is ClaimOutcome.CLAIMED
        if owner == "host|1|c":
            assert store.attempts.retry_or_fail(used_up, owner, "CUDA out of memory", 2) is AttemptOutcome.RETRY
    shared_redis.client().delete(lock_key(used_up))
    assert store.attempts.claim(used_up, "host|1|e", expect="running", **OPTIONS).outcome is ClaimOutcome.FAILED
    assert store.attempts.give_back(used_up, "host|1|d") is AttemptOutcome.LOST
