"""Which workers hold which model (GET /models `loaded_on`, /health `models`), and an operator's load and
unload orders: POST /models/{id}/load and /unload, and A1111's unload-checkpoint and reload-checkpoint.

The scripted test engine (tests/engines.py) holds a job's model, or one it is told to load, on the device
until it is told to free it, so what the workers report is observable on both backends without weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from fastapi.testclient import TestClient

from imagen.api.routes import MODEL_NOT_FOUND, MODELS_ADMIN_ONLY, WORKER_NOT_FOUND
from tests.celery_support import shared_redis
from tests.conftest import submit, wait_for, wait_status
from tests.test_access import Keys, keys
from tests.test_job_contract import job_system

__all__ = ["job_system", "keys", "shared_redis"]  # fixtures

MODEL = "pony-xl-v6"  # not the default model: held only after a job or an order names it


def ready_workers(client: TestClient) -> list[str]:
    """The ready workers as /health names them (``host:pid``)."""
    workers = client.get("/health").json()["workers"]
    return [f"{worker['host']}:{worker['pid']}" for worker in workers if worker["ready"]]


def loaded_on(client: TestClient, model_id: str, **headers: str) -> list[dict[str, str]]:
    response = client.get("/models", headers=headers)
    assert response.status_code == 200, response.text
    found: list[dict[str, str]] = next(m["loaded_on"] for m in response.json()["models"] if m["id"] == model_id)
    return found


def held_by(client: TestClient, model_id: str, worker: str, **headers: str) -> bool:
    return {"worker": worker, "tier": "device"} in loaded_on(client, model_id, **headers)


def test_a_job_leaves_its_model_held_by_its_worker_and_unload_frees_it(
    job_system: Callable[..., TestClient],
) -> None:
    client = job_system()  # no keys: every caller is an admin, as for every other route
    [worker] = wait_for(lambda: ready_workers(client))
    assert loaded_on(client, MODEL) == []

    done = wait_status(client, submit(client, "a job", model=MODEL), {"SUCCESS", "FAILURE"})
    assert done["status"] == "SUCCESS", done
    wait_for(lambda: held_by(client, MODEL, worker))
    [status] = client.get("/health").json()["workers"]
    assert status["models"] == {MODEL: "device"}
    assert loaded_on(client, "sdxl-base") == []  # only the model its job named

    response = client.post(f"/models/{MODEL}/unload")
    assert response.status_code == 202, response.text
    assert response.json() == {"model": MODEL, "action": "unload", "workers": [worker]}
    wait_for(lambda: loaded_on(client, MODEL) == [])
    assert client.get("/health").json()["workers"][0]["models"] == {}


def test_admin_orders_load_and_unload_on_every_worker_or_one(
    job_system: Callable[..., TestClient], keys: Keys
) -> None:
    client = job_system(api_keys_file=keys.path)
    admin = keys.headers("admin")
    [worker] = wait_for(lambda: ready_workers(client))

    response = client.post(f"/models/{MODEL}/load", headers=admin)
    assert response.status_code == 202, response.text
    assert response.json() == {"model": MODEL, "action": "load", "workers": [worker]}
    wait_for(lambda: held_by(client, MODEL, worker, **admin))

    response = client.post(f"/models/{MODEL}/unload", params={"worker": worker}, headers=admin)
    assert response.status_code == 202, response.text
    assert response.json()["workers"] == [worker]
    wait_for(lambda: loaded_on(client, MODEL, **admin) == [])

    # the same load, named for this worker, then a job on the model runs as usual
    response = client.post(f"/models/{MODEL}/load", params={"worker": worker}, headers=admin)
    assert response.status_code == 202, response.text
    wait_for(lambda: held_by(client, MODEL, worker, **admin))
    response = client.post("/generate", json={"prompt": "after the load", "model": MODEL}, headers=admin)
    assert response.status_code == 201, response.text
    done = wait_status_as(client, response.json()["job_id"], admin)
    assert done["status"] == "SUCCESS", done
    assert held_by(client, MODEL, worker, **admin)


def wait_status_as(client: TestClient, job_id: str, headers: dict[str, str]) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/status/{job_id}", headers=headers).json()
        return body if body.get("status") in {"SUCCESS", "FAILURE"} else None

    return wait_for(finished)


def test_model_orders_are_refused(job_system: Callable[..., TestClient], keys: Keys) -> None:
    client = job_system(api_keys_file=keys.path)
    admin = keys.headers("admin")
    wait_for(lambda: ready_workers(client))
    for action in ("load", "unload"):
        for who in ("owner", "other"):
            response = client.post(f"/models/{MODEL}/{action}", headers=keys.headers(who))
            assert response.status_code == 403, response.text
            assert response.json() == {"detail": MODELS_ADMIN_ONLY}
        response = client.post(f"/models/no-such-model/{action}", headers=admin)
        assert response.status_code == 404, response.text
        assert response.json() == {"detail": MODEL_NOT_FOUND}
        response = client.post(f"/models/{MODEL}/{action}", params={"worker": "nowhere:1"}, headers=admin)
        assert response.status_code == 404, response.text
        assert response.json() == {"detail": WORKER_NOT_FOUND}
    assert loaded_on(client, MODEL, **admin) == []  # nothing refused was carried out


def a1111_refusal(detail: str) -> dict[str, Any]:
    return {"error": "HTTPException", "detail": detail, "body": "", "errors": ""}


def test_a1111_checkpoint_routes(make_client: Callable[..., TestClient], keys: Keys) -> None:
    client = make_client(api_keys_file=keys.path)
    admin = keys.headers("admin")
    [worker] = wait_for(lambda: ready_workers(client))

    for route in ("unload-checkpoint", "reload-checkpoint"):
        response = client.post(f"/sdapi/v1/{route}", headers=keys.headers("owner"))
        assert response.status_code == 403, response.text
        assert response.json() == a1111_refusal(MODELS_ADMIN_ONLY)

    # reload: the key's checkpoint (its options), else the default model
    assert client.post("/sdapi/v1/reload-checkpoint", headers=admin).json() == {}
    wait_for(lambda: held_by(client, "sdxl-base", worker, **admin))
    options = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": MODEL}, headers=admin)
    assert options.status_code == 200, options.text
    assert client.post("/sdapi/v1/reload-checkpoint", headers=admin).json() == {}
    wait_for(lambda: held_by(client, MODEL, worker, **admin))

    # unload: every model the workers hold
    assert client.post("/sdapi/v1/unload-checkpoint", headers=admin).json() == {}
    wait_for(lambda: loaded_on(client, MODEL, **admin) == loaded_on(client, "sdxl-base", **admin) == [])


def test_a1111_refresh_checkpoints_lists_a_model_just_added(
    make_client: Callable[..., TestClient], keys: Keys, reference_registry: Path
) -> None:
    client = make_client(api_keys_file=keys.path)
    owner = keys.headers("owner")
    registry = yaml.safe_load(reference_registry.read_text())
    registry["models"].append({"id": "fresh", "name": "Fresh", "path": "models/fresh.safetensors", "size": 64})
    reference_registry.write_text(yaml.safe_dump(registry))

    response = client.post("/sdapi/v1/refresh-checkpoints", headers=owner)  # any key: it only reads the file
    assert response.status_code == 200, response.text
    assert response.json() is None
    titles = [model["model_name"] for model in client.get("/sdapi/v1/sd-models", headers=owner).json()]
    assert "fresh" in titles
