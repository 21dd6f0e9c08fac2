"""The registry file is read again when it changes, by the API and by every worker, without a restart: a
model or LoRA added is offered and runs; a model removed is no longer offered, its running job finishes and
its waiting ones fail saying why; a file that no longer parses keeps the registry last read, and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from imagen.generation.runner import model_removed_text
from tests.celery_support import shared_redis
from tests.conftest import submit, wait_for, wait_status
from tests.latches import Latches
from tests.test_job_contract import job_system

__all__ = ["job_system", "shared_redis"]  # fixtures

TERMINAL = {"SUCCESS", "FAILURE"}
REMOVED = "pony-xl-v6"


def edit_registry(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    registry = yaml.safe_load(path.read_text())
    change(registry)
    path.write_text(yaml.safe_dump(registry, sort_keys=False))


def model_ids(client: TestClient) -> list[str]:
    return [model["id"] for model in client.get("/models").json()["models"]]


def test_a_model_and_a_lora_added_to_the_file_are_offered_and_run(
    job_system: Callable[..., TestClient], reference_registry: Path
) -> None:
    client = job_system()

    def add(registry: dict[str, Any]) -> None:
        registry["models"].append({"id": "fresh", "name": "Fresh", "path": "models/fresh.safetensors", "size": 64})
        registry["loras"].append({"id": "fresh-lora", "name": "Fresh LoRA", "path": "loras/fresh.safetensors"})

    edit_registry(reference_registry, add)
    wait_for(lambda: "fresh" in model_ids(client))
    assert "fresh-lora" in [lora["id"] for lora in client.get("/loras").json()["loras"]]

    job_id = submit(client, "on the new model", model="fresh", loras=[{"name": "fresh-lora"}])
    done = wait_status(client, job_id, TERMINAL)
    assert done["status"] == "SUCCESS", done
    assert done["result"]["metadata"]["model"] == "fresh"


def test_a_model_removed_finishes_its_running_job_fails_its_waiting_one_and_is_freed(
    job_system: Callable[..., TestClient], reference_registry: Path, latches: Latches
) -> None:
    client = job_system()
    running = submit(client, "hold removal", model=REMOVED)
    latches.wait_started("removal")
    waiting = submit(client, "waits for the worker", model=REMOVED)

    edit_registry(
        reference_registry, lambda registry: registry.update(
            models=[model for model in registry["models"] if model["id"] != REMOVED]
        )
    )
    wait_for(lambda: REMOVED not in model_ids(client))
    assert client.post("/generate", json={"prompt": "too late", "model": REMOVED}).status_code == 422

    latches.release("removal")
    finished = wait_status(client, running, TERMINAL)
    assert finished["status"] == "SUCCESS", finished
    failed = wait_status(client, waiting, TERMINAL)
    assert failed["status"] == "FAILURE", failed
    assert model_removed_text(REMOVED) in failed["error"]
    # the worker freed it once its job ended
    wait_for(lambda: all(REMOVED not in worker["models"] for worker in client.get("/health").json()["workers"]))


def test_a_broken_file_keeps_the_registry_last_read_and_says_why(
    make_client: Callable[..., TestClient], reference_registry: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client()
    # its worker has read the file already (a worker started while the file is broken does not start)
    wait_for(lambda: any(worker["ready"] for worker in client.get("/health").json()["workers"]))
    before = model_ids(client)
    with caplog.at_level(logging.ERROR, logger="imagen.registry"):
        reference_registry.write_text("models: [this is not: valid yaml\n")

        def complained() -> bool:
            assert model_ids(client) == before  # the API answers with the registry last read meanwhile
            return any(
                record.levelno == logging.ERROR and str(reference_registry) in record.getMessage()
                for record in caplog.records
            )

        wait_for(complained)
    message = next(record.getMessage() for record in caplog.records if str(reference_registry) in record.getMessage())
    assert "registry last read is kept" in message
    done = wait_status(client, submit(client, "still served", model=REMOVED), TERMINAL)
    assert done["status"] == "SUCCESS", done
