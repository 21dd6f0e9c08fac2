"""A worker's attempt at a job: claim it, report progress, keep its lock, and end it (SUCCESS with its PNGs,
back to the queue, or FAILURE); and the reaper that ends the attempts of dead workers.

Each write reads the record first (a snapshot), asks ``lifecycle.AttemptPolicy`` for the verdict, and a
script applies it only if the record and its lock are still as read (``scripts.py``). The keys are described
in ``keys.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

import redis

from imagen.jobs.affinity import LOOKAHEAD, Affinity, pick
from imagen.jobs.distributed.keys import (
    COPIES_PREFIX,
    KEY_TURNS,
    OUTPUTS_STREAM,
    OUTPUTS_STREAM_MAXLEN,
    PNG_INDEX,
    PNG_PREFIX,
    PREVIEWS_CHANNEL,
    QUEUE_INDEX,
    QUEUE_KEYS,
    QUEUE_PREFIX,
    QUEUE_SIZES,
    RUNNING,
    SEQUENCE,
    TURN,
    UNCONFIRMED,
    WAITING,
    job_key,
    lock_key,
)
from imagen.jobs.distributed.outcomes import AttemptOutcome, Claim, ClaimOutcome, ProgressOutcome, ScriptReply
from imagen.jobs.distributed.pngs import PngLimits
from imagen.jobs.distributed.records import RECORD_FIELDS, JobRecords, optional_float, record_of
from imagen.jobs.distributed.scripts import CONFLICT_RETRIES, Scripts, reply_text
from imagen.jobs.lifecycle import AttemptPolicy, Verdict
from imagen.jobs.types import JobState

RUNNING_STATES = (JobState.STARTED, JobState.PROGRESS)


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


class Attempts:
    def __init__(
        self,
        client: redis.Redis,
        scripts: Scripts,
        records: JobRecords,
        png_limits: PngLimits,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.scripts = scripts
        self.records = records
        self.png_limits = png_limits
        self.clock = clock

    # -- reading and settling under a guard ------------------------------------------------------
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
            started_at=optional_float(started_at),
            lock=lock.decode() if lock is not None else "",
        )

    def _settle(self, job_id: str, seen: _Snapshot, verdict: Verdict, lock_guard: str) -> bool:
        """Apply ``verdict`` to a running job still as ``seen``; False on a conflict."""
        answer = self.scripts.run(
            "settle",
            [job_key(job_id), lock_key(job_id), RUNNING, WAITING, SEQUENCE, *QUEUE_INDEX],
            [
                job_id,
                seen.owner,
                seen.attempts,
                lock_guard,
                verdict.state.value,
                verdict.error,
                repr(self.clock()),
                self.records.ttl_ms,
                "1" if verdict.counted else "0",
                QUEUE_PREFIX,
            ],
        )
        if reply_text(answer) != ScriptReply.APPLIED:
            return False
        if verdict.counted:  # a clean stop is no event of the job's: nothing to log or count
            self.records.count_event(job_id, verdict)
        return True

    # -- starting an attempt ---------------------------------------------------------------------
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
                self.scripts.run(
                    "claim",
                    [
                        job_key(job_id),
                        lock_key(job_id),
                        RUNNING,
                        WAITING,
                        UNCONFIRMED,
                        KEY_TURNS,
                        TURN,
                        QUEUE_KEYS,
                        QUEUE_SIZES,
                    ],
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
                        QUEUE_PREFIX,
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
        affinity: Affinity | None = None,
    ) -> Claim:
        """Start the next confirmed waiting job here, for the broker message ``ticket`` that names job ``named``:
        the fair queue's next key (``jobs.fairness``), and within it the job ``jobs.affinity`` picks for the
        models this worker holds (``affinity``; None: the key's oldest). NONE when no job waits, UNCONFIRMED
        when only submissions not confirmed yet do, DEFERRED when the waiting ones are left to an idle worker
        that holds their model. A job taken by another worker meanwhile: read again."""
        for _ in range(CONFLICT_RETRIES):
            chosen = self._next_to_start(named, affinity)
            if chosen is None:
                return Claim(ClaimOutcome.UNCONFIRMED if self.records.count_waiting() else ClaimOutcome.NONE)
            if chosen is ClaimOutcome.DEFERRED:
                return Claim(ClaimOutcome.DEFERRED)
            claim = self.claim(
                chosen,
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

    def _next_to_start(self, named: str, affinity: Affinity | None) -> str | Literal[ClaimOutcome.DEFERRED] | None:
        """The job to start: the first key's pick (its index: ``JobRecords.next_waiting``, then
        ``jobs.affinity``), or ``named`` when it is not confirmed yet and would rank first. An unconfirmed
        job's submission may still fail (its API answers 503): never start one, except the job the message
        names: its message is out, so it is confirmed in all but name. None when neither may start."""
        first = self.records.next_waiting()
        rank = self.records.candidate_rank(named) if named else None
        if rank is not None:
            # Ranks are distinct between keys; equal only when ``named`` is its own key's oldest job.
            first_rank = None if first is None else self.records.key_rank(first[1])
            if first_rank is None or rank <= first_rank:
                # Its message came before its confirmation: the same rule, on it alone (an idle holder of its
                # model gets it; a message this fast is the usual case on an idle cluster).
                alone = self.records.candidate(named)
                if alone is not None and pick([alone], affinity, self.clock()) is None:
                    return ClaimOutcome.DEFERRED
                return named
        if first is None or affinity is None:
            return None if first is None else first[0]
        candidates = self.records.oldest_of_key(first[1], LOOKAHEAD)
        if not candidates:
            return first[0]  # its jobs were all taken meanwhile: the claim finds out and reads again
        picked = pick(candidates, affinity, self.clock())
        return ClaimOutcome.DEFERRED if picked is None else picked.job_id

    # -- while it runs ---------------------------------------------------------------------------
    def publish_preview(self, job_id: str, step: int, jpeg: bytes) -> None:
        """Hand a preview image to the API processes' listeners (nothing is stored; nobody listening: lost)."""
        self.client.publish(PREVIEWS_CHANNEL, f"{job_id} {step} ".encode() + jpeg)

    def report_progress(
        self, job_id: str, token: str, step: str, percent: int, denoising: dict[str, Any] | None = None
    ) -> ProgressOutcome:
        """RECORDED, CANCELLED (the job was revoked: stop now) or LOST (no longer this worker's).
        ``denoising`` is only read while ``progress_step`` is set: the scripts that clear that leave it."""
        args = [token, step, percent, JobState.REVOKED.value, json.dumps(denoising) if denoising else ""]
        return ProgressOutcome(reply_text(self.scripts.run("progress", [job_key(job_id)], args)))

    def renew_lock(self, job_id: str, token: str, lock_ttl_s: float) -> bool:
        return bool(self.scripts.run("renew", [lock_key(job_id)], [token, int(lock_ttl_s * 1000)]))

    # -- ending it -------------------------------------------------------------------------------
    def complete(
        self, job_id: str, token: str, result: dict[str, Any], png: bytes, more_pngs: dict[str, bytes] | None = None
    ) -> bool:
        """SUCCESS, with the image ``result["filename"]`` (``png``) and a num_images job's others by name."""
        name = result["filename"]
        answer = cast(
            list[Any],
            self.scripts.run(
                "complete",
                [job_key(job_id), lock_key(job_id), RUNNING, WAITING, OUTPUTS_STREAM, *PNG_INDEX],
                [
                    job_id,
                    token,
                    json.dumps(result),
                    repr(self.clock()),
                    self.records.ttl_ms,
                    OUTPUTS_STREAM_MAXLEN,
                    self.png_limits.max_bytes,
                    PNG_PREFIX,
                    COPIES_PREFIX,
                    len(RECORD_FIELDS),
                    *RECORD_FIELDS,
                    name,
                    png,
                    *(item for other, data in (more_pngs or {}).items() for item in (other, data)),
                ],
            ),
        )
        if int(answer[0]) != 1:
            return False
        self.records.count_event(job_id, record=record_of(job_id, answer[1]))
        return True

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

    # -- the reaper: the attempts of dead workers ------------------------------------------------
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
