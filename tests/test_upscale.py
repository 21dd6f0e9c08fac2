"""POST /upscale and AUTOMATIC1111's /sdapi/v1/extra-single-image: a picture upscaled (Lanczos or an upscaler
model read by spandrel) as a job on the queue, on both job backends, with the real engine and the tiny
ESRGAN fixture."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import webuiapi
from fastapi.testclient import TestClient
from PIL import Image

from tests.celery_support import shared_redis
from tests.conftest import wait_status
from tests.engine_fixtures import fixtures_registry_path
from tests.http_thread import http_server
from tests.test_job_contract import TERMINAL, job_system

__all__ = ["job_system", "shared_redis"]  # fixtures

pytestmark = pytest.mark.engine


def picture(size: tuple[int, int] = (48, 32)) -> Image.Image:
    rng = np.random.default_rng(3)
    cells = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(cells, "RGB").resize(size, Image.Resampling.NEAREST)


def data_url(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def upscaled(client: TestClient, **fields: Any) -> tuple[Image.Image, dict[str, Any]]:
    response = client.post("/upscale", json={"image": data_url(picture()), **fields})
    assert response.status_code == 201, response.text
    job_id = response.json()["job_id"]
    done = wait_status(client, job_id, TERMINAL, timeout=120)
    assert done["status"] == "SUCCESS", done
    assert done["result"]["filename"].startswith("upscale_")
    return Image.open(io.BytesIO(client.get(f"/image/{job_id}").content)), done["result"]["metadata"]


def test_an_upscale_job_on_each_backend(job_system: Callable[..., TestClient]) -> None:
    client = job_system(engine="diffusers", registry_path=fixtures_registry_path(), device="cpu", dtype="float32",
                        warm_up_steps=0, max_output_pixels=200 * 200)  # fmt: skip
    model, metadata = upscaled(client, upscaler="tiny-esrgan", scale=3)
    assert model.size == (144, 96) and metadata["upscale"] == {
        "width": 144, "height": 96, "upscaler": "tiny-esrgan", "scale": 3.0}
    assert model.info["parameters"].startswith("Postprocess upscale by: 3.0, Postprocess upscaler: tiny-esrgan")
    plain, _ = upscaled(client, width=96)
    assert plain.size == (96, 64)
    expected = picture().resize((96, 64), Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(plain, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1
    for fields, loc, words in (
        ({"upscaler": "latent"}, ["body", "upscaler"], "latent is for the hires fix"),
        ({"upscaler": "4x-UltraSharp"}, ["body", "upscaler"], "available: lanczos, tiny-esrgan"),
        ({"scale": 6}, ["body", "scale"], "at most 40,000 pixels on this server"),
        ({"image": "data:image/png;base64,AAAA"}, ["body", "image"], ""),
        ({"scale": 9}, ["body", "scale"], "less than or equal to 8"),
    ):
        response = client.post("/upscale", json={"image": data_url(picture()), **fields})
        assert response.status_code == 422, (fields, response.text)
        [error] = response.json()["detail"]
        assert error["loc"] == loc and words in error["msg"], error


def test_a1111_extra_single_image_through_webuiapi(make_client: Callable[..., TestClient]) -> None:
    api = make_client(engine="diffusers", registry_path=fixtures_registry_path(), device="cpu", dtype="float32",
                      warm_up_steps=0)  # fmt: skip
    with http_server(api) as url:
        host, port = url.removeprefix("http://").split(":")
        client = webuiapi.WebUIApi(host=host, port=int(port))
        answer = client.extra_single_image(image=picture(), upscaler_1="Tiny ESRGAN 4x", upscaling_resize=2)
        assert answer.image.size == (96, 64)
        assert "Postprocess upscaler: tiny-esrgan" in answer.info
        sized = client.extra_single_image(image=picture(), resize_mode=1, upscaling_resize_w=96,
                                          upscaling_resize_h=64)  # the same aspect: nothing to crop
        assert sized.image.size == (96, 64)
    for fields, words in (
        ({"gfpgan_visibility": 0.5}, "gfpgan_visibility: face restoration is not available here"),
        ({"upscaler_1": "R-ESRGAN 4x+"}, "upscaler_1: 'R-ESRGAN 4x+' is not available here"),
        ({"resize_mode": 1, "upscaling_resize_w": 100, "upscaling_resize_h": 100}, "upscaling_crop: cropping 48x32"),
        ({"upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 0.5}, "upscaler_2: a second upscaler"),
        ({"tile_size": 128}, "tile_size"),
    ):
        body = {"image": data_url(picture()).split(",", 1)[1], **fields}  # bare base64, as A1111's clients send
        refused = api.post("/sdapi/v1/extra-single-image", json=body)
        assert refused.status_code == 422 and words in refused.json()["detail"], (fields, refused.json())
