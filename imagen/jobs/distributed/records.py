"""The job records of the distributed backend and its fair queue: submit, confirm, read, cancel, and the
order in which waiting jobs start.

A submission is added *unconfirmed* and confirmed once its broker message is out (IMAGEN_BROKER_TIMEOUT_S); the
queue's order is ``jobs.fairness``, read from the fair queue's index (``keys.py``): the next job is the oldest
of the first key of ``imagen:queue_keys``, and a position needs the job's index within its key's queue
(``ZCOUNT``) and each waiting key's rank and count. Submit, confirm, cancel, claim and position cost
O(log n) in the queue's length n (position also reads one rank and one count per key with jobs waiting),
a fixed number of Redis commands whatever n is. What a worker's attempt does to a record (claim, progress,
end) is ``attempts.py``. The keys are described in ``keys.py``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import cast

import redis

from imagen.errors import KeyQueueFullError, QueueFullError
from imagen.generation.base import INPUT_ROLES
from imagen.jobs import fairness, stats
from imagen.jobs.affinity import Candidate
from imagen.jobs.distributed.keys import (
    JOB_PREFIX,
    KEY_TURNS,
    OUTPUT_OWNERS,
    QUEUE_INDEX,
    QUEUE_INDEXED,
    QUEUE_KEYS,
    QUEUE_PREFIX,
    QUEUE_SIZES,
    RUNNING,
    SEQUENCE,
    UNCONFIRMED,
    WAITING,
    job_key,
    queue_key,
)
from imagen.jobs.distributed.outcomes import ScriptReply
from imagen.jobs.distributed.scripts import CONFLICT_RETRIES, Scripts, reply_text
from imagen.jobs.distributed.totals import JobTotals
from imagen.jobs.lifecycle import CANCELLED_BY_CLIENT, Verdict, cancel_verdict
from imagen.jobs.types import JobRecord, JobState, NewJob, Submitted

log = logging.getLogger("imagen.jobs")

# How long a new record lives before its message must be confirmed published (IMAGEN_BROKER_TIMEOUT_S). The
# API's Redis calls time out no later than this, so a confirmation that arrives late (Redis stalled) finds the
# record gone: never a job that runs after its submitter was told 503.
DEFAULT_CONFIRM_WINDOW_S = 3.0


class JobRecords:
    def __init__(
        self,
        client: redis.Redis,
        scripts: Scripts,
        totals: JobTotals,
        *,
        result_ttl_s: float,
        confirm_window_s: float = DEFAULT_CONFIRM_WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.confirm_window_s = confirm_window_s
        self.scripts = scripts
        self.totals = totals
        self.result_ttl_s = result_ttl_s
        self.clock = clock

    @property
    def ttl_ms(self) -> int:
        """A finished record's Redis expiry."""
        return max(1, int(self.result_ttl_s * 1000))

    # -- submission (API side) -------------------------------------------------------------------
    def submit(self, job: NewJob, max_queue: int, key_max_waiting: int | None = None) -> Submitted:
        """Add the job, unconfirmed: publish its message, then ``confirm`` it within ``confirm_window_s``.
        ``QueueFullError`` when ``max_queue`` jobs wait (checked first), ``KeyQueueFullError`` when
        ``key_max_waiting`` jobs of the job's key do: both checked in the script that adds it."""
        answer = cast(
            list[int],
            self.scripts.run(
                "submit",
                [WAITING, SEQUENCE, job_key(job.job_id), UNCONFIRMED, OUTPUT_OWNERS, QUEUE_SIZES],
                [
                    job.job_id,
                    json.dumps(job.task),
                    job.output_name,
                    repr(self.clock()),
                    max_queue,
                    max(1, int(self.confirm_window_s * 1000)),
                    JOB_PREFIX,
                    job.key_name,
                    "" if key_max_waiting is None else key_max_waiting,
                    " ".join(job.all_output_names()),
                    *(item for role, png in job.inputs.items() for item in (role, png)),
                ],
            ),
        )
        if answer[0] == 0:
            raise QueueFullError(f"{answer[1]} jobs waiting (max {max_queue})")
        if answer[0] == 2:
            assert key_max_waiting is not None
            raise KeyQueueFullError(int(answer[1]), key_max_waiting)
        # Read after the script: the place it had when it was added (or later, if others started since).
        return Submitted(job_id=job.job_id, position=self.position(job.job_id) or 1)

    def confirm(self, job_id: str) -> bool:
        """The job's message is published: keep it. False when it expired first (it is gone: answer 503)."""
        return bool(
            self.scripts.run("confirm", [job_key(job_id), WAITING, UNCONFIRMED, *QUEUE_INDEX], [job_id, QUEUE_PREFIX])
        )

    def forget(self, job_id: str) -> None:
        """Undo a submission whose message could not be published (a no-op once confirmed)."""
        self.scripts.run("withdraw", [job_key(job_id), WAITING, UNCONFIRMED, OUTPUT_OWNERS], [job_id])

    def sweep_unconfirmed(self) -> int:
        """Drop the waiting entries of submissions that expired unconfirmed; how many."""
        return int(self.scripts.run("sweep_unconfirmed", [WAITING, UNCONFIRMED], [JOB_PREFIX]))

    # -- reading ---------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord | None:
        # The record's fields by name: never its input images, which may weigh megabytes.
        record = record_of(job_id, cast(list[bytes | None], self.client.hmget(job_key(job_id), RECORD_FIELDS)))
        if record is None:
            return None
        if record.finished_at is not None and self.clock() - record.finished_at > self.result_ttl_s:
            return None
        return record

    def inputs(self, job_id: str) -> dict[str, bytes]:
        """The job's input images by role (PNG bytes); empty when it has none."""
        fields = [INPUT_FIELD_PREFIX + role for role in INPUT_ROLES]
        values = cast(list[bytes | None], self.client.hmget(job_key(job_id), fields))  # one round trip
        return {role: value for role, value in zip(INPUT_ROLES, values, strict=True) if value is not None}

    def output_owner(self, output_name: str) -> str | None:
        """The key whose job named this output file; None when no job did. Never expires with the job."""
        owner = cast(bytes | None, self.client.hget(OUTPUT_OWNERS, output_name))
        return None if owner is None else owner.decode()

    def count_waiting(self) -> int:
        return int(self.client.zcard(WAITING))

    def count_running(self) -> int:
        return int(self.client.scard(RUNNING))

    def running_tickets(self) -> dict[str, str]:
        """The broker messages (tickets) that started the running jobs: message id -> job id."""
        running = [raw.decode() for raw in cast(set[bytes], self.client.smembers(RUNNING))]
        if not running:
            return {}
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in running:
                pipe.hget(job_key(job_id), "ticket")
            tickets = cast(list[bytes | None], pipe.execute())
        return {ticket.decode(): job_id for job_id, ticket in zip(running, tickets, strict=True) if ticket}

    # -- cancel (API side), and the totals after a job's end -------------------------------------
    def cancel(self, job_id: str) -> JobState | None:
        """Apply ``lifecycle.cancel_verdict`` (``lua/cancel.lua``): the job's state afterwards, or None when
        unknown. The rule depends on the state alone, so the script's guard is the state read."""
        for _ in range(CONFLICT_RETRIES):
            record = self.get(job_id)
            if record is None:
                return None
            verdict = cancel_verdict(record.state)
            if not verdict.write:
                return verdict.state
            answer = self.scripts.run(
                "cancel",
                [job_key(job_id), WAITING, RUNNING, *QUEUE_INDEX],
                [
                    job_id,
                    record.state.value,
                    verdict.state.value,
                    CANCELLED_BY_CLIENT,
                    repr(self.clock()),
                    self.ttl_ms,
                    QUEUE_PREFIX,
                ],
            )
            if reply_text(answer) == ScriptReply.APPLIED:
                self.count_event(job_id)
                return verdict.state
        raise redis.RedisError(f"job {job_id} kept changing state while being cancelled")

    def count_event(self, job_id: str, verdict: Verdict | None = None, record: JobRecord | None = None) -> None:
        """After a script that ended an attempt (``verdict``) or the job: log the event, add to the totals.
        ``record``: the job as the script left it, when the script answered it (else it is read here).
        Never raises: the script's write is done, and a retry of it would find the job changed."""
        try:
            increments = stats.on_written(record if record is not None else self.get(job_id), verdict)
        except redis.RedisError as exc:
            log.warning("job %s: its end was not counted (%s)", job_id, exc)
            return
        except Exception:
            log.exception("job %s: its end was not counted", job_id)
            return
        self.totals.add(increments)

    # -- the fair queue --------------------------------------------------------------------------
    def position(self, job_id: str) -> int | None:
        """The job's place in the fair order (1 = next to start); None if it is not waiting. A submission not
        confirmed yet has the place it will have once confirmed (the last of its key): its own submission's
        answer gives it before the confirmation. One script (``lua/position.lua``): its cost grows with the
        keys that have jobs waiting, inside Redis, and with the log of the queue's length."""
        place = self.scripts.run(
            "position",
            [job_key(job_id), WAITING, KEY_TURNS, QUEUE_KEYS, QUEUE_SIZES],
            [job_id, QUEUE_PREFIX, JobState.PENDING.value],
        )
        return None if place is None else int(place)

    def next_waiting(self) -> tuple[str, str] | None:
        """The fair queue's next confirmed job and its key (``jobs.fairness``: the first key of the index, then
        its oldest job; one script); None when no confirmed job waits. Read, not locked: the claim applies it
        under the record's guard."""
        answer = cast(list[bytes] | None, self.scripts.run("next_waiting", [QUEUE_KEYS], [QUEUE_PREFIX]))
        return None if not answer else (answer[0].decode(), answer[1].decode())

    def oldest_of_key(self, key_name: str, limit: int) -> list[Candidate]:
        """The key's ``limit`` oldest confirmed waiting jobs, oldest first, with their model (``jobs.affinity``):
        one range read and one small read per job, whatever the queue's length."""
        ids = [raw.decode() for raw in cast(list[bytes], self.client.zrange(queue_key(key_name), 0, limit - 1))]
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(job_key(job_id), ["model", "created_at", "state"])
            rows = cast(list[list[bytes | None]], pipe.execute())
        candidates = []
        for job_id, (raw_model, created_at, state) in zip(ids, rows, strict=True):
            if state != JobState.PENDING.value.encode():
                continue  # claimed or cancelled since the range was read
            if raw_model is not None:
                model = raw_model.decode()
            else:  # queued by a version that did not record it
                task = cast(bytes | None, self.client.hget(job_key(job_id), "task"))
                model = str(json.loads(task or b"{}").get("model", ""))
            candidates.append(Candidate(job_id, model, float(created_at or 0.0)))
        return candidates

    def candidate(self, job_id: str) -> Candidate | None:
        """The waiting job as model affinity sees it (``jobs.affinity``); None when it is not waiting."""
        state, model, created_at = cast(
            list[bytes | None], self.client.hmget(job_key(job_id), ["state", "model", "created_at"])
        )
        if state != JobState.PENDING.value.encode():
            return None
        return Candidate(job_id, (model or b"").decode(), float(created_at or 0.0))

    def candidate_rank(self, job_id: str) -> float | None:
        """The rank a waiting job not confirmed yet would give its key if it started next (it is older than
        its key's confirmed jobs, or its key has none); None when it may not start before them."""
        fields = ["state", "key_name", "seq", "unconfirmed"]
        state, raw_key, raw_seq, unconfirmed = cast(list[bytes | None], self.client.hmget(job_key(job_id), fields))
        if state != JobState.PENDING.value.encode() or raw_seq is None or unconfirmed is None:
            return None
        key_name, seq = (raw_key or b"").decode(), float(raw_seq)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.zrange(queue_key(key_name), 0, 0, withscores=True)
            pipe.hget(KEY_TURNS, key_name)
            head, turn = pipe.execute()
        if head and head[0][1] < seq:
            return None
        return fairness.key_rank(int(turn or 0), seq)

    def key_rank(self, key_name: str) -> float | None:
        """The rank of a key with confirmed jobs waiting (its score in the index); None when it has none."""
        score = self.client.zscore(QUEUE_KEYS, key_name)
        return None if score is None else float(score)

    def ensure_indexed(self) -> int:
        """Build the fair queue's index from the waiting jobs once (``lua/index_queue.lua``): for a Redis
        whose jobs were queued by a version without it. How many jobs it indexed (-1: built already)."""
        indexed = int(
            self.scripts.run(
                "index_queue",
                [QUEUE_INDEXED, WAITING, UNCONFIRMED, *QUEUE_INDEX],
                [QUEUE_PREFIX, JOB_PREFIX],
            )
        )
        if indexed > 0:
            log.info("fair queue: %d waiting jobs indexed by key", indexed)
        return indexed

    def confirmed_waiting(self) -> list[str]:
        """The PENDING jobs whose message was published (or should have been)."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.zrange(WAITING, 0, -1)
            pipe.zrange(UNCONFIRMED, 0, -1)
            waiting, unconfirmed = cast(list[list[bytes]], pipe.execute())
        skip = set(unconfirmed)
        return [raw.decode() for raw in waiting if raw not in skip]


RECORD_FIELDS = (
    "state", "task", "output_name", "attempts", "progress_step", "progress", "denoising", "result", "error",
    "created_at", "started_at", "finished_at", "key_name", "unconfirmed",
)  # fmt: skip
INPUT_FIELD_PREFIX = "input:"


def record_of(job_id: str, values: list[bytes | None]) -> JobRecord | None:
    """The record from the values of ``RECORD_FIELDS`` as Redis answers them; None for a job that does not
    exist or is not confirmed."""
    raw = {name: value.decode() for name, value in zip(RECORD_FIELDS, values, strict=True) if value is not None}
    if "state" not in raw or "unconfirmed" in raw:
        return None
    return _record(job_id, raw)


def _record(job_id: str, fields: dict[str, str]) -> JobRecord:
    state = JobState(fields["state"])
    progress = fields.get("progress")
    return JobRecord(
        job_id=job_id,
        state=state,
        task=json.loads(fields.get("task", "{}")),
        output_name=fields.get("output_name", ""),
        attempts=int(fields.get("attempts", 0)),
        progress_step=fields.get("progress_step"),
        progress=int(progress) if progress is not None else None,
        denoising=json.loads(fields["denoising"]) if fields.get("denoising") else None,
        result=json.loads(fields["result"]) if fields.get("result") else None,
        # A PENDING job may carry the error of its previous attempt; only a FAILURE (or REVOKED) shows it.
        error=fields.get("error") if state.shows_error() else None,
        created_at=float(fields.get("created_at", 0.0)),
        started_at=optional_float(fields.get("started_at")),
        finished_at=optional_float(fields.get("finished_at")),
        key_name=fields.get("key_name", ""),
    )


def optional_float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None
