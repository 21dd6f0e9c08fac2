"""The fair-queue rule alone (``imagen.jobs.fairness``), without a store: the order it gives, and that a
position given now is the order in which jobs start while no new work arrives."""

from __future__ import annotations

import random

from imagen.jobs.fairness import WaitingJob, fair_order, key_is_full, next_job, position


def jobs(*keys: str) -> list[WaitingJob]:
    return [WaitingJob(f"{key}{index}", key, index) for index, key in enumerate(keys)]


def ids(order: list[WaitingJob]) -> list[str]:
    return [job.job_id for job in order]


def test_one_key_is_first_in_first_out() -> None:
    waiting = jobs("", "", "", "")
    assert ids(fair_order(reversed(waiting), {"": 7})) == ["0", "1", "2", "3"]


def test_keys_take_turns_the_least_recently_served_first() -> None:
    waiting = jobs("a", "a", "a", "b", "c", "c")
    assert ids(fair_order(waiting, {})) == ["a0", "b3", "c4", "a1", "c5", "a2"]  # never served: oldest first
    assert ids(fair_order(waiting, {"a": 5, "b": 3})) == ["c4", "b3", "a0", "c5", "a1", "a2"]


def test_next_job_skips_the_ids_it_is_told_to() -> None:
    waiting = jobs("a", "b")
    chosen = next_job(waiting, {}, skip={"a0"})
    assert chosen is not None and chosen.job_id == "b1"
    assert next_job(waiting, {}, skip={"a0", "b1"}) is None
    assert position(waiting, {}, "b1") == 2 and position(waiting, {}, "zz") is None


def test_positions_are_the_start_order_for_any_queue() -> None:
    rng = random.Random(10)
    for _ in range(200):
        waiting = jobs(*(rng.choice("abcd") for _ in range(rng.randint(1, 12))))
        turns = {key: rng.randint(0, 5) for key in "abcd" if rng.random() < 0.5}
        promised = {job.job_id: position(waiting, turns, job.job_id) for job in waiting}
        started, turn = [], max(turns.values(), default=0)
        while (chosen := next_job(waiting, turns)) is not None:
            started.append(chosen.job_id)
            waiting.remove(chosen)
            turn += 1
            turns[chosen.key_name] = turn  # what a claim records
        assert [promised[job_id] for job_id in started] == list(range(1, len(started) + 1))


def test_the_per_key_limit() -> None:
    assert not key_is_full(1, 2) and key_is_full(2, 2) and not key_is_full(50, None)
