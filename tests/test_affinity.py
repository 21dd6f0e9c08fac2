"""Model affinity end to end, on both job backends with two real workers: a job goes where its model is.

The scripted engine (tests/engines.py) holds one model at a time here (``max_loaded_models=1``), as a GPU
with room for one checkpoint would, so a worker that ran a job of another model would be seen holding it.
The rule itself (which job, the turns between keys, the bounded wait) is the store contract's
(tests/test_store_contract.py); this checks that the workers of each backend know what they and their
peers hold and act on it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from fastapi.testclient import TestClient

from tests.celery_support import shared_redis
from tests.conftest import submit, wait_for, wait_status
from tests.latches import Latches
from tests.test_job_contract import job_system

__all__ = ["job_system", "shared_redis"]  # fixtures

BASE, PONY = "sdxl-base", "pony-xl-v6"
TERMINAL = {"SUCCESS", "FAILURE"}


def holders(client: TestClient) -> dict[str, set[str]]:
    """Which workers (``host:pid``) hold each model, as /health reports them."""
    held: dict[str, set[str]] = {}
    for worker in client.get("/health").json()["workers"]:
        for model in worker["models"]:
            held.setdefault(model, set()).add(f"{worker['host']}:{worker['pid']}")
    return held


def one_each(held: dict[str, set[str]]) -> dict[str, set[str]] | None:
    """``held`` when one worker holds the pony model and the other the base model."""
    pony, base = held.get(PONY, set()), held.get(BASE, set())
    return held if len(pony) == len(base) == 1 and pony != base else None


def run_held(client: TestClient, latches: Latches, jobs: dict[str, str]) -> None:
    """Submit ``hold NAME`` jobs (name -> model), wait until each runs, release them, wait until each ends."""
    ids = [submit(client, f"hold {name}", model=model) for name, model in jobs.items()]
    for name in jobs:
        latches.wait_started(name)
    for name in jobs:
        latches.release(name)
    for job_id in ids:
        assert wait_status(client, job_id, TERMINAL, timeout=60)["status"] == "SUCCESS"


def test_jobs_go_to_the_worker_that_holds_their_model(
    job_system: Callable[..., TestClient], latches: Latches
) -> None:
    # A wait far longer than the test: a job left for its model's holder is never taken by the other worker.
    client = job_system(workers=2, max_loaded_models=1, affinity_wait_s=300)
    wait_for(lambda: len([w for w in client.get("/health").json()["workers"] if w["ready"]]) == 2)
    run_held(client, latches, {"first-pony": PONY, "first-base": BASE})  # one on each worker
    placed = wait_for(lambda: one_each(holders(client)))
    pony_worker, base_worker = next(iter(placed[PONY])), next(iter(placed[BASE]))

    # Both idle: a base job goes to the base worker (the pony worker leaves it to its idle holder), then a
    # pony job to the pony worker.
    busy_base = submit(client, "hold busy-base", model=BASE)
    latches.wait_started("busy-base")
    busy_pony = submit(client, "hold busy-pony", model=PONY)
    latches.wait_started("busy-pony")
    # Both busy: a base job, then a pony job wait. Freed first, the pony worker takes the pony job, although
    # the base job is older and would start first in plain fair order.
    older_base = submit(client, "hold older-base", model=BASE)
    pony = submit(client, "hold pony", model=PONY)
    latches.release("busy-pony")
    latches.wait_started("pony")
    assert client.get(f"/status/{older_base}").json()["status"] == "PENDING"  # both workers are busy
    latches.release("busy-base")  # the base worker, freed while the pony worker is busy, takes the base job
    latches.wait_started("older-base")
    latches.release("pony")
    latches.release("older-base")
    for job_id in (busy_base, busy_pony, pony, older_base):
        assert wait_status(client, job_id, TERMINAL, timeout=60)["status"] == "SUCCESS"
    # No worker ever loaded the other's model.
    assert holders(client) == {PONY: {pony_worker}, BASE: {base_worker}}


def test_health_says_which_models_each_worker_holds(job_system: Callable[..., TestClient]) -> None:
    client = job_system(max_loaded_models=1)
    [worker] = wait_for(lambda: [w for w in client.get("/health").json()["workers"] if w["ready"]])
    assert worker["models"] == {}
    for model in (PONY, BASE):
        assert wait_status(client, submit(client, "x", model=model), TERMINAL)["status"] == "SUCCESS"
    # One model at a time: the pony model made room for the base model.
    wait_for(lambda: [w["models"] for w in client.get("/health").json()["workers"]] == [{BASE: "device"}])


def test_a_message_left_for_a_model_holder_is_no_warning_in_the_worker_log() -> None:
    from celery.exceptions import Reject

    from imagen.jobs.distributed.task import LeftForModelHolder, quiet_routine_rejections

    def record_of(error: Exception) -> logging.LogRecord:
        try:
            raise error
        except Exception:
            exc_info = sys.exc_info()
        return logging.LogRecord("celery.app.trace", logging.WARNING, __file__, 1, "Task rejected", (), exc_info)

    assert not quiet_routine_rejections(record_of(LeftForModelHolder("left", requeue=True)))
    assert quiet_routine_rejections(record_of(Reject("engine not loaded", requeue=True)))  # others stay warnings
