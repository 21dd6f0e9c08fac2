"""The hires fix: after the first pass, upscale (the latents, Lanczos, or an upscaler model read by spandrel)
and denoise again at the larger size; through the engine on the tiny fixtures, the native API, AUTOMATIC1111's
fields (the real ``webuiapi``) and its refusals."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import webuiapi
from fastapi.testclient import TestClient
from PIL import Image

from imagen.api.a1111_compat import Txt2ImgRequest
from imagen.api.a1111_compat import hires_from_fields as a1111_hires
from imagen.errors import JobCancelled
from imagen.generation.base import STEP_GENERATION, GenerationTask, HiresChoice, InputImages
from imagen.generation.diffusers.engine import DiffusersEngine
from imagen.outputs.png import a1111_parameters
from tests.conftest import submit, wait_status
from tests.engine_fixtures import ProgressLog, engine_settings, fixtures_registry, fixtures_registry_path, pixels, task
from tests.http_thread import http_server

TERMINAL = {"SUCCESS", "FAILURE", "REVOKED"}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> DiffusersEngine:
    return DiffusersEngine(fixtures_registry(), engine_settings(tmp_path_factory.mktemp("hires-engine")))


def hires_task(upscaler: str, width: int = 128, height: int = 128, **changes: Any) -> GenerationTask:
    return task(steps=4, hires=HiresChoice(width=width, height=height, upscaler=upscaler, denoise=0.5), **changes)


@pytest.mark.engine
@pytest.mark.parametrize("upscaler", ["latent", "lanczos", "tiny-esrgan"])
def test_each_upscaler_gives_the_final_size_through_the_real_pipelines(engine: DiffusersEngine, upscaler: str) -> None:
    log = ProgressLog()
    [image] = engine.generate(hires_task(upscaler, 192, 128), log, InputImages())
    assert image.image.size == (192, 128)
    again = engine.generate(hires_task(upscaler, 192, 128), lambda step, percent: None, InputImages())
    assert np.array_equal(pixels(again[0].image), pixels(image.image))  # same seed, same picture
    generation = [percent for step, percent in log.calls if step == STEP_GENERATION]
    assert generation == sorted(generation) and generation[-1] == 100  # two passes, one bar that never goes back
    split = 100 * 4 // (4 + 2)
    assert any(0 < percent <= split for percent in generation) and any(percent > split for percent in generation)


@pytest.mark.engine
def test_the_second_pass_changes_the_upscaled_first_pass_and_several_images_each_get_theirs(
    engine: DiffusersEngine,
) -> None:
    [plain] = engine.generate(task(steps=4), lambda step, percent: None, InputImages())
    first = plain.image.resize((128, 128), Image.Resampling.LANCZOS)
    [fixed] = engine.generate(hires_task("lanczos"), lambda step, percent: None, InputImages())
    assert np.abs(pixels(fixed.image) - pixels(first)).mean() > 1  # denoised again, not only resized
    two = engine.generate(hires_task("latent", num_images=2), lambda step, percent: None, InputImages())
    assert [image.image.size for image in two] == [(128, 128)] * 2
    assert not np.array_equal(pixels(two[0].image), pixels(two[1].image))  # seed and seed + 1


@pytest.mark.engine
@pytest.mark.parametrize("upscaler", ["latent", "tiny-esrgan"])
def test_a_cancel_during_the_second_pass_or_the_upscale_stops_the_job(engine: DiffusersEngine, upscaler: str) -> None:
    seen: list[int] = []

    def cancel_after_the_first_pass(step: str, percent: int) -> None:
        if step == STEP_GENERATION:
            seen.append(percent)
            if percent >= 100 * 4 // 6:  # the first pass is over
                raise JobCancelled("cancelled by its owner")

    with pytest.raises(JobCancelled):
        engine.generate(hires_task(upscaler), cancel_after_the_first_pass, InputImages())
    assert seen[-1] < 100
    [image] = engine.generate(hires_task(upscaler), lambda step, percent: None, InputImages())  # and goes on
    assert image.image.size == (128, 128)


def test_the_pngs_parameters_say_it_as_a1111_writes_it() -> None:
    metadata = {**task(steps=20).as_dict(), "hires": HiresChoice(1536, 1536, "latent", 10, 0.5, 1.5).as_dict(),
                "width": 1024, "height": 1024, "sampler": "Euler"}
    settings = a1111_parameters(metadata).splitlines()[-1]
    assert "Size: 1024x1024" in settings
    assert "Denoising strength: 0.5, Hires upscale: 1.5, Hires steps: 10, Hires upscaler: Latent" in settings
    targeted = {**metadata, "hires": HiresChoice(1280, 960, "tiny-esrgan", 0, 0.4, None).as_dict()}
    assert "Hires resize: 1280x960, Hires upscaler: tiny-esrgan" in a1111_parameters(targeted)
    assert GenerationTask.from_dict(task(hires=HiresChoice(96, 64)).as_dict()).hires == HiresChoice(96, 64)


# -- the API ------------------------------------------------------------------------------------------------
@pytest.fixture
def api(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(engine="diffusers", registry_path=fixtures_registry_path(), device="cpu", dtype="float32",
                       max_output_pixels=160 * 160)


def refusal(client: TestClient, **fields: Any) -> dict[str, Any]:
    response = client.post("/generate", json={"prompt": "a fox", **fields})
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    return error  # type: ignore[no-any-return]


@pytest.mark.engine
def test_a_hires_job_through_the_service(api: TestClient) -> None:
    upscalers = api.get("/upscalers").json()["upscalers"]
    assert [(u["id"], u["kind"]) for u in upscalers] == [("latent", "latent"), ("lanczos", "pixel"),
                                                          ("tiny-esrgan", "model")]
    job = submit(api, "a fox", steps=10, seed=3, hires={"scale": 2, "upscaler": "tiny-esrgan", "steps": 4})
    done = wait_status(api, job, TERMINAL, timeout=120)
    assert done["status"] == "SUCCESS", done
    image = Image.open(io.BytesIO(api.get(f"/image/{job}").content))
    assert image.size == (128, 128)
    hires = json.loads(image.info["imagen"])["hires"]
    assert hires == {"width": 128, "height": 128, "upscaler": "tiny-esrgan", "steps": 4, "denoise": 0.5, "scale": 2.0}
    assert "Hires upscale: 2.0, Hires steps: 4, Hires upscaler: tiny-esrgan" in image.info["parameters"]


@pytest.mark.engine
@pytest.mark.parametrize(
    ("fields", "loc", "words"),
    [
        ({"hires": {"upscaler": "4x-UltraSharp"}}, ["body", "hires", "upscaler"],
         "unknown upscaler '4x-UltraSharp'; available: latent, lanczos, tiny-esrgan"),
        ({"hires": {"scale": 3}}, ["body", "hires", "scale"], "at most 25,600 pixels on this server"),
        ({"hires": {"width": 256}}, ["body", "hires", "width"], "not 256×256"),
        ({"hires": {"denoise": 0.05}, "steps": 10}, ["body", "hires", "denoise"], "runs no step: at least 0.1"),
        ({"hires": {"scale": 5}}, ["body", "hires", "scale"], "less than or equal to 4"),
        ({"hires": {"scale": 2, "sharpen": 1}}, ["body", "hires", "sharpen"], "Extra inputs"),
    ],
)
def test_a_hires_fix_that_cannot_be_is_refused_naming_the_field(
    api: TestClient, fields: dict[str, Any], loc: list[str], words: str
) -> None:
    error = refusal(api, **fields)
    assert error["loc"] == loc and words in error["msg"], error


# -- AUTOMATIC1111 ------------------------------------------------------------------------------------------
@pytest.mark.engine
def test_webuiapi_enable_hr_makes_the_larger_picture_and_fields_we_cannot_honour_are_refused(
    make_client: Callable[..., TestClient],
) -> None:
    api = make_client(engine="diffusers", registry_path=fixtures_registry_path(), device="cpu", dtype="float32",
                      max_output_pixels=1024 * 1024)
    with http_server(api) as url:
        host, port = url.removeprefix("http://").split(":")
        client = webuiapi.WebUIApi(host=host, port=int(port))
        names = [u["name"] for u in client.get_upscalers()]
        assert names == ["None", "Lanczos", "Tiny ESRGAN 4x"]
        answer = client.txt2img(prompt="a fox", steps=10, seed=7, enable_hr=True, hr_scale=1.5,
                                hr_upscaler="Lanczos", denoising_strength=0.5, alwayson_scripts={})
        assert answer.image.size == (768, 768)  # webuiapi's 512² first pass
        assert "Hires upscale: 1.5, Hires upscaler: Lanczos" in answer.info["infotexts"][0]
        for fields, words in (
            ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler: 'R-ESRGAN 4x+' is not available"),
            ({"enable_hr": True, "hr_scale": 4}, "hr_scale: the hires fix's final size"),
            ({"enable_hr": True, "hr_prompt": "another prompt"}, "hr_prompt: a second pass with its own prompt"),
            ({"restore_faces": True}, "restore_faces: face restoration is not available here"),
            ({"tiling": True}, "tiling: seamless tiling"),
            ({"styles": ["cinematic"]}, "styles: there are no saved styles"),
            ({"subseed_strength": 0.3}, "subseed_strength: variation seeds"),
        ):
            body = {"prompt": "a fox", "steps": 10, "width": 512, "height": 512, **fields}
            response = api.post("/sdapi/v1/txt2img", json=body)
            assert response.status_code == 422, (fields, response.text)
            assert words in response.json()["detail"], (fields, response.json())


def test_a1111_hr_upscaler_names_map_onto_ours() -> None:
    """By A1111 name, a registry upscaler's name or id (the model itself runs in the service test above)."""
    registry = fixtures_registry()
    for name, ours in (("Latent", "latent"), (None, "latent"), ("None", "lanczos"), ("Lanczos", "lanczos"),
                       ("Tiny ESRGAN 4x", "tiny-esrgan"), ("tiny-esrgan", "tiny-esrgan")):
        fields = Txt2ImgRequest.model_validate({"prompt": "x", "enable_hr": True, "hr_upscaler": name})
        hires, problem = a1111_hires(fields, registry)
        assert problem is None and hires is not None and hires["upscaler"] == ours, name
    off = Txt2ImgRequest.model_validate({"prompt": "x", "enable_hr": False, "hr_scale": 3})
    assert a1111_hires(off, registry) == (None, None)  # off: its fields mean nothing, as in A1111
    resized = Txt2ImgRequest.model_validate({"prompt": "x", "enable_hr": True, "hr_resize_x": 640,
                                             "hr_second_pass_steps": 12, "denoising_strength": 0.4})
    assert a1111_hires(resized, registry) == (
        {"scale": 2.0, "upscaler": "latent", "denoise": 0.4, "steps": 12, "width": 640}, None)
