"""What the distributed store's writes answer, as Enums whose values are the Lua scripts' own replies.

Each is a ``StrEnum``: a script's reply maps to its member directly (``ProgressOutcome("cancelled")``), and
a log line prints the plain word.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ScriptReply(enum.StrEnum):
    """A guarded script's answer (``lua/settle.lua``, ``lua/cancel.lua``)."""

    APPLIED = "applied"
    CONFLICT = "conflict"  # the record is no longer as read: read it again


class ClaimOutcome(enum.StrEnum):
    """Whether a claim started an attempt here, and if not, why."""

    CLAIMED = "claimed"  # the attempt is this worker's (``lua/claim.lua``'s reply; its other one is CONFLICT)
    BUSY = "busy"  # a live worker runs it (or others kept changing it)
    FINISHED = "finished"  # it is over
    MISSING = "missing"  # no such record (expired, never confirmed)
    TIMEOUT = "timeout"  # its dead worker's attempt ran past the job's time limit: this claim failed it
    FAILED = "failed"  # its dead worker's attempt was its last: this claim failed it
    WAITING = "waiting"  # a takeover found it waiting (the fair queue starts it, not a takeover)
    RUNNING = "running"  # the fair queue's pick started elsewhere meanwhile
    NONE = "none"  # no job waits
    UNCONFIRMED = "unconfirmed"  # only submissions not confirmed yet wait
    DEFERRED = "deferred"  # jobs wait, left to an idle worker that holds their model (``jobs.affinity``)


class ProgressOutcome(enum.StrEnum):
    """A progress write's answer (``lua/progress.lua``)."""

    RECORDED = "recorded"
    CANCELLED = "cancelled"  # the job was revoked: stop now
    LOST = "lost"  # the job is no longer this worker's


class AttemptOutcome(enum.StrEnum):
    """What became of a job whose attempt this worker ended without an image."""

    RETRY = "retry"  # back in the queue
    FAILED = "failed"  # FAILURE
    LOST = "lost"  # no longer this worker's: nothing written


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    attempts: int = 0
    holder: str | None = None  # the lock's owner token, when a running job was found
    job_id: str = ""
