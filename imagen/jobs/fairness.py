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

Both stores read the waiting jobs and the keys' turns, take the decision here, and apply it under a guard:
the SQLite store inside its transaction, the Redis store through ``lua/claim.lua`` (which also records the
key's new turn). No SQL or Lua restates the rule.
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


def key_is_full(waiting_of_key: int, key_max_waiting: int | None) -> bool:
    """The per-key waiting limit: a key with ``key_max_waiting`` jobs waiting already may not add one.
    ``lua/submit.lua`` makes the same comparison (as for ``max_queue``) to stay atomic with the insert."""
    return key_max_waiting is not None and waiting_of_key >= key_max_waiting
