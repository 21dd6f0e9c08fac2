"""The fair queue, written once: in which order waiting jobs start when several API keys have jobs waiting.

Workers serve the keys round-robin, oldest job first within a key. Each key remembers the *turn* at which
it was last served (a counter that every claim increments; a key never served has turn 0). The fair order
of the waiting jobs is sorted by

1. the job's index among its own key's waiting jobs (each key's oldest first, then each key's second, ...),
2. the key's last turn (the key served longest ago goes first in each round; a key never served first),
3. the key's oldest waiting job (between keys never served: the one that has waited longest),
4. the job's own queue order.

The next job to start is the first of that order; a waiting job's position (1 = next) is its index + 1.
Claiming the first job moves its key to the end of every round, so the positions of the other jobs only
move up: a position given now is the order the jobs will start in, unless new work arrives. With a single
key (no keys configured: every job's key is ``""``) it is plain first-in, first-out.

The order is never computed over the whole queue by the stores: it follows from a few numbers per key (its
rank, ``key_rank(turn, oldest)``, and how many of its jobs wait), which the stores keep indexed as jobs come
and go. The next job is the oldest job of the key of lowest rank; the job at ``index`` among its own key's
waiting jobs (0 = its oldest) has ``index`` jobs of its key before it and, of each other key with jobs waiting,
``index`` of them, or ``index + 1`` when that key ranks before the job's own, never more than that key has
waiting: the cost of a position grows with the number of keys that have jobs waiting, never with the number of
jobs. ``fair_order`` states the rule over a whole queue; the tests check the stores' indexed forms against it
(tests/test_queue_index.py).

Both stores read those numbers and apply the decision under a guard: the SQLite store inside its transaction
(a position's sum over the keys is one SQL aggregate), the Redis store in its scripts (``lua/claim.lua``, which
also records the key's new turn, and ``lua/position.lua``). The scripts and the SQL repeat ``key_rank``'s
formula, to keep the index of keys sorted by it.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class WaitingJob:
    job_id: str
    key_name: str
    seq: float  # queue order: lower waited longer


def fair_order(waiting: Iterable[WaitingJob], last_turns: Mapping[str, int]) -> list[WaitingJob]:
    """The waiting jobs in the order they will start."""
    by_key: dict[str, list[WaitingJob]] = {}
    for job in sorted(waiting, key=lambda job: job.seq):
        by_key.setdefault(job.key_name, []).append(job)
    ranked: list[tuple[tuple[int, int, float, float], WaitingJob]] = []
    for key_name, jobs in by_key.items():
        turn, oldest = last_turns.get(key_name, 0), jobs[0].seq
        ranked.extend(((index, turn, oldest, job.seq), job) for index, job in enumerate(jobs))
    ranked.sort(key=lambda item: item[0])
    return [job for _, job in ranked]


def next_job(
    waiting: Iterable[WaitingJob], last_turns: Mapping[str, int], skip: Container[str] = ()
) -> WaitingJob | None:
    """The first job of the fair order whose id is not in ``skip`` (a distributed worker skips submissions
    not confirmed yet); None when none waits."""
    return next((job for job in fair_order(waiting, last_turns) if job.job_id not in skip), None)


def position(waiting: Iterable[WaitingJob], last_turns: Mapping[str, int], job_id: str) -> int | None:
    """The job's place in the fair order (1 = next to start); None when it is not waiting."""
    for index, job in enumerate(fair_order(waiting, last_turns)):
        if job.job_id == job_id:
            return index + 1
    return None


# Below any queue order (Redis sequence numbers, SQLite rowids stay far below 2**52): a key never served
# ranks by its oldest job, ahead of every key already served. Exact in a double, as Redis scores are.
NEVER_SERVED_OFFSET = float(2**52)


def key_rank(turn: int, oldest_seq: float) -> float:
    """A key's place in each round of the fair order (lower goes first), as one number: its last turn when
    it was served (turns are distinct: each claim takes a new one), else its oldest waiting job's queue order
    minus ``NEVER_SERVED_OFFSET``. Sorting by it is sorting by (turn, oldest) as ``fair_order`` does."""
    return float(turn) if turn > 0 else float(oldest_seq) - NEVER_SERVED_OFFSET


def key_is_full(waiting_of_key: int, key_max_waiting: int | None) -> bool:
    """The per-key waiting limit: a key with ``key_max_waiting`` jobs waiting already may not add one.
    ``lua/submit.lua`` makes the same comparison (as for ``max_queue``) to stay atomic with the insert."""
    return key_max_waiting is not None and waiting_of_key >= key_max_waiting
