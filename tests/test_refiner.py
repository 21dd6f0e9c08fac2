"""The SDXL refiner (ensemble of experts): the model denoises to ``switch_at``, the refiner finishes the same
latents; on the tiny refiner fixture (both file layouts) through the real pipelines, the API and AUTOMATIC1111's
``refiner_checkpoint`` (the real ``webuiapi``)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel
from fastapi.testclient import TestClient
from PIL import Image

from imagen.errors import JobCancelled
from imagen.generation.base import STEP_GENERATION, InputImages, RefinerChoice
from imagen.generation.diffusers.components import SDXL_REFINER_CONFIG_DIR
from imagen.generation.diffusers.engine import DiffusersEngine
from imagen.outputs.png import a1111_parameters
from tests.conftest import submit, wait_status
from tests.engine_fixtures import ProgressLog, engine_settings, fixtures_registry, fixtures_registry_data, pixels, task
from tests.http_thread import http_server

TERMINAL = {"SUCCESS", "FAILURE", "REVOKED"}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> DiffusersEngine:
    return DiffusersEngine(fixtures_registry(), engine_settings(tmp_path_factory.mktemp("refiner-engine")))


def draw(engine: DiffusersEngine, progress: Callable[[str, int], None] | None = None, **changes: Any) -> np.ndarray:
    [image] = engine.generate(task(steps=6, **changes), progress or (lambda step, percent: None), InputImages())
    return pixels(image.image)


@pytest.mark.engine
def test_the_refiner_finishes_the_models_latents_and_shares_its_vae_and_encoder(engine: DiffusersEngine) -> None:
    alone = draw(engine)
    log = ProgressLog()
    refined = draw(engine, log, refiner=RefinerChoice("sdxl-refiner", 0.5))
    assert refined.shape == alone.shape and np.abs(refined - alone).mean() > 1  # the refiner drew the end
    assert np.array_equal(draw(engine, refiner=RefinerChoice("sdxl-refiner", 0.5)), refined)  # same seed
    # a switch at the end of the schedule leaves the refiner nothing: the model's picture, byte for byte
    assert np.array_equal(draw(engine, refiner=RefinerChoice("sdxl-refiner", 1.0)), alone)
    # the two experts hold one VAE and one OpenCLIP encoder (the fixture's refiner has the base's)
    refiner_pipe, base_pipe = engine._models["sdxl-refiner"].pipe, engine._models["sdxl-base"].pipe
    assert refiner_pipe.vae is base_pipe.vae and refiner_pipe.text_encoder_2 is base_pipe.text_encoder_2
    assert refiner_pipe.text_encoder is None and refiner_pipe.config.requires_aesthetics_score
    generation = [percent for step, percent in log.calls if step == STEP_GENERATION]
    assert generation == sorted(generation) and generation[-1] == 100
    assert any(0 < p <= 50 for p in generation) and any(50 < p < 100 for p in generation)  # both experts report


@pytest.mark.engine
def test_the_single_file_refiner_draws_what_the_folder_does(engine: DiffusersEngine) -> None:
    folder = draw(engine, refiner=RefinerChoice("sdxl-refiner", 0.6))
    single = draw(engine, refiner=RefinerChoice("sdxl-refiner-single-file", 0.6))
    assert np.abs(folder - single).max() <= 1


@pytest.mark.engine
def test_a_cancel_in_the_refiners_part_stops_the_job(engine: DiffusersEngine) -> None:
    def cancel_in_the_refiners_part(step: str, percent: int) -> None:
        if step == STEP_GENERATION and percent > 50:
            raise JobCancelled("cancelled by its owner")

    with pytest.raises(JobCancelled):
        draw(engine, cancel_in_the_refiners_part, refiner=RefinerChoice("sdxl-refiner", 0.5))


def test_the_shipped_refiner_config_is_sdxl_refiners_unet() -> None:
    config = UNet2DConditionModel.load_config(str(SDXL_REFINER_CONFIG_DIR / "unet"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e9, 2) == 2.26  # SDXL refiner 1.0's UNet
    assert "Refiner: sdxl-refiner, Refiner switch at: 0.8" in a1111_parameters(
        {**task().as_dict(), "refiner": RefinerChoice("sdxl-refiner").as_dict()}
    )


# -- the API ------------------------------------------------------------------------------------------------
@pytest.fixture
def api(make_client: Callable[..., TestClient], tmp_path: Path) -> TestClient:
    """The fixtures' registry, where the single-file model names the folder refiner as its default."""
    registry = fixtures_registry_data()
    next(m for m in registry["models"] if m["id"] == "sdxl-single-file")["default_refiner"] = "sdxl-refiner"
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(registry))
    return make_client(engine="diffusers", registry_path=path, device="cpu", dtype="float32")


def metadata_of(client: TestClient, **fields: Any) -> dict[str, Any]:
    done = wait_status(client, submit(client, "a fox", steps=10, **fields), TERMINAL, timeout=120)
    assert done["status"] == "SUCCESS", done
    return done["result"]["metadata"]  # type: ignore[no-any-return]


@pytest.mark.engine
def test_refiner_requests_defaults_and_refusals(api: TestClient) -> None:
    models = {m["id"]: m for m in api.get("/models").json()["models"]}
    assert models["sdxl-refiner"]["refiner"] and models["sdxl-base"]["refiners"] == [
        "sdxl-refiner", "sdxl-refiner-single-file"]
    assert models["sdxl-single-file"]["default_refiner"] == "sdxl-refiner"
    asked = metadata_of(api, refiner={"model": "sdxl-refiner", "switch_at": 0.7})
    assert asked["refiner"] == {"model": "sdxl-refiner", "switch_at": 0.7}
    assert metadata_of(api, model="sdxl-single-file")["refiner"] == {"model": "sdxl-refiner", "switch_at": 0.8}
    assert "refiner" not in metadata_of(api, model="sdxl-single-file", refiner=None)
    assert "refiner" not in metadata_of(api)  # a model without a default refiner
    for fields, loc, words in (
        ({"refiner": {"model": "sdxl-single-file"}}, ["body", "refiner", "model"], "'sdxl-single-file' is not a "
         "refiner; the refiners that fit model 'sdxl-base': sdxl-refiner, sdxl-refiner-single-file"),
        ({"refiner": {"model": "nowhere"}}, ["body", "refiner", "model"], "'nowhere' is unknown"),
        ({"refiner": {"model": "sdxl-refiner", "switch_at": 0.3}}, ["body", "refiner", "switch_at"],
         "greater than or equal to 0.5"),
        ({"model": "sdxl-refiner"}, ["body", "model"], "is an SDXL refiner: it only finishes other models'"),
        ({"refiner": {"model": "sdxl-refiner"}, "hires": {"scale": 1.5}}, ["body", "refiner"],
         "without hires here"),
    ):
        response = api.post("/generate", json={"prompt": "a fox", **fields})
        assert response.status_code == 422, (fields, response.text)
        [error] = response.json()["detail"]
        assert error["loc"] == loc and words in error["msg"], error


@pytest.mark.engine
def test_a1111_refiner_checkpoint(api: TestClient) -> None:
    """webuiapi 0.9.17 (the latest) has no refiner arguments: A1111's own field names, sent as its clients do."""
    with http_server(api) as url:
        body = {"prompt": "a fox", "steps": 10, "seed": 5, "width": 512, "height": 512,
                "refiner_checkpoint": "sdxl-refiner", "refiner_switch_at": 0.7}
        answer = httpx.post(url + "/sdapi/v1/txt2img", json=body, timeout=300).json()
        assert Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).size == (512, 512)
        assert "Refiner: sdxl-refiner, Refiner switch at: 0.7" in json.loads(answer["info"])["infotexts"][0]
    for fields, words in (
        ({"refiner_checkpoint": "sdxl-base"}, "refiner_checkpoint: 'sdxl-base' is not a refiner"),
        ({"refiner_checkpoint": "sdxl-refiner", "refiner_switch_at": 0.99}, "refiner_switch_at: Input should be "
         "less than or equal to 0.95"),
        ({"refiner_checkpoint": "nowhere"}, "refiner_checkpoint: unknown model 'nowhere'"),
    ):
        refused = api.post("/sdapi/v1/txt2img", json={"prompt": "a fox", **fields})
        assert refused.status_code == 422 and words in refused.json()["detail"], refused.json()
