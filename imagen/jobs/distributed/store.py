"""The job records of the distributed backend, in Redis (the broker's own server).

Every state change is one Lua script, so it is atomic across API replicas and workers:

- ``imagen:job:{id}``  hash: state, task, output_name, attempts, seq, owner, progress, result, error, times.
  A finished record gets a Redis expiry of ``result_ttl_s``.
- ``imagen:waiting``   sorted set of the PENDING job ids, scored by submission order: its size is the
  cluster-wide queue length checked by ``submit`` (check-and-add in one script), a rank is a position.
- ``imagen:running``   set of the STARTED/PROGRESS job ids, scanned by the orphan reaper.
- ``imagen:lock:{id}`` the running attempt's owner token, with a short expiry its worker keeps renewing.
  A running job whose lock expired has a dead worker: it goes back to the queue (or fails). A second
  delivery of a message whose job is locked is dropped, so a job never runs twice at once.
- ``imagen:png:{name}`` the PNG bytes of a finished job and ``imagen:outputs`` a stream of finished
  names: each API replica copies the images into its own outputs folder (no shared disk needed).
- ``imagen:worker:{host}:{pid}`` a worker's heartbeat (device info), with a short expiry.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from imagen.errors import QueueFullError
from imagen.jobs.types import JobRecord, JobState, NewJob, Submitted

PREFIX = "imagen:"
WAITING = PREFIX + "waiting"
RUNNING = PREFIX + "running"
SEQUENCE = PREFIX + "seq"
OUTPUTS_STREAM = PREFIX + "outputs"
OUTPUTS_STREAM_MAXLEN = 10_000
WORKER_PATTERN = PREFIX + "worker:*"
MIN_PNG_TTL_S = 300.0  # the API replicas' copy may lag a little behind a very short result TTL
DIED = "worker died while running the job"


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def lock_key(job_id: str) -> str:
    return f"{PREFIX}lock:{job_id}"


def png_key(output_name: str) -> str:
    return f"{PREFIX}png:{output_name}"


def worker_key(host: str, pid: int) -> str:
    return f"{PREFIX}worker:{host}:{pid}"


def connect(
    url: str, *, connect_timeout: float = 1.0, socket_timeout: float | None = 5.0, retries: int = 1
) -> redis.Redis:
    """A client that fails fast when Redis is down: short timeouts, ``retries`` immediate retries."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=connect_timeout,
        socket_timeout=socket_timeout,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30,
    )


# Shared by CLAIM and REAP: a running job whose worker is gone fails for good when it ran past the timeout
# or used all its attempts; the caller requeues (or claims) it otherwise.
_FINISH_FAILED = """
local function finish_failed(job, lock, running, waiting, id, err, now, ttl_ms)
  redis.call('HSET', job, 'state', 'FAILURE', 'error', err, 'finished_at', now)
  redis.call('HDEL', job, 'owner', 'progress_step', 'progress')
  redis.call('PEXPIRE', job, ttl_ms)
  redis.call('SREM', running, id)
  redis.call('ZREM', waiting, id)
  redis.call('DEL', lock)
end
local function fail_orphan(job, lock, running, waiting, id, now, max_attempts, timeout_s, timeout_msg,
                           died_msg, ttl_ms)
  local started = tonumber(redis.call('HGET', job, 'started_at') or '0')
  local attempts = tonumber(redis.call('HGET', job, 'attempts') or '0')
  if now - started >= timeout_s then
    finish_failed(job, lock, running, waiting, id, timeout_msg, now, ttl_ms)
    return 'timeout'
  end
  if attempts >= max_attempts then
    local err = died_msg .. ' (after ' .. attempts .. ' attempts)'
    finish_failed(job, lock, running, waiting, id, err, now, ttl_ms)
    return 'failed'
  end
  return nil
end
local function is_running(state)
  return state == 'STARTED' or state == 'PROGRESS'
end
"""

# KEYS: waiting, seq, job   ARGV: id, task, output_name, now, max_queue
_SUBMIT = """
local waiting = redis.call('ZCARD', KEYS[1])
if waiting >= tonumber(ARGV[5]) then return {0, waiting} end
local seq = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[3], 'state', 'PENDING', 'task', ARGV[2], 'output_name', ARGV[3], 'attempts', 0,
           'seq', seq, 'created_at', ARGV[4])
redis.call('ZADD', KEYS[1], seq, ARGV[1])
return {1, redis.call('ZRANK', KEYS[1], ARGV[1]) + 1}
"""

# KEYS: job, lock, running, waiting
# ARGV: id, token, now, max_attempts, lock_ttl_ms, timeout_s, timeout_msg, died_msg, ttl_ms, steal
_CLAIM = (
    _FINISH_FAILED
    + """
local id, token, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'SUCCESS' or state == 'FAILURE' then return {'finished'} end
if is_running(state) then
  local holder = redis.call('GET', KEYS[2])
  if holder and holder ~= ARGV[10] then return {'busy', holder} end
  local verdict = fail_orphan(KEYS[1], KEYS[2], KEYS[3], KEYS[4], id, now, tonumber(ARGV[4]),
                              tonumber(ARGV[6]), ARGV[7], ARGV[8], ARGV[9])
  if verdict then return {verdict} end
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', 'STARTED', 'owner', token, 'started_at', now)
redis.call('HDEL', KEYS[1], 'progress_step', 'progress')
redis.call('ZREM', KEYS[4], id)
redis.call('SADD', KEYS[3], id)
redis.call('SET', KEYS[2], token, 'PX', ARGV[5])
return {'claimed', attempts}
"""
)

# KEYS: job   ARGV: token, step, percent
_PROGRESS = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'PROGRESS', 'progress_step', ARGV[2], 'progress', ARGV[3])
return 1
"""

# KEYS: lock   ARGV: token, ttl_ms
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: job, lock, running, waiting, png, stream
# ARGV: id, token, result, png, now, ttl_ms, png_ttl_ms, output_name, stream_maxlen
_COMPLETE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'SUCCESS', 'result', ARGV[3], 'finished_at', ARGV[5])
redis.call('HDEL', KEYS[1], 'owner', 'progress_step', 'progress', 'error')
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('SET', KEYS[5], ARGV[4], 'PX', ARGV[7])
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[9], '*', 'job_id', ARGV[1], 'output_name', ARGV[8])
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return 1
"""

# KEYS: job, lock, running, waiting, seq   ARGV: id, token, error, now, ttl_ms, max_attempts (0: fail now)
_FAIL_OR_RETRY = (
    _FINISH_FAILED
    + """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return 'lost' end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
local max_attempts = tonumber(ARGV[6])
if max_attempts == 0 then
  finish_failed(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[3], ARGV[4], ARGV[5])
  return 'failed'
end
if attempts >= max_attempts then
  finish_failed(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1],
                ARGV[3] .. ' (after ' .. attempts .. ' attempts)', ARGV[4], ARGV[5])
  return 'failed'
end
redis.call('HSET', KEYS[1], 'state', 'PENDING', 'error', ARGV[3])
redis.call('HDEL', KEYS[1], 'owner', 'progress_step', 'progress')
redis.call('ZADD', KEYS[4], redis.call('INCR', KEYS[5]), ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[2])
return 'retry'
"""
)

# KEYS: job, lock, running, waiting, seq
# ARGV: id, now, max_attempts, timeout_s, timeout_msg, died_msg, ttl_ms
_REAP = (
    _FINISH_FAILED
    + """
local id = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[3], id) return 'gone' end
if not is_running(redis.call('HGET', KEYS[1], 'state')) then redis.call('SREM', KEYS[3], id) return 'idle' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'alive' end
local verdict = fail_orphan(KEYS[1], KEYS[2], KEYS[3], KEYS[4], id, tonumber(ARGV[2]), tonumber(ARGV[3]),
                            tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7])
if verdict then return verdict end
redis.call('HSET', KEYS[1], 'state', 'PENDING', 'error', ARGV[6])
redis.call('HDEL', KEYS[1], 'owner', 'progress_step', 'progress')
redis.call('ZADD', KEYS[4], redis.call('INCR', KEYS[5]), id)
redis.call('SREM', KEYS[3], id)
return 'requeued'
"""
)

# KEYS: job, waiting   ARGV: id
_FORGET = """
if redis.call('HGET', KEYS[1], 'state') == 'PENDING' then redis.call('DEL', KEYS[1]) end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class Claim:
    outcome: str  # claimed | busy | finished | missing | timeout | failed
    attempts: int = 0
    holder: str | None = None


def timeout_message(timeout_s: float) -> str:
    return f"Timeout: generation took longer than {timeout_s:g} s"


class RedisJobStore:
    """Job records and queue bookkeeping; every method is one round trip (or a few, for scans)."""

    def __init__(self, client: redis.Redis, *, result_ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.result_ttl_s = result_ttl_s
        self.clock = clock
        self._submit = client.register_script(_SUBMIT)
        self._claim = client.register_script(_CLAIM)
        self._progress = client.register_script(_PROGRESS)
        self._renew = client.register_script(_RENEW)
        self._complete = client.register_script(_COMPLETE)
        self._fail_or_retry = client.register_script(_FAIL_OR_RETRY)
        self._reap = client.register_script(_REAP)
        self._forget = client.register_script(_FORGET)

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.result_ttl_s * 1000))

    # -- API side ------------------------------------------------------------------------------
    def submit(self, job: NewJob, max_queue: int) -> Submitted:
        accepted, value = cast(
            list[int],
            self._submit(
                keys=[WAITING, SEQUENCE, job_key(job.job_id)],
                args=[job.job_id, json.dumps(job.task), job.output_name, repr(self.clock()), max_queue],
            ),
        )
        if not accepted:
            raise QueueFullError(f"{value} jobs waiting (max {max_queue})")
        return Submitted(job_id=job.job_id, position=int(value))

    def forget(self, job_id: str) -> None:
        """Undo a submission whose message could not be published."""
        self._forget(keys=[job_key(job_id), WAITING], args=[job_id])

    def get(self, job_id: str) -> JobRecord | None:
        raw = cast(dict[bytes, bytes], self.client.hgetall(job_key(job_id)))
        if not raw or b"state" not in raw:
            return None
        record = _record(job_id, {key.decode(): value.decode() for key, value in raw.items()})
        if record.finished_at is not None and self.clock() - record.finished_at > self.result_ttl_s:
            return None
        return record

    def count_waiting(self) -> int:
        return int(self.client.zcard(WAITING))

    def position(self, job_id: str) -> int | None:
        rank = cast(int | None, self.client.zrank(WAITING, job_id))
        return None if rank is None else rank + 1

    def get_png(self, output_name: str) -> bytes | None:
        return cast(bytes | None, self.client.get(png_key(output_name)))

    def read_outputs(self, after_id: bytes, block_ms: int) -> list[tuple[bytes, str]]:
        """Finished images after stream entry ``after_id``: (entry id, output name)."""
        answer = cast(list[Any], self.client.xread({OUTPUTS_STREAM: after_id}, count=500, block=block_ms))
        entries: list[tuple[bytes, str]] = []
        for _stream, items in answer or []:
            for entry_id, fields in items:
                name = fields.get(b"output_name", b"").decode()
                entries.append((entry_id, name))
        return entries

    def workers(self) -> list[dict[str, Any]]:
        """The heartbeats of the workers alive now."""
        keys = list(cast(Iterator[bytes], self.client.scan_iter(match=WORKER_PATTERN, count=100)))
        if not keys:
            return []
        values = cast(list[bytes | None], self.client.mget(keys))
        return [json.loads(value) for value in values if value]

    # -- worker side -----------------------------------------------------------------------------
    def claim(
        self,
        job_id: str,
        token: str,
        *,
        max_attempts: int,
        lock_ttl_s: float,
        timeout_s: float,
        steal_from: str = "",
    ) -> Claim:
        answer = cast(
            list[Any],
            self._claim(
                keys=[job_key(job_id), lock_key(job_id), RUNNING, WAITING],
                args=[
                    job_id,
                    token,
                    repr(self.clock()),
                    max_attempts,
                    int(lock_ttl_s * 1000),
                    timeout_s,
                    timeout_message(timeout_s),
                    DIED,
                    self._ttl_ms,
                    steal_from,
                ],
            ),
        )
        outcome = _text(answer[0])
        if outcome == "claimed":
            return Claim(outcome, attempts=int(answer[1]))
        if outcome == "busy":
            return Claim(outcome, holder=_text(answer[1]))
        return Claim(outcome)

    def report_progress(self, job_id: str, token: str, step: str, percent: int) -> bool:
        return bool(self._progress(keys=[job_key(job_id)], args=[token, step, percent]))

    def renew_lock(self, job_id: str, token: str, lock_ttl_s: float) -> bool:
        return bool(self._renew(keys=[lock_key(job_id)], args=[token, int(lock_ttl_s * 1000)]))

    def complete(self, job_id: str, token: str, result: dict[str, Any], png: bytes) -> bool:
        png_ttl_ms = int(max(self.result_ttl_s, MIN_PNG_TTL_S) * 1000)
        return bool(
            self._complete(
                keys=[
                    job_key(job_id),
                    lock_key(job_id),
                    RUNNING,
                    WAITING,
                    png_key(result["filename"]),
                    OUTPUTS_STREAM,
                ],
                args=[
                    job_id,
                    token,
                    json.dumps(result),
                    png,
                    repr(self.clock()),
                    self._ttl_ms,
                    png_ttl_ms,
                    result["filename"],
                    OUTPUTS_STREAM_MAXLEN,
                ],
            )
        )

    def fail(self, job_id: str, token: str, error: str) -> str:
        return self._finish_attempt(job_id, token, error, 0)

    def retry_or_fail(self, job_id: str, token: str, error: str, max_attempts: int) -> str:
        """'retry' (back in the queue), 'failed' (attempts used up) or 'lost' (no longer ours)."""
        return self._finish_attempt(job_id, token, error, max_attempts)

    def _finish_attempt(self, job_id: str, token: str, error: str, max_attempts: int) -> str:
        return _text(
            self._fail_or_retry(
                keys=[job_key(job_id), lock_key(job_id), RUNNING, WAITING, SEQUENCE],
                args=[job_id, token, error, repr(self.clock()), self._ttl_ms, max_attempts],
            )
        )

    def reap_orphans(self, *, max_attempts: int, timeout_s: float) -> list[str]:
        """Running jobs whose worker stopped renewing its lock: requeued (returned, to be published again)
        or failed (timeout, attempts used up)."""
        requeued = []
        for raw_id in cast(set[bytes], self.client.smembers(RUNNING)):
            job_id = raw_id.decode()
            verdict = _text(
                self._reap(
                    keys=[job_key(job_id), lock_key(job_id), RUNNING, WAITING, SEQUENCE],
                    args=[
                        job_id,
                        repr(self.clock()),
                        max_attempts,
                        timeout_s,
                        timeout_message(timeout_s),
                        DIED,
                        self._ttl_ms,
                    ],
                )
            )
            if verdict == "requeued":
                requeued.append(job_id)
        return requeued

    def beat(self, pid: int, info: dict[str, Any], ttl_s: float) -> None:
        host = socket.gethostname()
        payload = json.dumps({**info, "host": host, "pid": pid, "at": self.clock()})
        self.client.set(worker_key(host, pid), payload, px=int(ttl_s * 1000))

    def forget_worker(self, pid: int) -> None:
        self.client.delete(worker_key(socket.gethostname(), pid))

    def close(self) -> None:
        self.client.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


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
        result=json.loads(fields["result"]) if fields.get("result") else None,
        # A PENDING job may carry the error of its previous attempt; only a FAILURE shows it.
        error=fields.get("error") if state is JobState.FAILURE else None,
        created_at=float(fields.get("created_at", 0.0)),
        started_at=_float(fields.get("started_at")),
        finished_at=_float(fields.get("finished_at")),
    )
