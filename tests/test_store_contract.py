"""The store contract: one suite, both job stores (SQLite for the embedded backend, Redis for the
distributed one, on a real ``redis-server``).

Both stores hand out the fair queue's next job (``jobs.fairness``). They take over a dead owner's job
differently (SQLite takes it back, then hands out the next waiting job; a Redis worker whose broker message
names a running job with a dead owner takes it over in its claim), so each gets a thin adapter below; the
tests only speak the adapter's verbs. Owners are real: an SQLite owner is a live process of this host that
the test kills, a Redis owner holds a lock that expires (here: is deleted) when it dies.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from imagen.errors import KeyQueueFullError, QueueFullError
from imagen.jobs.affinity import LOOKAHEAD, Affinity
from imagen.jobs.distributed.keys import lock_key
from imagen.jobs.distributed.outcomes import AttemptOutcome, Claim, ClaimOutcome
from imagen.jobs.distributed.store import RedisJobStore, connect
from imagen.jobs.embedded.store import SqliteJobStore
from imagen.jobs.lifecycle import CANCELLED_BY_CLIENT, HOSTNAME, AttemptPolicy, OwnerToken
from imagen.jobs.types import JobRecord, JobState, NewJob
from tests.celery_support import RedisServer, shared_redis

MAX_ATTEMPTS = 3
TIMEOUT_S = 100.0
RESULT_TTL_S = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class StoreUnderTest(Protocol):
    """The verbs of the contract, as each store spells them."""

    def submit(self, job: NewJob, max_queue: int = 100, key_max_waiting: int | None = None) -> int: ...  # position
    def get(self, job_id: str) -> JobRecord | None: ...
    def position(self, job_id: str) -> int | None: ...
    def count_waiting(self) -> int: ...
    def new_owner(self) -> str: ...
    def claim_next(self, owner: str, affinity: Affinity | None = None) -> JobRecord | None: ...  # None: deferred too
    def complete(self, job_id: str, owner: str) -> bool: ...
    def fail(self, job_id: str, owner: str, error: str, *, retryable: bool) -> bool: ...  # False: not ours
    def kill(self, owner: str) -> None: ...
    def take_over(self, job_id: str, owner: str) -> JobRecord | None: ...  # a dead owner's job, claimed
    def cancel(self, job_id: str) -> JobState | None: ...
    def output_owner(self, output_name: str) -> str | None: ...


# -- SQLite --------------------------------------------------------------------------------------------
class SqliteUnderTest:
    def __init__(self, path: Path, clock: Clock) -> None:
        policy = AttemptPolicy(max_attempts=MAX_ATTEMPTS, timeout_s=TIMEOUT_S)
        self.store = SqliteJobStore(path, policy=policy, result_ttl_s=RESULT_TTL_S, clock=clock)
        self.me = OwnerToken.new()  # the process that takes jobs back
        self.owners: dict[str, subprocess.Popen[bytes]] = {}

    def submit(self, job: NewJob, max_queue: int = 100, key_max_waiting: int | None = None) -> int:
        return self.store.submit(job, max_queue, key_max_waiting).position

    def output_owner(self, output_name: str) -> str | None:
        return self.store.output_owner(output_name)

    def get(self, job_id: str) -> JobRecord | None:
        return self.store.get(job_id)

    def position(self, job_id: str) -> int | None:
        return self.store.position(job_id)

    def count_waiting(self) -> int:
        return self.store.count_waiting()

    def new_owner(self) -> str:
        process = subprocess.Popen(["sleep", "600"])
        owner = str(OwnerToken(HOSTNAME, process.pid, uuid.uuid4().hex[:12]))
        self.owners[owner] = process
        return owner

    def _token(self, owner: str) -> OwnerToken:
        token = OwnerToken.parse(owner)
        assert token is not None
        return token

    def claim_next(self, owner: str, affinity: Affinity | None = None) -> JobRecord | None:
        return self.store.claim_next(self._token(owner), affinity)

    def complete(self, job_id: str, owner: str) -> bool:
        return self.store.complete(job_id, self._token(owner), {"status": "success", "filename": "x.png"})

    def fail(self, job_id: str, owner: str, error: str, *, retryable: bool) -> bool:
        return self.store.fail_attempt(job_id, self._token(owner), error, retryable=retryable) is not None

    def kill(self, owner: str) -> None:
        process = self.owners[owner]
        process.kill()
        process.wait()

    def take_over(self, job_id: str, owner: str) -> JobRecord | None:
        self.store.recover_orphans(self.me, silent_after_s=30)
        return self.store.claim_next(self._token(owner))

    def cancel(self, job_id: str) -> JobState | None:
        return self.store.cancel(job_id)

    def close(self) -> None:
        for process in self.owners.values():
            process.kill()
            process.wait()
        self.store.close()


# -- Redis ---------------------------------------------------------------------------------------------
class RedisUnderTest:
    LOCK_TTL_S = 60.0  # owners here never renew: a test "kills" one by deleting its lock, as expiry would

    def __init__(self, server: RedisServer, clock: Clock) -> None:
        server.client().flushall()
        self.client = connect(server.url)
        self.store = RedisJobStore(self.client, result_ttl_s=RESULT_TTL_S, clock=clock)
        self.held: dict[str, str] = {}  # owner -> the job it claimed

    def submit(self, job: NewJob, max_queue: int = 100, key_max_waiting: int | None = None) -> int:
        position = self.store.jobs.submit(job, max_queue, key_max_waiting).position
        assert self.store.jobs.confirm(job.job_id)  # its broker message is out
        return position

    def output_owner(self, output_name: str) -> str | None:
        return self.store.jobs.output_owner(output_name)

    def get(self, job_id: str) -> JobRecord | None:
        return self.store.jobs.get(job_id)

    def position(self, job_id: str) -> int | None:
        return self.store.jobs.position(job_id)

    def count_waiting(self) -> int:
        return self.store.jobs.count_waiting()

    def new_owner(self) -> str:
        return str(OwnerToken.new(slot=uuid.uuid4().hex[:6]))

    def _claimed(self, claim: Claim, owner: str) -> JobRecord | None:
        if claim.outcome is not ClaimOutcome.CLAIMED:
            return None
        self.held[owner] = claim.job_id
        return self.store.jobs.get(claim.job_id)

    def claim_next(self, owner: str, affinity: Affinity | None = None) -> JobRecord | None:
        """A broker message (a ticket) is delivered to ``owner``: it starts the fair queue's next job."""
        ticket = uuid.uuid4().hex
        claim = self.store.attempts.claim_next(
            owner, ticket=ticket, max_attempts=MAX_ATTEMPTS, lock_ttl_s=self.LOCK_TTL_S, timeout_s=TIMEOUT_S,
            affinity=affinity,
        )
        return self._claimed(claim, owner)

    def complete(self, job_id: str, owner: str) -> bool:
        name = f"{job_id}.png"
        return self.store.attempts.complete(job_id, owner, {"status": "success", "filename": name}, b"\x89PNG")

    def fail(self, job_id: str, owner: str, error: str, *, retryable: bool) -> bool:
        if retryable:
            return self.store.attempts.retry_or_fail(job_id, owner, error, MAX_ATTEMPTS) is not AttemptOutcome.LOST
        return self.store.attempts.fail(job_id, owner, error) is not AttemptOutcome.LOST

    def kill(self, owner: str) -> None:
        self.client.delete(lock_key(self.held[owner]))

    def take_over(self, job_id: str, owner: str) -> JobRecord | None:
        """The job's message is delivered again (redelivery after the dead worker's connection closed)."""
        claim = self.store.attempts.claim(
            job_id, owner, max_attempts=MAX_ATTEMPTS, lock_ttl_s=self.LOCK_TTL_S, timeout_s=TIMEOUT_S, expect="running"
        )
        return self._claimed(claim, owner)

    def cancel(self, job_id: str) -> JobState | None:
        return self.store.jobs.cancel(job_id)

    def close(self) -> None:
        self.client.close()


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Iterator[StoreUnderTest]:
    under_test: SqliteUnderTest | RedisUnderTest
    if request.param == "sqlite":
        under_test = SqliteUnderTest(tmp_path / "jobs.sqlite3", clock)
    else:
        under_test = RedisUnderTest(request.getfixturevalue("shared_redis"), clock)
    yield under_test
    under_test.close()


__all__ = ["shared_redis"]  # a fixture, used through request.getfixturevalue


@pytest.fixture
def clock() -> Clock:
    return Clock()


def new_job(prompt: str = "x") -> NewJob:
    return NewJob(job_id=str(uuid.uuid4()), task={"prompt": prompt}, output_name=f"{uuid.uuid4().hex}.png")


def state(store: StoreUnderTest, job_id: str) -> tuple[JobState, int, str | None]:
    record = store.get(job_id)
    assert record is not None
    return record.state, record.attempts, record.error


@dataclass
class Claimed:
    job: JobRecord
    owner: str


def submit_and_claim(store: StoreUnderTest) -> Claimed:
    job = new_job()
    store.submit(job)
    owner = store.new_owner()
    claimed = store.claim_next(owner)
    assert claimed is not None and claimed.job_id == job.job_id
    return Claimed(claimed, owner)


# -- claim and positions -----------------------------------------------------------------------------
def test_claims_follow_submission_order_and_positions_move_up(store: StoreUnderTest) -> None:
    jobs = [new_job(f"p{i}") for i in range(3)]
    assert [store.submit(job, max_queue=3) for job in jobs] == [1, 2, 3]
    assert store.count_waiting() == 3
    with pytest.raises(QueueFullError):
        store.submit(new_job(), max_queue=3)

    owner = store.new_owner()
    first = store.claim_next(owner)
    assert first is not None and first.job_id == jobs[0].job_id
    assert (first.state, first.attempts) == (JobState.STARTED, 1)
    assert [store.position(job.job_id) for job in jobs] == [None, 1, 2]
    assert store.count_waiting() == 2
    assert store.submit(new_job(), max_queue=3) == 3  # a running job takes no queue slot
    second = store.claim_next(store.new_owner())
    assert second is not None and second.job_id == jobs[1].job_id


def test_success_keeps_the_result_and_a_late_owner_changes_nothing(store: StoreUnderTest) -> None:
    claimed = submit_and_claim(store)
    assert store.complete(claimed.job.job_id, claimed.owner)
    record = store.get(claimed.job.job_id)
    assert record is not None and record.state is JobState.SUCCESS and record.result is not None
    assert record.finished_at is not None and record.error is None
    assert not store.fail(claimed.job.job_id, claimed.owner, "late error", retryable=False)
    assert state(store, claimed.job.job_id)[0] is JobState.SUCCESS


# -- failed attempts ---------------------------------------------------------------------------------
def test_retryable_failure_goes_back_to_the_queue_until_attempts_are_used_up(store: StoreUnderTest) -> None:
    job = new_job()
    store.submit(job)
    for attempt in range(1, MAX_ATTEMPTS):
        owner = store.new_owner()
        claimed = store.claim_next(owner)
        assert claimed is not None and claimed.attempts == attempt
        assert store.fail(job.job_id, owner, "CUDA out of memory", retryable=True)
        # waiting again, with a place in the queue; the last attempt's error is not shown while it waits
        assert state(store, job.job_id) == (JobState.PENDING, attempt, None)
        assert store.position(job.job_id) == 1
    owner = store.new_owner()
    assert store.claim_next(owner) is not None
    assert store.fail(job.job_id, owner, "CUDA out of memory", retryable=True)
    assert state(store, job.job_id) == (JobState.FAILURE, MAX_ATTEMPTS, "CUDA out of memory (after 3 attempts)")
    assert store.position(job.job_id) is None
    assert store.claim_next(store.new_owner()) is None


def test_failure_that_cannot_pass_ends_the_job_at_once(store: StoreUnderTest) -> None:
    claimed = submit_and_claim(store)
    assert store.fail(claimed.job.job_id, claimed.owner, "weight file missing", retryable=False)
    assert state(store, claimed.job.job_id) == (JobState.FAILURE, 1, "weight file missing")
    assert store.count_waiting() == 0


# -- dead owners ---------------------------------------------------------------------------------------
def test_a_live_owner_keeps_its_job(store: StoreUnderTest) -> None:
    claimed = submit_and_claim(store)
    assert store.take_over(claimed.job.job_id, store.new_owner()) is None
    assert state(store, claimed.job.job_id)[0] is JobState.STARTED
    assert store.complete(claimed.job.job_id, claimed.owner)


def test_a_dead_owners_job_is_taken_over_and_the_dead_owner_changes_nothing(store: StoreUnderTest) -> None:
    claimed = submit_and_claim(store)
    store.kill(claimed.owner)
    heir = store.new_owner()
    taken = store.take_over(claimed.job.job_id, heir)
    assert taken is not None and taken.job_id == claimed.job.job_id
    assert (taken.state, taken.attempts) == (JobState.STARTED, 2)
    assert not store.complete(claimed.job.job_id, claimed.owner)
    assert store.complete(claimed.job.job_id, heir)
    assert state(store, claimed.job.job_id)[0] is JobState.SUCCESS


def test_a_dead_owner_on_the_last_attempt_fails_the_job(store: StoreUnderTest) -> None:
    job = new_job()
    store.submit(job)
    for _ in range(MAX_ATTEMPTS - 1):
        owner = store.new_owner()
        store.claim_next(owner)
        store.fail(job.job_id, owner, "CUDA out of memory", retryable=True)
    owner = store.new_owner()
    store.claim_next(owner)
    store.kill(owner)
    assert store.take_over(job.job_id, store.new_owner()) is None
    assert state(store, job.job_id) == (
        JobState.FAILURE,
        MAX_ATTEMPTS,
        "worker died while running the job (killed or out of memory) (after 3 attempts)",
    )


def test_a_dead_owners_job_past_the_timeout_fails_when_taken_over(store: StoreUnderTest, clock: Clock) -> None:
    claimed = submit_and_claim(store)
    store.kill(claimed.owner)
    clock.now += TIMEOUT_S + 1
    assert store.take_over(claimed.job.job_id, store.new_owner()) is None
    assert state(store, claimed.job.job_id) == (JobState.FAILURE, 1, "Timeout: generation took longer than 100 s")


# -- cancel -------------------------------------------------------------------------------------------
def test_cancel_revokes_waiting_and_running_jobs_and_refuses_finished_ones(
    store: StoreUnderTest, clock: Clock
) -> None:
    running = submit_and_claim(store)
    waiting = new_job()
    store.submit(waiting)
    assert store.cancel(waiting.job_id) is JobState.REVOKED
    assert store.position(waiting.job_id) is None and store.count_waiting() == 0
    assert store.claim_next(store.new_owner()) is None  # it never starts
    assert store.take_over(waiting.job_id, store.new_owner()) is None  # nor does a late message start it

    assert store.cancel(running.job.job_id) is JobState.REVOKED
    assert not store.complete(running.job.job_id, running.owner)  # its worker's result is refused
    assert not store.fail(running.job.job_id, running.owner, "stopped", retryable=True)
    store.kill(running.owner)
    assert store.take_over(running.job.job_id, store.new_owner()) is None  # a dead owner's: still not rerun
    for job in (waiting.job_id, running.job.job_id):
        assert state(store, job)[0::2] == (JobState.REVOKED, CANCELLED_BY_CLIENT)
        assert store.cancel(job) is JobState.REVOKED  # again: the same, nothing written

    done, failed = submit_and_claim(store), submit_and_claim(store)
    store.complete(done.job.job_id, done.owner)
    store.fail(failed.job.job_id, failed.owner, "weight file missing", retryable=False)
    assert store.cancel(done.job.job_id) is JobState.SUCCESS
    assert store.cancel(failed.job.job_id) is JobState.FAILURE
    assert store.cancel(str(uuid.uuid4())) is None
    clock.now += RESULT_TTL_S + 1
    assert store.get(waiting.job_id) is None and store.cancel(waiting.job_id) is None  # expired like the rest


# -- expiry -------------------------------------------------------------------------------------------
def test_finished_jobs_expire_after_the_result_ttl(store: StoreUnderTest, clock: Clock) -> None:
    done, failed = submit_and_claim(store), submit_and_claim(store)
    store.complete(done.job.job_id, done.owner)
    store.fail(failed.job.job_id, failed.owner, "weight file missing", retryable=False)
    waiting = new_job()
    store.submit(waiting)
    clock.now += RESULT_TTL_S - 1
    assert store.get(done.job.job_id) is not None and store.get(failed.job.job_id) is not None
    clock.now += 2
    assert store.get(done.job.job_id) is None and store.get(failed.job.job_id) is None
    assert state(store, waiting.job_id)[0] is JobState.PENDING  # waiting jobs never expire


def test_unknown_job_is_none(store: StoreUnderTest) -> None:
    assert store.get(str(uuid.uuid4())) is None
    assert store.position(str(uuid.uuid4())) is None


# -- API keys: ownership, the per-key waiting limit, the fair queue -----------------------------------------
def keyed_job(key_name: str, prompt: str = "x") -> NewJob:
    return NewJob(
        job_id=str(uuid.uuid4()), task={"prompt": prompt}, output_name=f"{uuid.uuid4().hex}.png", key_name=key_name
    )


def test_the_key_name_is_kept_and_the_output_owner_outlives_the_job_record(store: StoreUnderTest, clock: Clock) -> None:
    job = keyed_job("alice")
    store.submit(job)
    record = store.get(job.job_id)
    assert record is not None and record.key_name == "alice"
    assert store.output_owner(job.output_name) == "alice"
    assert store.output_owner("never-made.png") is None
    owner = store.new_owner()
    claimed = store.claim_next(owner)
    assert claimed is not None and claimed.key_name == "alice"
    assert store.complete(job.job_id, owner)
    clock.now += RESULT_TTL_S + 1
    assert store.get(job.job_id) is None  # the record is gone ...
    assert store.output_owner(job.output_name) == "alice"  # ... its image still has an owner
    unkeyed = new_job()
    store.submit(unkeyed)
    assert store.output_owner(unkeyed.output_name) == ""  # no keys configured


def test_the_per_key_limit_refuses_one_key_while_others_submit_and_the_global_limit_comes_first(
    store: StoreUnderTest,
) -> None:
    assert [store.submit(keyed_job("a"), key_max_waiting=2) for _ in range(2)] == [1, 2]
    with pytest.raises(KeyQueueFullError) as refused:
        store.submit(keyed_job("a"), key_max_waiting=2)
    assert (refused.value.waiting, refused.value.limit) == (2, 2)
    assert store.count_waiting() == 2  # nothing added
    assert store.submit(keyed_job("b"), key_max_waiting=2) == 2  # another key still may (fair: after a's first)
    assert store.submit(keyed_job("a"), key_max_waiting=None) == 4  # no per-key limit given: none applies
    with pytest.raises(QueueFullError):  # the whole queue is full: that answer first, whatever the key
        store.submit(keyed_job("a"), max_queue=4, key_max_waiting=2)
    with pytest.raises(QueueFullError):
        store.submit(keyed_job("c"), max_queue=4, key_max_waiting=2)
    first = store.claim_next(store.new_owner())  # a running job no longer counts as waiting for its key
    assert first is not None and first.key_name == "a"
    assert store.submit(keyed_job("a"), key_max_waiting=3) == 4


def test_keys_take_turns_and_positions_are_the_claim_order(store: StoreUnderTest) -> None:
    a_jobs = [keyed_job("a", f"a{i}") for i in range(5)]
    assert [store.submit(job) for job in a_jobs] == [1, 2, 3, 4, 5]
    b_job = keyed_job("b", "b0")
    assert store.submit(b_job) == 2  # right after a's first: b was never served
    expected = [a_jobs[0], b_job, *a_jobs[1:]]
    assert [store.position(job.job_id) for job in expected] == [1, 2, 3, 4, 5, 6]
    claimed = []
    while (record := store.claim_next(store.new_owner())) is not None:
        claimed.append(record.task["prompt"])
        # after each claim, the positions still say the order in which the rest will start
        rest = [job for job in expected if job.task["prompt"] not in claimed]
        assert [store.position(job.job_id) for job in rest] == list(range(1, len(rest) + 1))
    assert claimed == ["a0", "b0", "a1", "a2", "a3", "a4"]


def test_a_key_that_comes_back_waits_for_the_keys_served_longer_ago(store: StoreUnderTest) -> None:
    for key in ("a", "b", "c"):
        store.submit(keyed_job(key, f"{key}0"))
        store.submit(keyed_job(key, f"{key}1"))
    order = []
    for _ in range(3):
        record = store.claim_next(store.new_owner())
        assert record is not None
        order.append(record.task["prompt"])
    late = keyed_job("a", "a2")
    store.submit(late)
    while (record := store.claim_next(store.new_owner())) is not None:
        order.append(record.task["prompt"])
    assert order == ["a0", "b0", "c0", "a1", "b1", "c1", "a2"]


def test_a_single_key_is_first_in_first_out(store: StoreUnderTest) -> None:
    jobs = [keyed_job("only", f"j{i}") for i in range(4)]
    assert [store.submit(job) for job in jobs] == [1, 2, 3, 4]
    claimed = []
    while (record := store.claim_next(store.new_owner())) is not None:
        claimed.append(record.job_id)
    assert claimed == [job.job_id for job in jobs]


# -- model affinity (jobs.affinity) ----------------------------------------------------------------------
def model_job(model: str, key_name: str = "", prompt: str = "x") -> NewJob:
    return NewJob(
        job_id=str(uuid.uuid4()), task={"prompt": prompt, "model": model}, output_name=f"{uuid.uuid4().hex}.png",
        key_name=key_name,
    )


def holding(*models: str, idle_holders: tuple[str, ...] = (), wait_s: float = 5.0) -> Affinity:
    return Affinity(frozenset(models), frozenset(idle_holders), wait_s)


def claim_prompt(store: StoreUnderTest, affinity: Affinity | None) -> str | None:
    record = store.claim_next(store.new_owner(), affinity)
    return None if record is None else str(record.task["prompt"])


def test_a_worker_takes_first_the_oldest_job_of_a_model_it_holds(store: StoreUnderTest) -> None:
    for prompt, model in (("j0", "a"), ("j1", "b"), ("j2", "a"), ("j3", "b")):
        store.submit(model_job(model, prompt=prompt))
    assert claim_prompt(store, holding("b")) == "j1"  # skips j0: its model is not held here
    assert claim_prompt(store, holding("b", "c")) == "j3"
    assert claim_prompt(store, holding("c")) == "j0"  # holds none of theirs, no idle holder: the oldest
    assert claim_prompt(store, None) == "j2"  # affinity off: plain fair order
    assert claim_prompt(store, holding("a")) is None and store.count_waiting() == 0


def test_affinity_keeps_the_turns_between_keys(store: StoreUnderTest) -> None:
    """A key's single job still starts after at most one job of another key's batch, whoever holds what."""
    for index in range(4):
        store.submit(model_job("a", "alice", f"a{index}"))
    store.submit(model_job("b", "bob", "b0"))
    order = [claim_prompt(store, holding("a")) for _ in range(5)]
    assert order == ["a0", "b0", "a1", "a2", "a3"]  # bob's turn came second although this worker holds "a"


def test_a_job_waits_for_an_idle_holder_of_its_model_at_most_the_affinity_wait(
    store: StoreUnderTest, clock: Clock
) -> None:
    job = model_job("b", prompt="for-b")
    store.submit(job)
    waiting = holding("a", idle_holders=("b",), wait_s=5.0)
    assert claim_prompt(store, waiting) is None  # left for the idle worker that holds "b"
    assert state(store, job.job_id)[:2] == (JobState.PENDING, 0) and store.position(job.job_id) == 1
    assert claim_prompt(store, holding("a", idle_holders=("c",))) == "for-b"  # nobody idle holds "b": taken
    late = model_job("b", prompt="late")
    store.submit(late)
    clock.now += 5.0  # it has waited the whole affinity wait: any idle worker takes it
    assert claim_prompt(store, waiting) == "late"


def test_the_look_for_a_held_model_is_bounded(store: StoreUnderTest) -> None:
    for index in range(LOOKAHEAD):
        store.submit(model_job("a", prompt=f"a{index}"), max_queue=LOOKAHEAD + 1)
    store.submit(model_job("b", prompt="beyond"), max_queue=LOOKAHEAD + 1)
    # The held model's job lies past the first LOOKAHEAD jobs: the claim's cost stays bounded, it takes the oldest.
    assert claim_prompt(store, holding("b")) == "a0"
    assert claim_prompt(store, holding("b")) == "beyond"  # now within the window


def test_only_jobs_sent_within_the_affinity_wait_overtake_the_oldest(store: StoreUnderTest, clock: Clock) -> None:
    store.submit(model_job("a", prompt="first"))
    clock.now += 5.0
    store.submit(model_job("b", prompt="sent-later"))
    # "sent-later" came a whole affinity wait after "first": a worker holding "b" does not start it first.
    assert claim_prompt(store, holding("b", wait_s=5.0)) == "first"
    assert claim_prompt(store, holding("b", wait_s=5.0)) == "sent-later"
