"""The rules of a job's life, written once. Both stores apply them; neither restates them.

- **The attempt policy**: what a failed attempt, a dead worker, a job past its timeout or a clean stop
  leads to (back to the queue, or FAILURE with which text). Stores read a running job's record, ask
  :class:`AttemptPolicy` for a :class:`Verdict`, and apply it atomically under a guard (the owner is
  still the one they read). The SQLite store does so inside one transaction, the Redis store in a Lua
  script that receives the verdict as data: no copy of the rule in SQL or Lua.
- **The failure texts** users read in ``/status``.
- **The cancel rule** (``POST /cancel``): what a cancel does to a job in each state (:func:`cancel_verdict`).
  Stores apply it like a verdict: SQLite in one transaction, Redis in ``lua/cancel.lua`` under a state guard.
- **Owner tokens**: who runs an attempt (host, process, a nonce, an optional slot), and whether that
  owner is known to be dead (a process of this host that no longer exists).
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass

from imagen.jobs.types import JobState

HOSTNAME = socket.gethostname()

# -- failure texts ---------------------------------------------------------------------------------
WORKER_DIED = "worker died while running the job (killed or out of memory)"
STOPPED_CLEANLY = "worker stopped cleanly; back in the queue"


def timeout_text(timeout_s: float) -> str:
    return f"Timeout: generation took longer than {timeout_s:g} s"


def attempts_used_up_text(error: str, attempts: int) -> str:
    return f"{error} (after {attempts} attempts)"


def supervision_failed_text(reason: str) -> str:
    """The job's supervisor (the embedded backend's slot thread) hit an unexpected error while the job ran."""
    return f"internal error while supervising the job: {reason}"


# -- the attempt policy ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """What happens to a running job after its attempt ended without an image."""

    state: JobState  # PENDING (back in the queue) or FAILURE
    error: str
    # False: the attempt does not count (its count goes back down): the worker stopped on purpose (SIGTERM,
    # to it alone or to its whole process group), which says nothing about whether the job can pass.
    counted: bool = True

    @property
    def requeue(self) -> bool:
        return self.state is JobState.PENDING


@dataclass(frozen=True)
class AttemptPolicy:
    max_attempts: int
    timeout_s: float

    def after_failure(self, *, attempts: int, error: str, retryable: bool) -> Verdict:
        """An attempt (the ``attempts``-th) ended with ``error``."""
        if not retryable:
            return Verdict(JobState.FAILURE, error)
        if attempts < self.max_attempts:
            return Verdict(JobState.PENDING, error)
        return Verdict(JobState.FAILURE, attempts_used_up_text(error, attempts))

    def after_timeout(self) -> Verdict:
        """The attempt ran past ``timeout_s``: no retry (the next one would time out too)."""
        return Verdict(JobState.FAILURE, timeout_text(self.timeout_s))

    @staticmethod
    def after_clean_stop() -> Verdict:
        """The worker was asked to stop (SIGTERM) and gave the job back: to the queue, the attempt uncounted."""
        return Verdict(JobState.PENDING, STOPPED_CLEANLY, counted=False)

    def after_owner_lost(self, *, attempts: int, started_at: float | None, now: float) -> Verdict:
        """The worker running the job died (or went silent past its lease)."""
        if started_at is not None and now - started_at >= self.timeout_s:
            return self.after_timeout()
        return self.after_failure(attempts=attempts, error=WORKER_DIED, retryable=True)


# -- the cancel rule -------------------------------------------------------------------------------
CANCELLED_BY_CLIENT = "Annulé à la demande du client"


@dataclass(frozen=True)
class CancelVerdict:
    """What ``POST /cancel`` does to a job in a given state."""

    state: JobState  # the job's state after the cancel: REVOKED, or the terminal state that came first
    write: bool  # the store writes REVOKED now (the job was waiting or running)

    @property
    def revoked(self) -> bool:
        return self.state is JobState.REVOKED


def cancel_verdict(state: JobState) -> CancelVerdict:
    """A waiting job is revoked and never starts; a running one is revoked at once and its worker, told by
    the store, stops at its next denoising step and writes no image. A second cancel changes nothing and
    answers the same; a job already SUCCESS or FAILURE keeps its state (too late)."""
    if state.is_terminal():
        return CancelVerdict(state, write=False)
    return CancelVerdict(JobState.REVOKED, write=True)


# -- owners ----------------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Is a process of this host still there?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclass(frozen=True)
class OwnerToken:
    """``host|pid|nonce[|slot]``: written on a running job by the worker that claimed it. The nonce is new
    for every process life (or every attempt), so a restarted process never mistakes an old job for its own."""

    host: str
    pid: int
    nonce: str
    slot: str = ""

    @classmethod
    def new(cls, slot: str = "", pid: int | None = None) -> OwnerToken:
        return cls(HOSTNAME, os.getpid() if pid is None else pid, secrets.token_hex(6), slot)

    @classmethod
    def parse(cls, text: str) -> OwnerToken | None:
        parts = text.split("|")
        if len(parts) not in (3, 4) or not parts[1].isdigit():
            return None
        return cls(parts[0], int(parts[1]), parts[2], parts[3] if len(parts) == 4 else "")

    def __str__(self) -> str:
        return "|".join([self.host, str(self.pid), self.nonce] + ([self.slot] if self.slot else []))

    def with_slot(self, slot: str) -> OwnerToken:
        return OwnerToken(self.host, self.pid, self.nonce, slot)

    def same_life(self, other: OwnerToken) -> bool:
        """Both tokens come from the same process life (same host, pid and nonce)."""
        return (self.host, self.pid, self.nonce) == (other.host, other.pid, other.nonce)

    def process_is_gone(self) -> bool:
        """Known dead: a process of this host that no longer exists. Owners on other hosts are judged by
        their heartbeat or lease instead, never by this."""
        return self.host == HOSTNAME and self.pid != os.getpid() and not pid_alive(self.pid)


def owner_is_dead(text: str, *, me: OwnerToken, heartbeat_at: float | None, now: float, silent_after_s: float) -> bool:
    """The rule for taking back a running job: its owner is not this process life, and either its process
    is gone, it is an earlier life of this very process, or it has been silent for ``silent_after_s``."""
    owner = OwnerToken.parse(text)
    if owner is not None:
        if owner.same_life(me):
            return False
        if owner.process_is_gone() or (owner.host == me.host and owner.pid == me.pid):
            return True
    return heartbeat_at is None or now - heartbeat_at > silent_after_s
