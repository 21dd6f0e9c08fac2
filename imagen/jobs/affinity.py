"""Model affinity, written once: which waiting job a worker takes, given the models it already holds.

Loading a checkpoint costs seconds (a read from disk, a copy to the GPU); a job for a model the worker
holds starts at once. So a claim does not simply take the fair queue's next job (``jobs.fairness``):

1. The key whose turn it is stays the key whose turn it is: fairness *between* keys is the fair queue's,
   untouched (a key's single job still starts after at most one job of another key's batch).
2. Within that key, the worker takes the oldest of its first ``LOOKAHEAD`` waiting jobs whose model it
   holds (in any tier: a model in host RAM is a copy away, not a read from disk), provided that job was
   submitted less than ``IMAGEN_AFFINITY_WAIT_S`` after the key's oldest job. A job is overtaken only by
   jobs sent about when it was (a burst), never by the steady stream that follows it: its extra wait is
   bounded by the work submitted in that window, not by how busy the service stays.
3. When it holds none of them, it takes the key's oldest job and loads its model, unless another worker
   that is idle holds that model and the job has waited less than ``IMAGEN_AFFINITY_WAIT_S``: then it
   leaves the job to that worker (*defers*). The wait bounds the deferral: past it, any idle worker takes
   the job, so a holder that turned busy, died or never woke costs at most that long.

A larger ``IMAGEN_AFFINITY_WAIT_S`` trades order within a key for fewer model loads; 0 is plain fair order.
The look is bounded (``LOOKAHEAD`` jobs of one key), so a claim's cost does not grow with the queue. Both
stores read the candidates and apply the choice under their guard (the SQLite store in its transaction, the
Redis store through ``lua/claim.lua``, which removes any waiting job of the key, not only its oldest).
``IMAGEN_AFFINITY=false`` gives plain fair order (each key's oldest job, whoever holds what).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# How many of the serving key's oldest waiting jobs a claim looks through for a model the worker holds.
LOOKAHEAD = 64


@dataclass(frozen=True)
class Candidate:
    """A waiting job of the key whose turn it is, as a claim sees it."""

    job_id: str
    model: str
    waiting_since: float  # wall clock (time.time): when it was submitted


@dataclass(frozen=True)
class Affinity:
    """What a claiming worker knows: the models it holds, and those held by *other* workers that are idle now
    (an embedded backend's slots, a distributed worker's heartbeats)."""

    held: frozenset[str]
    idle_holders: frozenset[str]
    wait_s: float  # IMAGEN_AFFINITY_WAIT_S


def pick(candidates: Sequence[Candidate], affinity: Affinity | None, now: float) -> Candidate | None:
    """The job to start among ``candidates`` (the serving key's oldest waiting jobs, oldest first), or None
    when the worker should leave them to an idle holder of the first one's model (or none waits)."""
    if not candidates:
        return None
    if affinity is None:
        return candidates[0]
    oldest = candidates[0]
    for candidate in candidates:
        if candidate.model in affinity.held and candidate.waiting_since - oldest.waiting_since < affinity.wait_s:
            return candidate
    if oldest.model in affinity.idle_holders and now - oldest.waiting_since < affinity.wait_s:
        return None
    return oldest

