"""The real diffusers engine behind the service: jobs end to end on the tiny fixtures and the demo model."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from imagen.errors import RegistryError
from tests.conftest import wait_status
from tests.engine_fixtures import fixtures_registry_path


@pytest.fixture
def diffusers_client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(engine="diffusers", registry_path=fixtures_registry_path(), device="cpu", dtype="float32")


def test_lora_job_with_trigger_words_end_to_end(diffusers_client: TestClient) -> None:
    body = {"prompt": "a cute anime character with detailed eyes", "model": "sdxl-base",
            "loras": [{"name": "anime-style", "weight": 0.75}], "steps": 10, "guidance_scale": 8.0, "seed": 42}
    job_id = diffusers_client.post("/generate", json=body).json()["job_id"]
    done = wait_status(diffusers_client, job_id, {"SUCCESS", "FAILURE"}, timeout=120)
    assert done["status"] == "SUCCESS", done
    metadata = done["result"]["metadata"]
    assert metadata["seed"] == 42 and metadata["loras"] == [{"name": "anime-style", "weight": 0.75}]
    assert metadata["final_prompt"].lower().count("anime style") == 1
    image = diffusers_client.get(f"/image/{job_id}")
    png = Image.open(io.BytesIO(image.content))
    assert (png.mode, png.size) == ("RGB", (metadata["width"], metadata["height"]))
    header = json.loads(image.headers["x-generation-metadata"])
    assert (header["seed"], header["loras"]) == (42, metadata["loras"])
    # Where the job's time went, per progress step, beside the metadata (never in the PNG).
    timings = done["result"]["timings"]
    phases = {"loading_loras", "encoding_prompt", "generation_gpu", "decoding", "saving"}
    assert phases <= set(timings["seconds"]) and all(value >= 0 for value in timings["seconds"].values())
    assert timings["seconds"]["generation_gpu"] > 0 and "timings" not in metadata
    assert abs(time.time() - timings["started_at"]) < 120


def test_same_seed_gives_the_same_bytes_through_the_service(diffusers_client: TestClient) -> None:
    body = {"prompt": "a castle", "steps": 10, "seed": 7}
    first, second = (diffusers_client.post("/generate", json=body).json()["job_id"] for _ in range(2))
    for job in (first, second):
        assert wait_status(diffusers_client, job, {"SUCCESS", "FAILURE"}, timeout=120)["status"] == "SUCCESS"
    assert diffusers_client.get(f"/image/{first}").content == diffusers_client.get(f"/image/{second}").content


def test_unusable_registry_stops_the_start(make_settings: Callable[..., object], tmp_path: Path) -> None:
    from imagen.api.app import create_app

    pickle_file = tmp_path / "model.ckpt"
    pickle_file.write_bytes(b"\x80\x04K\x01.")
    registry = tmp_path / "bad.yaml"
    registry.write_text(f"models:\n  - {{id: sdxl-base, name: x, path: {pickle_file}}}\n")
    with pytest.raises(RegistryError, match="model 'sdxl-base'"):
        create_app(make_settings(engine="diffusers", registry_path=registry))  # type: ignore[operator]
