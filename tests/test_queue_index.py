"""The fair queue's index, on both stores: the next job and every position it gives equal ``fairness.fair_order``
over the whole queue (the rule, stated once), the work of a submit, claim, cancel or position does not grow with
the queue's length, and a queue filled by a version without the index gets it at start.

Work is counted, never timed: SQLite's virtual machine instructions (a progress handler called at each one)
and the query plans of the statements a call runs; Redis's per-command call counts (``INFO commandstats``).
"""

from __future__ import annotations

import random
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
import redis

from imagen.config import Settings
from imagen.jobs.distributed.keys import JOB_PREFIX, KEY_TURNS, PREFIX, UNCONFIRMED, WAITING, queue_key
from imagen.jobs.distributed.outcomes import Claim, ClaimOutcome
from imagen.jobs.distributed.reaper import Housekeeper
from imagen.jobs.distributed.store import RedisJobStore, connect
from imagen.jobs.embedded.store import SqliteJobStore
from imagen.jobs.fairness import WaitingJob, fair_order
from imagen.jobs.lifecycle import AttemptPolicy, OwnerToken
from imagen.jobs.types import JobState, NewJob
from tests.celery_support import RedisServer, own_redis, shared_redis

POLICY = AttemptPolicy(max_attempts=50, timeout_s=100.0)
SMALL = 100
BIG = 20_000
BIG_REDIS = 5_000  # each submission is a few round trips: 5,000 already make any per-job read stand out
NO_LIMIT = 10**9


def new_job(key_name: str) -> NewJob:
    job_id = uuid.uuid4().hex
    return NewJob(job_id=job_id, task={}, output_name=f"{job_id}.png", key_name=key_name)


# -- both stores, as the random walk uses them ---------------------------------------------------------
class Sqlite:
    def __init__(self, path: Path) -> None:
        self.store = SqliteJobStore(path, policy=POLICY, result_ttl_s=3600)
        self.owner = OwnerToken.new()  # this process: alive, so nothing it claims is taken back

    def submit(self, key_name: str) -> str:
        job = new_job(key_name)
        self.store.submit(job, NO_LIMIT)
        return job.job_id

    def claim(self) -> str | None:
        record = self.store.claim_next(self.owner)
        return None if record is None else record.job_id

    def requeue(self, job_id: str) -> None:
        assert self.store.fail_attempt(job_id, self.owner, "retry", retryable=True) is not None

    def cancel(self, job_id: str) -> None:
        self.store.cancel(job_id)

    def position(self, job_id: str) -> int | None:
        return self.store.position(job_id)

    def whole_queue(self) -> tuple[list[WaitingJob], dict[str, int]]:
        """The queue as ``fair_order`` reads it, read in full (what the index spares every call)."""
        db = self.store.file.connection()
        rows = db.execute("SELECT job_id, key_name, seq FROM jobs WHERE state = ?", (JobState.PENDING.value,))
        waiting = [WaitingJob(row["job_id"], row["key_name"], row["seq"]) for row in rows]
        turns = {row["key_name"]: int(row["turn"]) for row in db.execute("SELECT key_name, turn FROM key_turns")}
        return waiting, turns

    def close(self) -> None:
        self.store.close()


class Redis:
    def __init__(self, server: RedisServer) -> None:
        server.client().flushall()
        self.client = connect(server.url)
        self.store = RedisJobStore(self.client, result_ttl_s=3600)
        self.running: dict[str, str] = {}  # job -> the token that runs it

    def submit(self, key_name: str, confirm: bool = True) -> str:
        job = new_job(key_name)
        self.store.jobs.submit(job, NO_LIMIT)
        if confirm:
            assert self.store.jobs.confirm(job.job_id)
        return job.job_id

    def claim_next(self, named: str = "") -> Claim:
        token = str(OwnerToken.new(slot=uuid.uuid4().hex[:6]))
        claim = self.store.attempts.claim_next(
            token, ticket=uuid.uuid4().hex, max_attempts=50, lock_ttl_s=60.0, timeout_s=100.0, named=named
        )
        if claim.outcome is ClaimOutcome.CLAIMED:
            self.running[claim.job_id] = token
        return claim

    def claim(self) -> str | None:
        claim = self.claim_next()
        return claim.job_id if claim.outcome is ClaimOutcome.CLAIMED else None

    def requeue(self, job_id: str) -> None:
        self.store.attempts.retry_or_fail(job_id, self.running.pop(job_id), "retry", max_attempts=50)

    def cancel(self, job_id: str) -> None:
        self.store.jobs.cancel(job_id)

    def position(self, job_id: str) -> int | None:
        return self.store.jobs.position(job_id)

    def whole_queue(self) -> tuple[list[WaitingJob], dict[str, int]]:
        """The confirmed waiting jobs as ``fair_order`` reads them, read in full."""
        unconfirmed = {raw.decode() for raw in cast(list[bytes], self.client.zrange(UNCONFIRMED, 0, -1))}
        waiting = []
        for raw, seq in cast(list[tuple[bytes, float]], self.client.zrange(WAITING, 0, -1, withscores=True)):
            job_id = raw.decode()
            if job_id not in unconfirmed:
                key_name = cast(bytes | None, self.client.hget(JOB_PREFIX + job_id, "key_name")) or b""
                waiting.append(WaitingJob(job_id, key_name.decode(), seq))
        raw_turns = cast(dict[bytes, bytes], self.client.hgetall(KEY_TURNS))
        turns = {key.decode(): int(value) for key, value in raw_turns.items()}
        return waiting, turns

    def close(self) -> None:
        self.client.close()


Store = Sqlite | Redis


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    opened = (
        Sqlite(tmp_path / "jobs.sqlite3")
        if request.param == "sqlite"
        else Redis(request.getfixturevalue("shared_redis"))
    )
    yield opened
    opened.close()


def assert_positions_are_the_fair_order(store: Store) -> list[str]:
    order = [job.job_id for job in fair_order(*store.whole_queue())]
    assert [store.position(job_id) for job_id in order] == list(range(1, len(order) + 1))
    return order


# -- (a) the index gives the rule's order ---------------------------------------------------------------
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_next_job_and_positions_equal_the_fair_order_through_submits_claims_cancels_and_retries(
    store: Store, seed: int
) -> None:
    rng = random.Random(seed)
    keys = ["", "alice", "bob", "carol"]
    running: list[str] = []
    for _ in range(90):
        roll = rng.random()
        order = assert_positions_are_the_fair_order(store)
        if roll < 0.5 or not order:
            store.submit(rng.choice(keys))
        elif roll < 0.7:
            claimed = store.claim()
            assert claimed == order[0]
            assert store.position(claimed) is None
            running.append(claimed)
        elif roll < 0.85:
            cancelled = rng.choice(order)
            store.cancel(cancelled)
            assert store.position(cancelled) is None
        elif running:
            store.requeue(running.pop(rng.randrange(len(running))))  # back at the end, as a new submission
    for expected in assert_positions_are_the_fair_order(store):
        assert store.claim() == expected
    assert store.claim() is None


# -- the Redis worker's claim: an unconfirmed job starts only when its own message names it --------------
def test_a_message_starts_the_unconfirmed_job_it_names_only_when_that_job_ranks_first(
    shared_redis: RedisServer,
) -> None:
    queue = Redis(shared_redis)
    try:
        assert queue.claim_next().outcome is ClaimOutcome.NONE
        confirmed = queue.submit("a")
        pending = queue.submit("b", confirm=False)
        assert queue.claim_next(named=pending).job_id == confirmed  # key a's job is older: it goes first
        assert queue.claim_next().outcome is ClaimOutcome.UNCONFIRMED  # never another message's unconfirmed job
        assert queue.claim_next(named=pending).job_id == pending
        assert queue.store.jobs.confirm(pending) and queue.store.jobs.next_waiting() is None  # not queued again
        assert queue.claim_next().outcome is ClaimOutcome.NONE

        older = queue.submit("c", confirm=False)
        newer = queue.submit("c")
        assert queue.claim_next(named=older).job_id == older  # older than its key's confirmed job
        assert queue.claim_next(named=uuid.uuid4().hex).job_id == newer
    finally:
        queue.close()


# -- (b) the cost of each call does not grow with the queue's length ------------------------------------
def fill_sqlite(store: SqliteJobStore, count: int, keys: int) -> None:
    """``count`` waiting jobs over ``keys`` keys in one transaction (the triggers keep the index as a submit
    would)."""
    jobs = [new_job(f"key{index % keys}") for index in range(count)]
    with store.file.transaction() as db:
        db.executemany(
            "INSERT INTO jobs (job_id, state, task, output_name, created_at, key_name) VALUES (?, ?, '{}', ?, 0, ?)",
            [(job.job_id, JobState.PENDING.value, job.output_name, job.key_name) for job in jobs],
        )


def sqlite_cost(store: SqliteJobStore, call: Callable[[], object]) -> tuple[int, list[str]]:
    """How many virtual machine instructions ``call`` ran (triggers included), and its statements."""
    db = store.file.connection()
    steps, statements = [0], list[str]()

    def step() -> int:
        steps[0] += 1
        return 0

    db.set_progress_handler(step, 1)
    db.set_trace_callback(statements.append)
    try:
        call()
    finally:
        db.set_progress_handler(None, 1)
        db.set_trace_callback(None)
    return steps[0], statements


def sqlite_calls(store: SqliteJobStore, owner: OwnerToken) -> dict[str, Callable[[], object]]:
    db = store.file.connection()
    oldest = db.execute("SELECT job_id FROM jobs WHERE state = 'PENDING' ORDER BY seq LIMIT 1").fetchone()[0]
    newest = db.execute("SELECT job_id FROM jobs WHERE state = 'PENDING' ORDER BY seq DESC LIMIT 1").fetchone()[0]
    return {
        "submit": lambda: store.submit(new_job("key0"), NO_LIMIT, key_max_waiting=NO_LIMIT),
        "position of the newest": lambda: store.position(newest),
        "position of the oldest": lambda: store.position(oldest),
        "count": store.count_waiting,
        "claim": lambda: store.claim_next(owner),
        "cancel the newest": lambda: store.cancel(newest),
    }


@pytest.mark.parametrize("keys", [1, 100])
def test_sqlite_calls_cost_the_same_at_100_and_20000_waiting_and_never_scan_the_jobs(tmp_path: Path, keys: int) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3", policy=POLICY, result_ttl_s=3600)
    owner = OwnerToken.new()
    try:
        fill_sqlite(store, SMALL, keys)
        small = {name: sqlite_cost(store, call) for name, call in sqlite_calls(store, owner).items()}
        fill_sqlite(store, BIG - SMALL, keys)
        big = {name: sqlite_cost(store, call) for name, call in sqlite_calls(store, owner).items()}
        for name, (steps, statements) in big.items():
            # A deeper B-tree costs a few more steps per lookup; a scan of the jobs would cost 200 times more.
            assert steps <= 2 * small[name][0] + 200, (name, small[name][0], steps)
            db = store.file.connection()
            for statement in statements:
                if statement.lstrip().upper().startswith(("SELECT", "UPDATE", "INSERT", "DELETE")):
                    plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + statement)]
                    assert not [line for line in plan if line.startswith("SCAN jobs")], (name, statement, plan)
    finally:
        store.close()


def redis_calls(server: RedisServer, call: Callable[[], object]) -> dict[str, int]:
    """How many times ``call`` ran each Redis command (those its scripts ran included)."""
    admin = server.client()

    def stats() -> dict[str, int]:
        found = admin.info("commandstats")
        # A script's first call in a while may find it unloaded (NOSCRIPT) and load it: not the call's work.
        return {
            name: int(value["calls"]) - int(value.get("failed_calls", 0)) - int(value.get("rejected_calls", 0))
            for name, value in found.items()
            if name != "cmdstat_script|load"
        }

    before = stats()
    call()
    after = stats()
    made = {name: count - before.get(name, 0) for name, count in after.items() if count != before.get(name, 0)}
    made.pop("cmdstat_info", None)
    return made


def redis_index_calls(queue: Redis) -> dict[str, Callable[[], object]]:
    order = [raw.decode() for raw in cast(list[bytes], queue.client.zrange(WAITING, 0, -1))]
    oldest, newest = order[0], order[-1]
    return {
        "submit": lambda: queue.store.jobs.submit(new_job("key0"), NO_LIMIT, key_max_waiting=NO_LIMIT),
        "position of the newest": lambda: queue.position(newest),
        "position of the oldest": lambda: queue.position(oldest),
        "count": queue.store.jobs.count_waiting,
        "claim": queue.claim,
        "cancel the newest": lambda: queue.cancel(newest),
    }


def fill_redis(queue: Redis, count: int, keys: int) -> None:
    for index in range(count):
        queue.submit(f"key{index % keys}")


@pytest.mark.parametrize("keys", [1, 100])
def test_redis_calls_run_as_many_commands_at_100_and_5000_waiting(own_redis: RedisServer, keys: int) -> None:
    own_redis.client().config_set("appendonly", "no")  # filling it 20,000 times with an fsync each is slow
    queue = Redis(own_redis)
    try:
        fill_redis(queue, SMALL, keys)
        small = {name: redis_calls(own_redis, call) for name, call in redis_index_calls(queue).items()}
        fill_redis(queue, BIG_REDIS - SMALL, keys)
        assert queue.store.jobs.count_waiting() >= BIG_REDIS - 3
        big = {name: redis_calls(own_redis, call) for name, call in redis_index_calls(queue).items()}
        for name, made in big.items():
            # A branch may differ (a key emptied by the call, a total counted once): a few commands, where a
            # read per waiting job would be thousands.
            assert sum(made.values()) <= sum(small[name].values()) + 4, (name, small[name], made)
            assert all(count <= small[name].get(command, 0) + 2 for command, count in made.items()), (name, made)
    finally:
        queue.close()


# -- (c) a queue filled by a version without the index -------------------------------------------------
def test_an_sqlite_queue_from_before_the_index_is_indexed_at_open_and_keeps_its_order(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    old = Sqlite(path)
    for index in range(30):
        old.submit(["a", "b", "c"][index % 3] if index % 4 else "")
    for _ in range(4):
        old.claim()  # the keys' turns
    expected = [job.job_id for job in fair_order(*old.whole_queue())]
    old.close()
    db = sqlite3.connect(path)  # as the version before the index left it
    for trigger in ("queue_on_insert", "queue_on_requeue", "queue_on_start", "queue_on_delete"):
        db.execute(f"DROP TRIGGER {trigger}")
    for name in ("keys_in_fair_order", "key_turns_by_turn", "jobs_waiting_by_key"):
        db.execute(f"DROP INDEX {name}")
    db.execute("DROP TABLE queue_length")
    db.execute("ALTER TABLE key_turns DROP COLUMN waiting")
    db.execute("ALTER TABLE key_turns DROP COLUMN oldest_seq")
    db.commit()
    db.close()

    reopened = Sqlite(path)
    try:
        assert reopened.store.count_waiting() == len(expected)
        assert assert_positions_are_the_fair_order(reopened) == expected
        assert [reopened.claim() for _ in expected] == expected
        assert reopened.claim() is None
    finally:
        reopened.close()


def test_a_redis_queue_without_the_index_is_indexed_once_and_keeps_its_order(shared_redis: RedisServer) -> None:
    queue = Redis(shared_redis)
    try:
        for index in range(30):
            queue.submit(["a", "b", "c"][index % 3] if index % 4 else "")
        for _ in range(4):
            queue.claim()
        late = queue.submit("a", confirm=False)  # not confirmed yet: indexed by its confirmation, not before
        expected = [job.job_id for job in fair_order(*queue.whole_queue())]
        client: redis.Redis = queue.client
        client.delete(*client.keys(PREFIX + "queue*"))  # as a version without the index left the Redis

        assert queue.store.jobs.ensure_indexed() == len(expected)
        assert queue.store.jobs.ensure_indexed() == -1  # built once
        assert assert_positions_are_the_fair_order(queue) == expected
        assert client.zscore(queue_key("a"), late) is None
        assert queue.store.jobs.confirm(late)
        assert [queue.claim() for _ in range(len(expected) + 1)] == [*expected, late]
        assert queue.claim_next().outcome is ClaimOutcome.NONE
    finally:
        queue.close()


def test_the_housekeeper_every_process_runs_indexes_a_redis_queue_without_the_index(shared_redis: RedisServer) -> None:
    queue = Redis(shared_redis)
    try:
        jobs = [queue.submit(key_name) for key_name in ("a", "b", "a")]
        queue.client.delete(*queue.client.keys(PREFIX + "queue*"))
        assert queue.store.jobs.next_waiting() is None
        Housekeeper(Settings(broker_url=shared_redis.url), queue.store, lambda job_id: None, "imagen").run_once()
        assert [queue.position(job_id) for job_id in jobs] == [1, 2, 3]
        assert queue.store.jobs.ensure_indexed() == -1
    finally:
        queue.close()


__all__ = ["own_redis", "shared_redis"]  # fixtures (shared_redis also through request.getfixturevalue)
