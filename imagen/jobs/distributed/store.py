"""The job records of the distributed backend, in Redis (the broker's own server).

The keys and their layout are described in ``keys.py``; the Lua scripts that change them are run by
``scripts.py``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from imagen.errors import KeyQueueFullError, QueueFullError
from imagen.generation.base import INPUT_ROLES
from imagen.jobs import fairness, stats
from imagen.jobs.distributed.keys import (
    COPIES_PREFIX,
    JOB_PREFIX,
    KEY_TURNS,
    OUTPUT_OWNERS,
    OUTPUTS_STREAM,
    OUTPUTS_STREAM_MAXLEN,
    PNG_INDEX,
    PNG_PREFIX,
    PREVIEWS_CHANNEL,
    RUNNING,
    SEQUENCE,
    TURN,
    UNCONFIRMED,
    WAITING,
    job_key,
    lock_key,
)
from imagen.jobs.distributed.outcomes import AttemptOutcome, Claim, ClaimOutcome, ProgressOutcome, ScriptReply
from imagen.jobs.distributed.pngs import PngLimits, Pngs
from imagen.jobs.distributed.scripts import CONFLICT_RETRIES, Scripts, reply_text
from imagen.jobs.distributed.totals import JobTotals
from imagen.jobs.distributed.uploads import Uploads
from imagen.jobs.distributed.workers import Workers
from imagen.jobs.lifecycle import CANCELLED_BY_CLIENT, AttemptPolicy, Verdict, cancel_verdict
from imagen.jobs.types import JobRecord, JobState, NewJob, Submitted

if TYPE_CHECKING:
    from imagen.config import Settings

log = logging.getLogger("imagen.jobs")

# How long a new record lives before its message must be confirmed published. The API's Redis calls time out
# sooner than this, so a confirmation that arrives late (Redis stalled) finds the record gone: never a job
# that runs after its submitter was told 503.
CONFIRM_WINDOW_S = 1.0
RUNNING_STATES = (JobState.STARTED, JobState.PROGRESS)


def connect(
    url: str,
    *,
    connect_timeout: float = 1.0,
    socket_timeout: float | None = 5.0,
    retries: int = 1,
    retry_on_timeout: bool = True,
) -> redis.Redis:
    """A client that fails fast when Redis is down: short timeouts, ``retries`` immediate retries (on a
    broken connection always; on a timeout only with ``retry_on_timeout``, since that doubles the wait)."""
    # redis-py's Retry retries timeouts unless told its errors explicitly.
    errors: tuple[type[Exception], ...] = (redis.ConnectionError,) + (
        (redis.TimeoutError, TimeoutError) if retry_on_timeout else ()
    )
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=connect_timeout,
        socket_timeout=socket_timeout,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), retries, supported_errors=errors),
        retry_on_error=list(errors),
        health_check_interval=30,
    )


@dataclass(frozen=True)
class _Snapshot:
    """What a verdict is decided from, and what its script checks is still true."""

    state: JobState
    owner: str
    attempts: int
    started_at: float | None
    lock: str

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES


class RedisJobStore:
    """Job records and queue bookkeeping; every method is one round trip (or a few, for scans)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        result_ttl_s: float,
        png_limits: PngLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.result_ttl_s = result_ttl_s
        self.clock = clock
        self._scripts = Scripts(client)
        self.totals = JobTotals(client)
        self.uploads = Uploads(client, clock)
        self.workers = Workers(client, clock)
        self.pngs = Pngs(client, self._scripts, png_limits or PngLimits.defaults())

    @classmethod
    def from_settings(cls, settings: Settings, client: redis.Redis) -> RedisJobStore:
        return cls(client, result_ttl_s=settings.result_ttl_s, png_limits=PngLimits.from_settings(settings))

    def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        return self._scripts.run(script, keys, args)

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.result_ttl_s * 1000))

    # -- API side: submission --------------------------------------------------------------------
    def submit(self, job: NewJob, max_queue: int, key_max_waiting: int | None = None) -> Submitted:
        """Add the job, unconfirmed: publish its message, then ``confirm`` it within ``CONFIRM_WINDOW_S``.
        ``QueueFullError`` when ``max_queue`` jobs wait (checked first), ``KeyQueueFullError`` when
        ``key_max_waiting`` jobs of the job's key do: both checked in the script that adds it."""
        answer = cast(
            list[int],
            self._run(
                "submit",
                [WAITING, SEQUENCE, job_key(job.job_id), UNCONFIRMED, OUTPUT_OWNERS],
                [
                    job.job_id,
                    json.dumps(job.task),
                    job.output_name,
                    repr(self.clock()),
                    max_queue,
                    int(CONFIRM_WINDOW_S * 1000),
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

    def job_inputs(self, job_id: str) -> dict[str, bytes]:
        """The job's input images by role (PNG bytes); empty when it has none."""
        fields = [INPUT_FIELD_PREFIX + role for role in INPUT_ROLES]
        values = cast(list[bytes | None], self.client.hmget(job_key(job_id), fields))  # one round trip
        return {role: value for role, value in zip(INPUT_ROLES, values, strict=True) if value is not None}

    def confirm(self, job_id: str) -> bool:
        """The job's message is published: keep it. False when it expired first (it is gone: answer 503)."""
        return bool(self._run("confirm", [job_key(job_id), WAITING, UNCONFIRMED], [job_id]))

    def forget(self, job_id: str) -> None:
        """Undo a submission whose message could not be published (a no-op once confirmed)."""
        self._run("withdraw", [job_key(job_id), WAITING, UNCONFIRMED, OUTPUT_OWNERS], [job_id])

    def sweep_unconfirmed(self) -> int:
        """Drop the waiting entries of submissions that expired unconfirmed; how many."""
        return int(self._run("sweep_unconfirmed", [WAITING, UNCONFIRMED], [JOB_PREFIX]))

    # -- API side: reading -----------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord | None:
        # The record's fields by name: never its input images, which may weigh megabytes.
        values = cast(list[bytes | None], self.client.hmget(job_key(job_id), RECORD_FIELDS))
        raw = {name: value.decode() for name, value in zip(RECORD_FIELDS, values, strict=True) if value is not None}
        if "state" not in raw or "unconfirmed" in raw:
            return None
        record = _record(job_id, raw)
        if record.finished_at is not None and self.clock() - record.finished_at > self.result_ttl_s:
            return None
        return record

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
            answer = self._run(
                "cancel",
                [job_key(job_id), WAITING, RUNNING],
                [
                    job_id,
                    record.state.value,
                    verdict.state.value,
                    CANCELLED_BY_CLIENT,
                    repr(self.clock()),
                    self._ttl_ms,
                ],
            )
            if reply_text(answer) == ScriptReply.APPLIED:
                self._count(job_id)
                return verdict.state
        raise redis.RedisError(f"job {job_id} kept changing state while being cancelled")

    def count_waiting(self) -> int:
        return int(self.client.zcard(WAITING))

    def count_running(self) -> int:
        return int(self.client.scard(RUNNING))

    def _count(self, job_id: str, verdict: Verdict | None = None) -> None:
        """After a script that ended an attempt (``verdict``) or the job: log the event, add to the totals.
        Never raises: the script's write is done, and a retry of it would find the job changed."""
        try:
            increments = stats.on_written(self.get(job_id), verdict)
        except redis.RedisError as exc:
            log.warning("job %s: its end was not counted (%s)", job_id, exc)
            return
        except Exception:
            log.exception("job %s: its end was not counted", job_id)
            return
        self.totals.add(increments)

    def position(self, job_id: str) -> int | None:
        """The job's place in the fair order (1 = next to start); None if it is not waiting."""
        waiting, turns, _ = self._fair_view()
        return fairness.position(waiting, turns, job_id)

    def _fair_view(self) -> tuple[list[fairness.WaitingJob], dict[str, int], set[str]]:
        """What the fair order is decided from: the waiting jobs, each key's last turn, and the waiting jobs
        not confirmed yet. Read, not locked: a claim applies its decision under the record's guard."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.zrange(WAITING, 0, -1, withscores=True)
            pipe.hgetall(KEY_TURNS)
            pipe.zrange(UNCONFIRMED, 0, -1)
            queued, raw_turns, unconfirmed = cast(
                tuple[list[tuple[bytes, float]], dict[bytes, bytes], list[bytes]], pipe.execute()
            )
        names: list[bytes | None] = []
        if queued:
            with self.client.pipeline(transaction=False) as pipe:
                for raw_id, _ in queued:
                    pipe.hget(job_key(raw_id.decode()), "key_name")
                names = cast(list[bytes | None], pipe.execute())
        waiting = [
            fairness.WaitingJob(raw_id.decode(), (name or b"").decode(), score)
            for (raw_id, score), name in zip(queued, names, strict=True)
        ]
        turns = {key.decode(): int(value) for key, value in raw_turns.items()}
        return waiting, turns, {raw.decode() for raw in unconfirmed}

    def output_owner(self, output_name: str) -> str | None:
        """The key whose job named this output file; None when no job did. Never expires with the job."""
        owner = cast(bytes | None, self.client.hget(OUTPUT_OWNERS, output_name))
        return None if owner is None else owner.decode()

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

    def confirmed_waiting(self) -> list[str]:
        """The PENDING jobs whose message was published (or should have been)."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.zrange(WAITING, 0, -1)
            pipe.zrange(UNCONFIRMED, 0, -1)
            waiting, unconfirmed = cast(list[list[bytes]], pipe.execute())
        skip = set(unconfirmed)
        return [raw.decode() for raw in waiting if raw not in skip]

    def broker_messages(
        self, queue: str, unacked_key: str, unacked_index_key: str, delivered_after: float
    ) -> list[bytes]:
        """The raw Celery messages of ``queue`` (not delivered yet) and those of the unacknowledged table
        (delivered to a worker, not acknowledged yet) delivered after ``delivered_after``: kombu's Redis
        transport keeps them there. An older unacknowledged message is running a long job, or belongs to a
        worker that died: it only comes back after the visibility timeout."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.lrange(queue, 0, -1)
            pipe.zrangebyscore(unacked_index_key, delivered_after, "+inf")
            queued, recent_tags = cast(list[list[bytes]], pipe.execute())
        unacked = cast(list[bytes | None], self.client.hmget(unacked_key, recent_tags)) if recent_tags else []
        return queued + [raw for raw in unacked if raw is not None]

    # -- worker side -----------------------------------------------------------------------------
    def _snapshot(self, job_id: str) -> _Snapshot | None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hmget(job_key(job_id), ["state", "owner", "attempts", "started_at"])
            pipe.get(lock_key(job_id))
            fields, lock = cast(tuple[list[bytes | None], bytes | None], pipe.execute())
        state, owner, attempts, started_at = (value.decode() if value is not None else None for value in fields)
        if state is None:
            return None
        return _Snapshot(
            state=JobState(state),
            owner=owner or "",
            attempts=int(attempts or 0),
            started_at=_float(started_at),
            lock=lock.decode() if lock is not None else "",
        )

    def _settle(self, job_id: str, seen: _Snapshot, verdict: Verdict, lock_guard: str) -> bool:
        """Apply ``verdict`` to a running job still as ``seen``; False on a conflict."""
        answer = self._run(
            "settle",
            [job_key(job_id), lock_key(job_id), RUNNING, WAITING, SEQUENCE],
            [
                job_id,
                seen.owner,
                seen.attempts,
                lock_guard,
                verdict.state.value,
                verdict.error,
                repr(self.clock()),
                self._ttl_ms,
                "1" if verdict.counted else "0",
            ],
        )
        if reply_text(answer) != ScriptReply.APPLIED:
            return False
        if verdict.counted:  # a clean stop is no event of the job's: nothing to log or count
            self._count(job_id, verdict)
        return True

    def claim(
        self,
        job_id: str,
        token: str,
        *,
        max_attempts: int,
        lock_ttl_s: float,
        timeout_s: float,
        steal_from: str = "",
        ticket: str = "",
        expect: Literal["any", "waiting", "running"] = "any",
    ) -> Claim:
        """Start an attempt of ``job_id`` here (``ticket``: the broker message that asked, recorded on the job).
        A running job is taken over only when its lock expired or is held by ``steal_from`` (a holder known
        dead); the policy may fail it instead (timeout, attempts used up). ``expect`` limits the claim to a
        waiting job (the fair queue's pick: else RUNNING/FINISHED) or to a running one (a takeover: else
        WAITING)."""
        policy = AttemptPolicy(max_attempts=max_attempts, timeout_s=timeout_s)
        for _ in range(CONFLICT_RETRIES):
            seen = self._snapshot(job_id)
            if seen is None:
                return Claim(ClaimOutcome.MISSING)
            if seen.state.is_terminal():
                return Claim(ClaimOutcome.FINISHED)
            if expect == "waiting" and seen.running:
                return Claim(ClaimOutcome.RUNNING, holder=seen.lock or None)
            if expect == "running" and not seen.running:
                return Claim(ClaimOutcome.WAITING)
            if seen.running:
                if seen.lock and seen.lock != steal_from:
                    return Claim(ClaimOutcome.BUSY, holder=seen.lock)
                verdict = policy.after_owner_lost(attempts=seen.attempts, started_at=seen.started_at, now=self.clock())
                if not verdict.requeue:
                    if self._settle(job_id, seen, verdict, lock_guard=seen.lock):
                        outcome = ClaimOutcome.TIMEOUT if verdict == policy.after_timeout() else ClaimOutcome.FAILED
                        return Claim(outcome)
                    continue
            answer = cast(
                list[Any],
                self._run(
                    "claim",
                    [job_key(job_id), lock_key(job_id), RUNNING, WAITING, UNCONFIRMED, KEY_TURNS, TURN],
                    [
                        job_id,
                        token,
                        repr(self.clock()),
                        max(1, int(lock_ttl_s * 1000)),
                        seen.state.value,
                        seen.owner,
                        seen.attempts,
                        seen.lock,
                        ticket,
                    ],
                ),
            )
            if reply_text(answer[0]) == ClaimOutcome.CLAIMED:
                return Claim(ClaimOutcome.CLAIMED, attempts=int(answer[1]), job_id=job_id)
        # Others keep changing it: someone else is handling this job. The reconciler republishes it if not.
        return Claim(ClaimOutcome.BUSY)

    def claim_next(
        self,
        token: str,
        *,
        ticket: str,
        max_attempts: int,
        lock_ttl_s: float,
        timeout_s: float,
        named: str = "",
    ) -> Claim:
        """Start the fair queue's next confirmed waiting job here (``jobs.fairness``), for the broker message
        ``ticket`` that names job ``named``; NONE when no job waits, UNCONFIRMED when only submissions
        not confirmed yet do. A job taken by another worker meanwhile: read again."""
        for _ in range(CONFLICT_RETRIES):
            waiting, turns, unconfirmed = self._fair_view()
            # An unconfirmed job's submission may still fail (its API answers 503): never start one. The job
            # the message names is the exception: its message is out, so it is confirmed in all but name.
            chosen = fairness.next_job(waiting, turns, skip=unconfirmed - {named})
            if chosen is None:
                return Claim(ClaimOutcome.UNCONFIRMED if waiting else ClaimOutcome.NONE)
            claim = self.claim(
                chosen.job_id,
                token,
                max_attempts=max_attempts,
                lock_ttl_s=lock_ttl_s,
                timeout_s=timeout_s,
                ticket=ticket,
                expect="waiting",
            )
            if claim.outcome is ClaimOutcome.CLAIMED:
                return claim
        return Claim(ClaimOutcome.BUSY)

    def publish_preview(self, job_id: str, step: int, jpeg: bytes) -> None:
        """Hand a preview image to the API processes' listeners (nothing is stored; nobody listening: lost)."""
        self.client.publish(PREVIEWS_CHANNEL, f"{job_id} {step} ".encode() + jpeg)

    def report_progress(
        self, job_id: str, token: str, step: str, percent: int, denoising: dict[str, Any] | None = None
    ) -> ProgressOutcome:
        """RECORDED, CANCELLED (the job was revoked: stop now) or LOST (no longer this worker's).
        ``denoising`` is only read while ``progress_step`` is set: the scripts that clear that leave it."""
        args = [token, step, percent, JobState.REVOKED.value, json.dumps(denoising) if denoising else ""]
        return ProgressOutcome(reply_text(self._run("progress", [job_key(job_id)], args)))

    def renew_lock(self, job_id: str, token: str, lock_ttl_s: float) -> bool:
        return bool(self._run("renew", [lock_key(job_id)], [token, int(lock_ttl_s * 1000)]))

    def complete(
        self, job_id: str, token: str, result: dict[str, Any], png: bytes, more_pngs: dict[str, bytes] | None = None
    ) -> bool:
        """SUCCESS, with the image ``result["filename"]`` (``png``) and a num_images job's others by name."""
        name = result["filename"]
        stored = bool(
            self._run(
                "complete",
                [job_key(job_id), lock_key(job_id), RUNNING, WAITING, OUTPUTS_STREAM, *PNG_INDEX],
                [
                    job_id,
                    token,
                    json.dumps(result),
                    repr(self.clock()),
                    self._ttl_ms,
                    OUTPUTS_STREAM_MAXLEN,
                    self.pngs.limits.max_bytes,
                    PNG_PREFIX,
                    COPIES_PREFIX,
                    name,
                    png,
                    *(item for other, data in (more_pngs or {}).items() for item in (other, data)),
                ],
            )
        )
        if stored:
            self._count(job_id)
        return stored

    def end_attempt(self, job_id: str, token: str, verdict: Verdict) -> AttemptOutcome:
        """Apply the verdict on this worker's own attempt: RETRY, FAILED, or LOST (no longer ours)."""
        seen = self._snapshot(job_id)
        if seen is None or not seen.running or seen.owner != token:
            return AttemptOutcome.LOST
        if not self._settle(job_id, seen, verdict, lock_guard="*"):
            return AttemptOutcome.LOST
        return AttemptOutcome.RETRY if verdict.requeue else AttemptOutcome.FAILED

    def give_back(self, job_id: str, token: str) -> AttemptOutcome:
        """This worker stops (SIGTERM): the job goes back to its place in the queue, the attempt uncounted.
        RETRY, or LOST (no longer ours)."""
        return self.end_attempt(job_id, token, AttemptPolicy.after_clean_stop())

    def fail(self, job_id: str, token: str, error: str) -> AttemptOutcome:
        """FAILURE now (an error no retry can fix, or a timeout): FAILED or LOST."""
        return self.end_attempt(job_id, token, Verdict(JobState.FAILURE, error))

    def retry_or_fail(self, job_id: str, token: str, error: str, max_attempts: int) -> AttemptOutcome:
        """A retryable error: RETRY (back in the queue), FAILED (attempts used up) or LOST."""
        seen = self._snapshot(job_id)
        if seen is None or seen.owner != token:
            return AttemptOutcome.LOST
        # The job's own timeout plays no part in a failed attempt's verdict.
        policy = AttemptPolicy(max_attempts=max_attempts, timeout_s=float("inf"))
        verdict = policy.after_failure(attempts=seen.attempts, error=error, retryable=True)
        return self.end_attempt(job_id, token, verdict)

    def reap_orphans(self, *, max_attempts: int, timeout_s: float) -> list[str]:
        """Running jobs whose worker stopped renewing its lock: requeued (returned, to be published again)
        or failed (timeout, attempts used up)."""
        policy = AttemptPolicy(max_attempts=max_attempts, timeout_s=timeout_s)
        requeued = []
        for raw_id in cast(set[bytes], self.client.smembers(RUNNING)):
            job_id = raw_id.decode()
            for _ in range(CONFLICT_RETRIES):
                seen = self._snapshot(job_id)
                if seen is None or not seen.running:
                    self.client.srem(RUNNING, job_id)  # a leftover (expired record, already settled)
                    break
                if seen.lock:
                    break  # its worker is alive
                verdict = policy.after_owner_lost(attempts=seen.attempts, started_at=seen.started_at, now=self.clock())
                if self._settle(job_id, seen, verdict, lock_guard=""):
                    if verdict.requeue:
                        requeued.append(job_id)
                    break
        return requeued

    def close(self) -> None:
        self.client.close()


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


RECORD_FIELDS = (
    "state", "task", "output_name", "attempts", "progress_step", "progress", "denoising", "result", "error",
    "created_at", "started_at", "finished_at", "key_name", "unconfirmed",
)  # fmt: skip
INPUT_FIELD_PREFIX = "input:"


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
        started_at=_float(fields.get("started_at")),
        finished_at=_float(fields.get("finished_at")),
        key_name=fields.get("key_name", ""),
    )
