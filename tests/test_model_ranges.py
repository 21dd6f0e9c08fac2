"""Each model's own steps and CFG range and defaults (few-step models), a LoRA's needs (an LCM-LoRA), and the
reference's 10-100 / 1.0-30.0 for every model that says nothing of its own."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from imagen.generation.diffusers.schedulers import build_scheduler
from imagen.generation.samplers import scheduler_for
from imagen.registry import REFERENCE_STEPS, ModelSpec
from tests.conftest import REFERENCE_REGISTRY, submit, wait_status
from tests.http_thread import http_server

TERMINAL = {"SUCCESS", "FAILURE"}
FEW_STEPS = REFERENCE_REGISTRY.replace(
    "loras:\n",
    """  - id: turbo
    name: A few-step model
    path: models/turbo.safetensors
    size: 64
    steps: {min: 1, max: 8, default: 4}
    guidance_scale: {min: 0.0, max: 2.0, default: 0.0}
    timestep_spacing: trailing
    scheduler: Euler
loras:
  - id: lcm
    name: LCM-LoRA
    path: loras/lcm.safetensors
    needs:
      scheduler: LCM
      steps: {min: 4, max: 8, default: 6}
      guidance_scale: {min: 1.0, max: 2.0, default: 1.5}
""",
    1,
)


@pytest.fixture
def api(make_client: Callable[..., TestClient], tmp_path: Path) -> TestClient:
    registry = tmp_path / "few-steps.yaml"
    registry.write_text(FEW_STEPS)
    (tmp_path / "reference").mkdir(exist_ok=True)
    (tmp_path / "reference" / "electra_ref.png").write_bytes(b"not read by test engines")
    return make_client(registry_path=registry)


def task_of(client: TestClient, **fields: Any) -> dict[str, Any]:
    """The job's metadata (the task it ran), once it is done."""
    done = wait_status(client, submit(client, "a fox", **fields), TERMINAL)
    assert done["status"] == "SUCCESS", done
    metadata: dict[str, Any] = done["result"]["metadata"]
    return metadata


def refusal(client: TestClient, **fields: Any) -> dict[str, Any]:
    response = client.post("/generate", json={"prompt": "a fox", **fields})
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    return error  # type: ignore[no-any-return]


def test_a_model_that_says_nothing_keeps_the_references_numbers(api: TestClient) -> None:
    metadata = task_of(api, model="sdxl-base")
    assert (metadata["steps"], metadata["guidance_scale"]) == (30, 7.5)
    assert "defaults_from" not in metadata and "scheduler" not in metadata
    for steps, words in ((9, "greater than or equal to 10"), (101, "less than or equal to 100"),
                         (150, "less than or equal to 100")):
        error = refusal(api, model="sdxl-base", steps=steps)
        assert error["loc"] == ["body", "steps"] and words in error["msg"], error
        assert "10-100" in error["msg"]
    assert refusal(api, steps=151)["loc"] == ["body", "steps"]  # the bound of every model
    error = refusal(api, model="pony-xl-v6", guidance_scale=0.5)
    assert error["loc"] == ["body", "guidance_scale"] and "greater than or equal to 1" in error["msg"]


def test_a_few_step_model_has_its_own_range_and_defaults(api: TestClient) -> None:
    metadata = task_of(api, model="turbo")
    assert (metadata["steps"], metadata["guidance_scale"]) == (4, 0.0)
    assert metadata["defaults_from"] == {"steps": "model turbo", "guidance_scale": "model turbo"}
    assert task_of(api, model="turbo", steps=2, guidance_scale=1.0)["steps"] == 2
    assert "defaults_from" not in task_of(api, model="turbo", steps=8, guidance_scale=1.0)
    error = refusal(api, model="turbo", steps=12)
    assert error["loc"] == ["body", "steps"]
    assert error["msg"] == "Input should be less than or equal to 8 (model turbo takes 1-8)"
    error = refusal(api, model="turbo", guidance_scale=7.5)
    assert error["msg"] == "Input should be less than or equal to 2.0 (model turbo takes 0.0-2.0)"
    turbo = next(m for m in api.get("/models").json()["models"] if m["id"] == "turbo")
    assert turbo["steps"] == {"min": 1, "max": 8, "default": 4}
    assert turbo["guidance_scale"] == {"min": 0.0, "max": 2.0, "default": 0.0}
    assert (turbo["timestep_spacing"], turbo["default_scheduler"]) == ("trailing", "Euler")
    base = next(m for m in api.get("/models").json()["models"] if m["id"] == "sdxl-base")
    assert base["steps"] == {"min": 10, "max": 100, "default": 30} and base["timestep_spacing"] is None


def test_a_lora_that_needs_a_sampler_and_few_steps_gets_them_unless_the_request_says_otherwise(
    api: TestClient,
) -> None:
    metadata = task_of(api, model="sdxl-base", loras=[{"name": "lcm"}])
    assert (metadata["steps"], metadata["guidance_scale"], metadata["scheduler"]) == (6, 1.5, "LCM")
    assert metadata["defaults_from"] == {"steps": "LoRA lcm", "guidance_scale": "LoRA lcm", "scheduler": "LoRA lcm"}
    said = task_of(api, model="sdxl-base", loras=[{"name": "lcm"}], steps=4, scheduler="Euler a")
    assert (said["steps"], said["scheduler"]) == (4, "Euler a")
    assert said["defaults_from"] == {"guidance_scale": "LoRA lcm"}
    error = refusal(api, model="sdxl-base", loras=[{"name": "lcm"}], steps=30)
    assert error["msg"] == "Input should be less than or equal to 8 (LoRA lcm takes 4-8)"
    lcm = next(lo for lo in api.get("/loras").json()["loras"] if lo["id"] == "lcm")
    assert lcm["needs"] == {
        "scheduler": "LCM",
        "steps": {"min": 4, "max": 8, "default": 6},
        "guidance_scale": {"min": 1.0, "max": 2.0, "default": 1.5},
    }
    assert "needs" not in next(lo for lo in api.get("/loras").json()["loras"] if lo["id"] == "anime-style")


def test_openai_quality_is_a_share_of_the_models_default_steps(api: TestClient) -> None:
    with http_server(api) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        for model, quality, steps in (("sdxl-base", "low", 20), ("sdxl-base", "high", 50),
                                      ("sdxl-base", "auto", 30), ("turbo", "low", 3), ("turbo", "high", 7),
                                      ("turbo", "medium", 4)):
            answer = client.images.generate(model=model, prompt="a fox", quality=quality,  # type: ignore[arg-type]
                                            size="512x512", response_format="b64_json")
            [picture] = answer.data
            assert picture.b64_json is not None
            png = Image.open(io.BytesIO(base64.b64decode(picture.b64_json)))
            assert json.loads(png.info["imagen"])["steps"] == steps, (model, quality)


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"steps": {"min": 4, "max": 8, "default": 10}}, "min <= default <= max"),
        ({"steps": {"min": 0, "max": 8, "default": 4}}, "greater than or equal to 1"),
        ({"steps": {"min": 1, "max": 151, "default": 4}}, "less than or equal to 150"),
        ({"guidance_scale": {"min": 3.0, "max": 2.0, "default": 2.0}}, "min <= default <= max"),
        ({"timestep_spacing": "sideways"}, "leading, trailing, linspace"),
    ],
)
def test_a_registry_entry_with_a_range_that_cannot_be_is_refused(entry: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        ModelSpec.model_validate({"id": "m", "name": "m", "path": "m.safetensors", **entry})
    assert ModelSpec.model_validate({"id": "m", "name": "m", "path": "m.safetensors"}).steps == REFERENCE_STEPS


def test_a_models_timestep_spacing_reaches_every_sampler_but_one_that_sets_its_own() -> None:
    from training.demo_architecture import demo_scheduler

    own = demo_scheduler(zero_terminal_snr=False)  # SDXL's: leading
    trailing = type(own).from_config(own.config, timestep_spacing="trailing")  # what the engine does at load
    for name in ("Euler", "DPM++ 2M", "LCM", "Euler SGM Uniform"):
        sampler = build_scheduler(trailing, scheduler_for(name))
        assert sampler.config.timestep_spacing == "trailing", name
        sampler.set_timesteps(4)
        assert int(torch.as_tensor(sampler.timesteps)[0]) == 999, name  # trailing: the first step is pure noise
    leading = build_scheduler(own, scheduler_for("Euler"))
    leading.set_timesteps(4)
    assert int(torch.as_tensor(leading.timesteps)[0]) < 999


@pytest.mark.engine
def test_the_engine_samples_a_trailing_model_on_trailing_timesteps(tmp_path: Path) -> None:
    from imagen.generation.base import InputImages
    from imagen.generation.diffusers.engine import DiffusersEngine
    from tests.engine_fixtures import engine_settings, fixtures_registry, pixels, task

    registry = fixtures_registry()
    trailing = registry.model_copy(update={"models": [
        spec.model_copy(update={"timestep_spacing": "trailing"}) for spec in registry.models
    ]})
    job = task(scheduler="Euler", steps=2)
    drawn = {}
    for name, chosen in (("own", registry), ("trailing", trailing)):
        engine = DiffusersEngine(chosen, engine_settings(tmp_path / name))
        drawn[name] = pixels(engine.generate(job, lambda step, percent: None, InputImages())[0].image)
        spacing = engine._models["sdxl-base"].pipe.scheduler.config.timestep_spacing
        assert spacing == ("trailing" if name == "trailing" else "leading")
    assert (drawn["own"] != drawn["trailing"]).any()
