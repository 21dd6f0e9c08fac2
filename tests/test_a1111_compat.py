"""AUTOMATIC1111's /sdapi/v1 through the real `webuiapi` package and the requests Open WebUI sends in its
Automatic1111 mode (HTTP Basic auth with the key as password), on both job backends."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import webuiapi
from fastapi.testclient import TestClient
from PIL import Image

from imagen.access.keys import add_key
from imagen.api.prompt_tags import parse_lora_tags
from imagen.registry import load_registry
from tests.celery_support import shared_redis
from tests.conftest import wait_for
from tests.http_thread import http_server
from tests.test_job_contract import job_system

__all__ = ["job_system", "shared_redis"]  # fixtures (job_system runs a test on both backends)


def _api(url: str, key: str) -> webuiapi.WebUIApi:
    host, port = url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port))
    api.set_auth("user", key)  # HTTP Basic, as A1111's --api-auth: the key is the password
    return api


def test_webuiapi_and_open_webui_on_both_backends(job_system: Callable[..., TestClient], tmp_path: Path) -> None:
    keys_path = tmp_path / "keys.yaml"
    alice, bob = add_key(keys_path, "alice"), add_key(keys_path, "bob")
    client = job_system(api_keys_file=str(keys_path))
    with http_server(client) as url:
        api, other = _api(url, alice), _api(url, bob)

        assert [m["title"] for m in api.get_sd_models()] == ["sdxl-base", "pony-xl-v6"]
        assert {lora["name"] for lora in api.get_loras()} == {"anime-style", "character-detail"}
        assert "Euler a" in api.util_get_sampler_names()
        api.util_set_model("pony-xl-v6")
        assert api.util_get_current_model() == "pony-xl-v6"
        assert other.util_get_current_model() == "sdxl-base"  # a model choice is per key

        result = api.txt2img(
            prompt="a fox, <lora:anime-style:0.5>", seed=5, width=512, height=512, batch_size=2, steps=10,
            sampler_name="Euler a",
        )
        assert len(result.images) == 2 and result.images[0].size == (512, 512)
        assert result.info["seed"] == 5 and result.info["all_seeds"] == [5, 6]
        assert result.info["sd_model_name"] == "pony-xl-v6"
        assert result.info["prompt"] == "a fox"  # the tag is removed from the prompt
        assert "Seed: 6" in result.info["infotexts"][1] and "Lora: anime-style:0.5" in result.info["infotexts"][0]
        assert result.info["sampler_name"] == "Euler a"

        with pytest.raises(RuntimeError) as failed:
            api.txt2img(prompt="fatal", steps=10)
        assert failed.value.args[0] == 500

        # interrupt: another key's interrupt leaves the job alone; the owner's cancels it
        answers: list[Any] = []
        running = threading.Thread(target=lambda: answers.append(api.txt2img(prompt="hold never-released", steps=100)))
        running.start()
        progress = wait_for(lambda: (p := api.get_progress())["progress"] > 0 and p, timeout=30)
        assert progress["state"]["job_count"] == 1 and 0 < progress["progress"] < 1
        job_id = progress["state"]["job"]
        assert other.get_progress()["state"]["job_count"] == 0
        assert other.interrupt() == {"interrupted": []}
        headers = {"Authorization": f"Bearer {alice}"}
        assert client.get(f"/status/{job_id}", headers=headers).json()["status"] == "PROGRESS"
        assert api.interrupt() == {"interrupted": [job_id]}
        running.join(30)
        assert answers[0].images == []
        assert client.get(f"/status/{job_id}", headers=headers).json()["status"] == "REVOKED"
        assert api.get_progress()["state"]["job_count"] == 0

        # Open WebUI, Automatic1111 mode (backend/open_webui/routers/images.py): Basic auth "user:key"
        auth = {"authorization": "Basic " + base64.b64encode(f"webui:{bob}".encode()).decode()}
        with httpx.Client(base_url=url, headers=auth, timeout=60) as webui:
            options = webui.get("/sdapi/v1/options").json()
            models = [{"id": m["title"], "name": m["model_name"]} for m in webui.get("/sdapi/v1/sd-models").json()]
            options["sd_model_checkpoint"] = models[1]["id"]
            assert webui.post("/sdapi/v1/options", json=options).status_code == 200
            answer = webui.post("/sdapi/v1/txt2img", json={
                "prompt": "a cat", "batch_size": 1, "width": 512, "height": 512, "steps": 10,
                "negative_prompt": "dog", "cfg_scale": 5.0, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
            })
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).size == (512, 512)
            info = json.loads(body["info"])
            assert info["sd_model_name"] == "pony-xl-v6" and info["sampler_name"] == "DPM++ 2M Karras"
            assert info["negative_prompt"] == "dog"
            # img2img with a mask: inpainting
            png = io.BytesIO()
            Image.new("RGB", (512, 512), "red").save(png, format="PNG")
            mask = io.BytesIO()
            Image.new("L", (512, 512), 255).save(mask, format="PNG")
            answer = webui.post("/sdapi/v1/img2img", json={
                "init_images": [base64.b64encode(png.getvalue()).decode()],
                "mask": base64.b64encode(mask.getvalue()).decode(), "denoising_strength": 0.5,
                "prompt": "a hat", "steps": 10,
            })
            assert answer.status_code == 200, answer.text
            assert json.loads(answer.json()["info"])["denoising_strength"] == 0.5
            black = io.BytesIO()
            Image.new("L", (512, 512), 0).save(black, format="PNG")
            answer = webui.post("/sdapi/v1/img2img", json={  # a black mask, inverted: repaint everything
                "init_images": ["data:image/png;base64," + base64.b64encode(png.getvalue()).decode()],
                "mask": base64.b64encode(black.getvalue()).decode(), "inpainting_mask_invert": 1, "prompt": "x",
                "steps": 10,
            })
            assert answer.status_code == 200, answer.text
            assert webui.post("/sdapi/v1/img2img", json={"prompt": "x"}).status_code == 422
            # the lists SillyTavern's "Stable Diffusion WebUI" source reads (src/endpoints/stable-diffusion.js)
            assert [u["name"] for u in webui.get("/sdapi/v1/upscalers").json()] == ["None", "Lanczos"]
            assert webui.get("/sdapi/v1/latent-upscale-modes").json() == [{"name": "Latent"}]
            assert webui.get("/sdapi/v1/sd-vae").json() == []
            assert [s["name"] for s in webui.get("/sdapi/v1/schedulers").json()] == [
                "automatic", "karras", "sgm uniform"
            ]
            # SGM Uniform: Euler's trailing timesteps (few-step models); refused for a sampler without it
            trailing = webui.post("/sdapi/v1/txt2img", json={
                "prompt": "x", "steps": 10, "sampler_name": "Euler", "scheduler": "SGM Uniform",
            })
            assert json.loads(trailing.json()["info"])["sampler_name"] == "Euler SGM Uniform", trailing.text
            refused = webui.post(
                "/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "LCM", "scheduler": "SGM Uniform"}
            )
            assert refused.status_code == 422 and "needs a sampler_name that has it (Euler)" in refused.json()["detail"]
            # an unknown sampler: A1111's error shape
            refused = webui.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Nope"})
            assert refused.status_code == 422 and "Nope" in refused.json()["detail"]
            wrong = {"authorization": "Basic " + base64.b64encode(b"webui:wrong").decode()}
            assert webui.get("/sdapi/v1/options", headers=wrong).status_code == 401


def test_lora_tags_by_id_or_file_stem_are_removed_from_the_prompt(reference_registry: Path) -> None:
    registry = load_registry(reference_registry)
    tags = parse_lora_tags("a fox, <lora:anime-style:0.5>, snow <lora:detail> <lora:nope:1>", registry)
    assert tags.prompt == "a fox, snow"
    assert tags.loras == [("anime-style", 0.5), ("character-detail", 1.0)]  # "detail": the file's stem
    assert tags.unknown == ["nope"]


def test_progress_shows_the_callers_job_with_its_preview(make_client: Callable[..., TestClient]) -> None:
    client = make_client(engine="test-pattern", test_pattern_seconds=2.0)
    with http_server(client) as url:
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port))
        answers: list[Any] = []
        running = threading.Thread(target=lambda: answers.append(api.txt2img(prompt="fox", steps=10)))
        running.start()
        progress = wait_for(lambda: (p := api.get_progress())["current_image"] and p, timeout=30)
        assert Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).format == "JPEG"
        assert progress["state"]["sampling_steps"] == 10 and progress["state"]["sampling_step"] >= 1
        assert progress["eta_relative"] >= 0
        running.join(30)
        assert len(answers[0].images) == 1
        idle = api.get_progress()
        assert (idle["progress"], idle["current_image"], idle["state"]["job_count"]) == (0.0, None, 0)
