"""ControlNet: the registry's ControlNets, the ``controlnets`` field checked at submission, the real pipelines on
the tiny fixtures (plain and Union, both file layouts, several units, txt2img, img2img and inpainting), jobs on
both backends, and AUTOMATIC1111's ControlNet extension through the real ``webuiapi``."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webuiapi
import yaml
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from imagen.errors import JobCancelled, RegistryError
from imagen.generation.base import ControlNetChoice, GenerationTask, InputImages, LoraChoice
from imagen.generation.diffusers.engine import DiffusersEngine
from imagen.inputs.control_maps import detect, fit
from imagen.registry import load_registry
from tests.celery_support import shared_redis
from tests.conftest import REFERENCE_REGISTRY, submit, wait_status
from tests.engine_fixtures import engine_settings, fixtures_registry, fixtures_registry_path
from tests.http_thread import http_server
from tests.test_image_inputs import data_url, error_for, png_claiming
from tests.test_job_contract import TERMINAL, job_system

__all__ = ["job_system", "shared_redis"]  # fixtures


def silhouette(size: tuple[int, int] = (64, 64), box: tuple[int, int, int, int] = (12, 12, 52, 52)) -> Image.Image:
    image = Image.new("RGB", size)
    ImageDraw.Draw(image).ellipse(box, fill="white")
    return image


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(image: Image.Image) -> np.ndarray[Any, Any]:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


# -- control maps ----------------------------------------------------------------------------------------
def test_canny_draws_the_outline_and_none_keeps_the_image() -> None:
    circle = silhouette((128, 128), (32, 32, 96, 96))
    edges = pixels(detect(circle, "canny", 100, 200))[..., 0] > 0
    assert edges[64, 30:34].any() and edges[64, 94:98].any()  # on the outline
    assert not edges[64, 64] and not edges[5, 5]  # neither inside nor outside
    assert 0.01 < edges.mean() < 0.1
    assert detect(circle, "canny", 100, 200, processor_res=64).size == (64, 64)  # short side at processor_res
    assert detect(circle, "none").tobytes() == circle.tobytes()


def test_each_resize_mode_fits_the_map_to_the_picture() -> None:
    wide = Image.new("RGB", (200, 100), "white")
    assert fit(wide, 64, 64, "stretch").size == (64, 64) and pixels(fit(wide, 64, 64, "stretch")).min() == 255
    assert pixels(fit(wide, 64, 64, "crop")).min() == 255  # covered, the overflow cropped: white everywhere
    filled = pixels(fit(wide, 64, 64, "fill"))
    assert filled[0, 32].max() == 0 and filled[32, 32].min() == 255  # black bands above and below


# -- the registry and the lists ----------------------------------------------------------------------------
@pytest.fixture
def api(make_client: Callable[..., TestClient], tmp_path: Path) -> TestClient:
    raw = yaml.safe_load(REFERENCE_REGISTRY)
    raw["models"].append({"id": "other-family", "name": "Another", "path": "models/other.safetensors",
                          "base": "sd15", "size": 64})  # fmt: skip
    registry = tmp_path / "controlnet-registry.yaml"
    registry.write_text(yaml.safe_dump(raw))
    return make_client(engine="test-pattern", registry_path=registry)


def test_controlnets_are_listed_with_the_models_they_fit(api: TestClient) -> None:
    listed = api.get("/controlnets").json()
    assert [(c["id"], c["base"], c["control_types"], c["models"]) for c in listed["controlnets"]] == [
        ("canny-sdxl", "sdxl", None, ["sdxl-base", "pony-xl-v6"]),
        ("union-sdxl", "sdxl", ["canny", "depth"], ["sdxl-base", "pony-xl-v6"]),
    ]
    assert [p["name"] for p in listed["preprocessors"]] == ["none", "canny"]
    models = {m["id"]: m for m in api.get("/models").json()["models"]}
    assert models["sdxl-base"]["controlnets"] == ["canny-sdxl", "union-sdxl"]
    assert (models["other-family"]["base"], models["other-family"]["controlnets"]) == ("sd15", [])


def test_a_union_entry_names_known_control_types(tmp_path: Path) -> None:
    raw = yaml.safe_load(REFERENCE_REGISTRY)
    raw["controlnets"] = [{"id": "u", "name": "U", "path": "u", "control_types": ["canny", "telepathy"]}]
    registry = tmp_path / "bad.yaml"
    registry.write_text(yaml.safe_dump(raw))
    with pytest.raises(RegistryError, match="telepathy"):
        load_registry(registry)


def unit(**fields: Any) -> dict[str, Any]:
    return {"model": "canny-sdxl", "image": data_url(png(silhouette())), **fields}


@pytest.mark.parametrize(
    ("controlnets", "field", "says"),
    [
        ([unit(model="depth-xl")], "model", "unknown ControlNet 'depth-xl'; available: canny-sdxl, union-sdxl"),
        ([unit(image=data_url(b"not an image"))], "image", "not a PNG, JPEG or WebP"),
        ([unit(image=data_url(png_claiming(100_000, 100_000)))], "image", "pixels"),
        ([unit(image="upload:0123456789abcdef0123456789abcdef")], "image", "unknown or expired upload"),
        ([unit(start=0.6, end=0.4)], "start", "must be before end"),
        ([unit(scale=2.5)], "scale", "less than or equal to 2"),
        ([unit()] * 4, "controlnets", "at most 3 ControlNets per request"),
        ([unit(preprocessor="depth_midas")], "preprocessor", "available here: none, canny"),
        ([unit(model="union-sdxl")], "control_type", "must be one of canny, depth"),
        ([unit(control_type="canny")], "control_type", "ControlNet Union models only"),
        ([unit(resize_mode="Just Resize")], "resize_mode", "'crop', 'fill' or 'stretch'"),
        ([unit(preprocessor="canny", low_threshold=200, high_threshold=100)], "low_threshold", "not be above"),
        ([unit(), unit(model="union-sdxl", control_type="canny")], "controlnets", "cannot guide one job together"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_each_bad_unit_is_a_422_naming_its_field(
    api: TestClient, controlnets: list[dict[str, Any]], field: str, says: str
) -> None:
    assert says in error_for(api.post("/generate", json={"prompt": "x", "controlnets": controlnets}), field)


def test_a_controlnet_of_another_base_does_not_fit(api: TestClient) -> None:
    answer = api.post("/generate", json={"prompt": "x", "model": "other-family", "controlnets": [unit()]})
    assert "does not fit model 'other-family' (sd15); the ControlNets that fit it: none" in error_for(answer, "model")


def test_the_job_records_its_units_and_stores_its_control_images_beside_it(
    job_system: Callable[..., TestClient],
) -> None:
    client = job_system(engine="test-pattern")
    job_id = submit(client, "guided", controlnets=[unit(preprocessor="canny", scale=0.7, end=0.8)])
    done = wait_status(client, job_id, TERMINAL)
    assert done["status"] == "SUCCESS", done
    recorded = done["result"]["metadata"]["controlnets"]
    assert recorded == [{
        "model": "canny-sdxl", "scale": 0.7, "start": 0.0, "end": 0.8, "preprocessor": "canny", "resize_mode": "crop",
        "control_type": None, "low_threshold": 100, "high_threshold": 200, "processor_res": None,
    }]  # fmt: skip
    assert "data:image" not in json.dumps(done)  # the image stays with the job's inputs
    parameters = Image.open(io.BytesIO(client.get(f"/image/{job_id}").content)).info["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: canny-sdxl, Weight: 0.7, Resize Mode: Crop and Resize' in parameters


# -- the real pipelines on the tiny fixtures ---------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DiffusersEngine]:
    built = DiffusersEngine(fixtures_registry(), engine_settings(tmp_path_factory.mktemp("controlnet-engine")))
    yield built
    built.close()


BASE = GenerationTask(prompt="a lighthouse", negative_prompt=None, model="sdxl-base", steps=4, guidance_scale=5.0,
                      seed=3)  # fmt: skip
CONTROL = InputImages(controls=(silhouette(),))


def draw(engine: DiffusersEngine, task: GenerationTask, inputs: InputImages | None = None) -> Image.Image:
    return engine.generate(task, lambda step, percent: None, inputs or InputImages())[0].image


def guided(*units: ControlNetChoice) -> GenerationTask:
    return replace(BASE, controlnets=units)


def test_a_controlnet_guides_the_picture_and_at_scale_0_changes_nothing(engine: DiffusersEngine) -> None:
    plain = pixels(draw(engine, BASE))
    controlled = pixels(draw(engine, guided(ControlNetChoice("tiny-canny")), CONTROL))
    assert np.abs(controlled - plain).mean() > 2
    assert np.array_equal(pixels(draw(engine, guided(ControlNetChoice("tiny-canny", scale=0.0)), CONTROL)), plain)
    # guiding only the last steps changes the picture less than guiding them all
    late = pixels(draw(engine, guided(ControlNetChoice("tiny-canny", start=0.75)), CONTROL))
    assert 0 < np.abs(late - plain).mean() < np.abs(controlled - plain).mean()


def test_a_single_file_controlnet_draws_what_its_folder_draws(engine: DiffusersEngine) -> None:
    folder = draw(engine, guided(ControlNetChoice("tiny-canny")), CONTROL)
    single = draw(engine, guided(ControlNetChoice("tiny-canny-single")), CONTROL)
    assert folder.tobytes() == single.tobytes()


def test_union_and_several_units_run_with_loras_img2img_and_inpainting(engine: DiffusersEngine) -> None:
    plain = pixels(draw(engine, BASE))
    union = pixels(draw(engine, guided(ControlNetChoice("tiny-union", control_type="canny")), CONTROL))
    depth = pixels(draw(engine, guided(ControlNetChoice("tiny-union", control_type="depth")), CONTROL))
    assert np.abs(union - plain).mean() > 1 and np.abs(union - depth).mean() > 0  # the type is the Union's input
    two_maps = InputImages(controls=(silhouette(), silhouette(box=(0, 0, 20, 20))))
    one = pixels(draw(engine, guided(ControlNetChoice("tiny-canny")), CONTROL))
    two = pixels(draw(engine, guided(ControlNetChoice("tiny-canny"), ControlNetChoice("tiny-canny", scale=0.8)),
                      two_maps))  # fmt: skip
    assert np.abs(two - one).mean() > 1
    init = draw(engine, BASE)
    mask = Image.new("L", (64, 64))
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)
    with_lora = replace(guided(ControlNetChoice("tiny-canny", preprocessor="canny")),
                        loras=(LoraChoice("anime-style", 0.8),), init_image=True, strength=0.6,
                        ip_strength=0.5)  # fmt: skip
    img2img = engine.generate(with_lora, lambda step, percent: None, InputImages(init=init, controls=(silhouette(),)))
    assert img2img[0].extra_metadata["controlnets"][0]["preprocessor"] == "canny"
    inpaint = replace(guided(ControlNetChoice("tiny-union", control_type="canny"),
                             ControlNetChoice("tiny-union", control_type="depth")),
                      init_image=True, mask_image=True, strength=0.8)  # fmt: skip
    repainted = pixels(draw(engine, inpaint, InputImages(init=init, mask=mask, controls=two_maps.controls)))
    assert np.array_equal(repainted[:, 40:], pixels(init)[:, 40:])  # the unmasked half is kept


def test_a_controlnet_job_makes_previews_and_can_be_cancelled(engine: DiffusersEngine) -> None:
    previews: list[int] = []
    engine.preview = lambda step, jpeg: previews.append(step)
    try:
        draw(engine, replace(guided(ControlNetChoice("tiny-canny")), steps=10), CONTROL)
    finally:
        engine.preview = None
    assert previews == [5, 10]

    def cancel_at_half(step: str, percent: int) -> None:
        if step == "generation_gpu" and percent >= 50:
            raise JobCancelled

    with pytest.raises(JobCancelled):
        engine.generate(replace(guided(ControlNetChoice("tiny-canny")), steps=10), cancel_at_half, CONTROL)
    assert draw(engine, guided(ControlNetChoice("tiny-canny")), CONTROL).size == (64, 64)  # the next job runs


def test_each_controlnet_is_read_once_and_switching_reads_nothing(engine: DiffusersEngine) -> None:
    for name in ("tiny-canny", "tiny-canny-single"):
        draw(engine, guided(ControlNetChoice(name)), CONTROL)
    loads, model_loads = engine.stats.controlnet_loads, engine.stats.model_loads
    for _ in range(3):
        for name in ("tiny-canny", "tiny-canny-single"):
            draw(engine, guided(ControlNetChoice(name)), CONTROL)
    assert (engine.stats.controlnet_loads, engine.stats.model_loads) == (loads, model_loads)


# -- through the service, on both backends -----------------------------------------------------------------
def test_a_controlnet_job_on_each_backend(job_system: Callable[..., TestClient]) -> None:
    client = job_system(
        engine="diffusers", registry_path=fixtures_registry_path(), device="cpu", dtype="float32", warm_up_steps=0
    )
    control = data_url(png(silhouette()))
    fields = {"steps": 10, "seed": 5, "guidance_scale": 5.0}
    jobs = {
        name: submit(client, "a lighthouse", **fields, **({"controlnets": units} if units else {}))
        for name, units in (
            ("plain", None),
            ("guided", [{"model": "tiny-canny", "image": control}]),
            ("scale 0", [{"model": "tiny-canny", "image": control, "scale": 0.0}]),
        )
    }
    images = {}
    for name, job_id in jobs.items():
        assert wait_status(client, job_id, TERMINAL, timeout=120)["status"] == "SUCCESS"
        images[name] = client.get(f"/image/{job_id}").content
    decoded = {name: pixels(Image.open(io.BytesIO(data))) for name, data in images.items()}
    assert np.abs(decoded["guided"] - decoded["plain"]).mean() > 2  # the control image reached the engine
    assert np.array_equal(decoded["scale 0"], decoded["plain"])
    assert "ControlNet 0:" in Image.open(io.BytesIO(images["guided"])).info["parameters"]


# -- AUTOMATIC1111's ControlNet extension, through webuiapi -------------------------------------------------
@pytest.fixture
def a1111(make_client: Callable[..., TestClient]) -> Iterator[webuiapi.WebUIApi]:
    client = make_client(engine="diffusers", registry_path=fixtures_registry_path(), device="cpu", dtype="float32",
                         warm_up_steps=0)  # fmt: skip
    with http_server(client) as url:
        host, port = url.removeprefix("http://").split(":")
        yield webuiapi.WebUIApi(host=host, port=int(port))


def test_webuiapi_controlnet_units_on_txt2img_and_img2img(a1111: webuiapi.WebUIApi) -> None:
    api = a1111
    assert api.controlnet_model_list() == ["tiny-canny", "tiny-canny-single", "tiny-union"]
    assert api.controlnet_module_list() == ["none", "canny"]
    detected = api.controlnet_detect([silhouette((128, 128), (32, 32, 96, 96))], module="canny", processor_res=64,
                                     threshold_a=100, threshold_b=200)  # fmt: skip
    edge_map = detected.image
    assert edge_map.size == (64, 64) and 0 < (pixels(edge_map) > 0).mean() < 0.2

    # webuiapi always sends a size, 512 at the least (the API's smallest side)
    common: dict[str, Any] = {"prompt": "a lighthouse", "seed": 5, "steps": 10, "cfg_scale": 5.0, "width": 512,
                              "height": 512}  # fmt: skip
    plain = api.txt2img(**common, alwayson_scripts={}).image
    unit = webuiapi.ControlNetUnit(image=silhouette((512, 512), (96, 96, 416, 416)), module="canny",
                                   model="tiny-canny", pixel_perfect=True, threshold_a=100, threshold_b=200)
    # webuiapi writes the units into its `alwayson_scripts` default, one dict shared by every later call in the
    # process (a mutable default argument): each call here brings its own
    guided_result = api.txt2img(**common, controlnet_units=[unit], alwayson_scripts={})
    assert np.abs(pixels(guided_result.image) - pixels(plain)).mean() > 2
    assert 'ControlNet 0: "Module: canny, Model: tiny-canny, Weight: 1.0, Resize Mode: Resize and Fill' in (
        guided_result.info["infotexts"][0]
    )
    # img2img: a unit without its own image takes the init image, as the extension does
    repainted = api.img2img(images=[plain], denoising_strength=0.6, seed=5, steps=10, prompt="a lighthouse",
                            controlnet_units=[webuiapi.ControlNetUnit(model="tiny-canny [0000]", module="canny")],
                            alwayson_scripts={})
    assert repainted.image.size == (512, 512)


@pytest.mark.parametrize(
    ("unit", "says"),
    [
        ({"control_mode": 1}, "control_mode: only \"Balanced\" (0) is available here"),
        ({"low_vram": True}, "low_vram: memory placement is this server's own"),
        ({"mask": "iVBORw0KGgo="}, "a ControlNet unit's own mask is not available here"),
        ({"inpaint_crop_input_image": True}, "field 'inpaint_crop_input_image' is not available here"),
        ({"model": "depth-xl"}, "alwayson_scripts.controlnet.args.0.model: unknown ControlNet 'depth-xl'"),
        ({"weight": 3}, "alwayson_scripts.controlnet.args.0.weight: Input should be less than or equal to 2"),
        ({"module": "openpose"}, "args.0.module: available here: none, canny"),
        ({"enabled": False, "weight": "x"}, "args.0.weight: Input should be a valid number"),
        ({"resize_mode": 7}, "resize_mode: one of Just Resize, Crop and Resize, Resize and Fill"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_unit_the_server_cannot_honour_is_a_422_naming_its_field(api: TestClient, unit: dict[str, Any],
                                                                   says: str) -> None:  # fmt: skip
    fields = {"model": "canny-sdxl", "image": base64.b64encode(png(silhouette())).decode(), **unit}
    answer = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "alwayson_scripts": {"controlnet": {"args": [fields]}}})
    assert answer.status_code == 422 and says in answer.json()["detail"], answer.text


def test_another_script_is_refused_unless_it_is_off(api: TestClient) -> None:
    answer = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "alwayson_scripts": {"ADetailer": {"args": [True]}}})
    assert answer.status_code == 422 and "alwayson_scripts.ADetailer: this server has no such script" in answer.text
    disabled = webuiapi.ControlNetUnit(image=silhouette(), model="canny-sdxl", enabled=False).to_dict()
    off = {"ADetailer": {"args": [False]}, "ControlNet": {"args": [disabled]}}
    answer = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "alwayson_scripts": off})
    assert answer.status_code == 200 and "ControlNet" not in json.loads(answer.json()["info"])["infotexts"][0]
    refused = api.post("/controlnet/detect", json={"controlnet_module": "depth", "controlnet_input_images": ["x"]})
    assert refused.status_code == 422 and "available: none, canny" in refused.text
