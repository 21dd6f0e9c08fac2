"""Bad input is a 4xx that says what is wrong, never a 500: CMYK JPEGs, PNG metadata
bombs, bodies that are not UTF-8, JSON nested too deep, NaN and Infinity, booleans given as integers, and
the 405's ``Allow`` header. Each request goes through the real app (its middlewares, routes and handlers)."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from imagen.access.keys import add_key
from imagen.api.json_body import MAX_DEPTH
from tests.conftest import submit, wait_status

JSON = {"content-type": "application/json"}
METADATA_BOMB = "a compressed metadata chunk (PNG zTXt, iTXt or iCCP) expands to more than 1 MB"


def _png(mode: str = "RGB", size: tuple[int, int] = (64, 64), color: Any = (200, 30, 30), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _metadata_bomb(kind: str, after_pixels: bool = False) -> bytes:
    """A ~70 KB PNG whose zTXt or iCCP chunk expands to 70 MB, past Pillow's limit."""
    plain = _png(size=(8, 8))
    payload = zlib.compress(b"\0" * (70 * 1024 * 1024), 9)
    chunk = _chunk(b"zTXt", b"Comment\0\0" + payload) if kind == "zTXt" else _chunk(b"iCCP", b"icc\0\0" + payload)
    at = plain.index(b"IEND") - 4 if after_pixels else 33  # before IEND, or right after IHDR
    return plain[:at] + chunk + plain[at:]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _a1111_detail(response: httpx.Response) -> str:
    assert response.status_code == 422, response.text[:500]
    body = response.json()
    assert body["error"] == "ValidationError"
    detail: str = body["detail"]
    return detail


def _openai_error(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 400, response.text[:500]
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error


@pytest.fixture
def keyed(make_client: Callable[..., TestClient], tmp_path: Path) -> TestClient:
    """The app with API keys on, as a public service runs it; the client sends its key."""
    keys = tmp_path / "keys.yaml"
    key = add_key(keys, "owner")
    client = make_client(api_keys_file=keys)
    client.headers["Authorization"] = f"Bearer {key}"
    return client


# -- images --------------------------------------------------------------------------------------------------------
def test_a_cmyk_jpeg_is_taken_as_rgb_everywhere(keyed: TestClient) -> None:
    cmyk = _png("CMYK", (96, 64), (0, 255, 255, 0), fmt="JPEG")  # red, in print colours
    uploaded = keyed.post("/uploads", files={"file": ("print.jpg", cmyk, "image/jpeg")})
    assert uploaded.status_code == 201, uploaded.text
    upload_id = uploaded.json()["upload_id"]
    job_id = submit(keyed, "cmyk", init_image=f"upload:{upload_id}", mask_image=f"upload:{upload_id}")
    assert wait_status(keyed, job_id, {"SUCCESS", "FAILURE"})["status"] == "SUCCESS"
    job_id = submit(keyed, "cmyk url", init_image="data:image/jpeg;base64," + _b64(cmyk))
    assert wait_status(keyed, job_id, {"SUCCESS", "FAILURE"})["status"] == "SUCCESS"
    answer = keyed.post("/sdapi/v1/img2img", json={"prompt": "cmyk", "init_images": [_b64(cmyk)], "steps": 10})
    assert answer.status_code == 200, answer.text[:500]


@pytest.mark.parametrize("kind", ["zTXt", "iCCP"])
def test_a_png_metadata_bomb_is_a_422_naming_the_field(keyed: TestClient, kind: str) -> None:
    bomb = _metadata_bomb(kind)
    uploaded = keyed.post("/uploads", files={"file": ("bomb.png", bomb, "image/png")})
    assert uploaded.status_code == 422, uploaded.text[:500]
    [error] = uploaded.json()["detail"]
    assert error["loc"] == ["body", "file"] and error["msg"].startswith(METADATA_BOMB)

    as_url = "data:image/png;base64," + _b64(bomb)
    generated = keyed.post("/generate", json={"prompt": "x", "init_image": as_url})
    assert generated.status_code == 422, generated.text[:500]
    [error] = generated.json()["detail"]
    assert error["loc"] == ["body", "init_image"] and error["msg"].startswith(METADATA_BOMB)

    for body in ({"init_images": [_b64(bomb)]}, {"init_images": [_b64(_png())], "mask": _b64(bomb)}):
        answer = keyed.post("/sdapi/v1/img2img", json={"prompt": "x", **body})
        field = "mask" if "mask" in body else "init_images"
        assert _a1111_detail(answer).startswith(f"{field}: {METADATA_BOMB}")

    edited = keyed.post("/v1/images/edits", files={"image": ("bomb.png", bomb, "image/png")}, data={"prompt": "x"})
    assert _openai_error(edited)["param"] == "image"


def test_a_metadata_bomb_after_the_pixels_says_so_too(keyed: TestClient) -> None:
    uploaded = keyed.post("/uploads", files={"file": ("late.png", _metadata_bomb("zTXt", after_pixels=True))})
    assert uploaded.status_code == 422 and uploaded.json()["detail"][0]["msg"].startswith(METADATA_BOMB)


# -- bodies --------------------------------------------------------------------------------------------------------
NOT_UTF8 = [b"\xff\xfe", b"\xff\xfe\x00", b'{"prompt": "caf\xe9"}']


@pytest.mark.parametrize("body", NOT_UTF8)
def test_a_body_that_is_not_utf8_is_refused_as_such(keyed: TestClient, body: bytes) -> None:
    assert "UTF-8" in _openai_error(keyed.post("/v1/images/generations", content=body, headers=JSON))["message"]
    assert "UTF-8" in _a1111_detail(keyed.post("/sdapi/v1/txt2img", content=body, headers=JSON))
    assert "UTF-8" in _a1111_detail(keyed.post("/sdapi/v1/options", content=body, headers=JSON))
    native = keyed.post("/generate", content=body, headers=JSON)
    assert native.status_code in (400, 422), native.text  # FastAPI reads "\xff\xfe" as UTF-16: a JSON error
    if native.status_code == 400:
        assert native.json()["detail"].startswith("Corps de requête illisible : ce n'est pas du texte UTF-8 (octet ")


def _nested(depth: int, inner: bytes = b"1") -> bytes:
    return b'{"prompt": "x", "extra": ' + b"[" * depth + inner + b"]" * depth + b"}"


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 900, 100_000])
def test_deeply_nested_json_is_refused_on_every_json_route(keyed: TestClient, depth: int) -> None:
    body = _nested(depth)
    message = f"the body's JSON nests more than {MAX_DEPTH} levels of arrays and objects"
    assert _openai_error(keyed.post("/v1/images/generations", content=body, headers=JSON))["message"] == message
    for route in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options"):
        assert _a1111_detail(keyed.post(route, content=body, headers=JSON)) == message
    native = keyed.post("/generate", content=body, headers=JSON)
    if depth < 1000:  # parsed: refused as an unknown field, its echo cut short
        assert native.status_code == 422 and native.json()["detail"][0]["loc"] == ["body", "extra"]
    else:
        assert native.status_code == 400
        assert native.json() == {"detail": "Corps de requête illisible : JSON imbriqué trop profondément"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"prompt": "x", "cfg_scale": NaN}', "cfg_scale"),
        (b'{"prompt": "x", "subseed_strength": NaN}', "subseed_strength"),  # a field A1111 clients send, unused here
        (b'{"prompt": "x", "override_settings": {"eta_noise_seed": Infinity}}', "override_settings.eta_noise_seed"),
        (b'{"prompt": "x", "alwayson_scripts": {"x": {"args": [1, -Infinity]}}}', "alwayson_scripts.x.args[1]"),
        (b'{"prompt": "x", "s_noise": 1e999}', "s_noise"),
    ],
)  # fmt: skip
def test_nan_and_infinity_are_refused_at_submission_naming_the_field(
    keyed: TestClient, execution_log: Path, body: bytes, field: str
) -> None:
    detail = _a1111_detail(keyed.post("/sdapi/v1/txt2img", content=body, headers=JSON))
    assert detail.startswith(f"{field}: NaN, Infinity and numbers past ±1.8e308 are not accepted")
    assert not execution_log.exists()  # no job ran


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (rb'{"prompt": "x", "styles": ["\ud800"]}', "styles[0]"),
        (rb'{"prompt": "x", "sampler_name": "\udfff"}', "sampler_name"),
    ],
)  # fmt: skip
def test_lone_surrogates_are_refused_at_submission_naming_the_field(
    keyed: TestClient, execution_log: Path, body: bytes, field: str
) -> None:
    """JSON can carry "\\ud800"; no answer that echoes it can: the job ran, then its answer failed."""
    detail = _a1111_detail(keyed.post("/sdapi/v1/txt2img", content=body, headers=JSON))
    assert detail == f"{field}: not valid Unicode text (a lone surrogate)"
    refused = keyed.post("/sdapi/v1/txt2img", content=rb'{"prompt": "x", "\ud800": 1}', headers=JSON)
    assert "a key is not valid Unicode text" in _a1111_detail(refused)
    assert not execution_log.exists()


def test_openai_nan_and_infinity_name_the_param(keyed: TestClient, execution_log: Path) -> None:
    for body, param in ((b'{"prompt": "x", "guidance_scale": NaN}', "guidance_scale"),
                        (b'{"prompt": "x", "loras": [{"name": "anime-style", "weight": Infinity}]}', "loras")):
        assert _openai_error(keyed.post("/v1/images/generations", content=body, headers=JSON))["param"] == param
    assert not execution_log.exists()


def test_lora_tag_weights_out_of_range_are_a_422(keyed: TestClient) -> None:
    for tag in ("<lora:anime-style:5>", "<lora:anime-style:nan>", "<lora:anime-style:-1>"):
        detail = _a1111_detail(keyed.post("/sdapi/v1/txt2img", json={"prompt": f"fox {tag}"}))
        assert detail.startswith("prompt's <lora:…> tags.0.weight: "), detail


# -- types ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [("seed", False), ("seed", True), ("steps", "30"), ("batch_size", True), ("width", "512"), ("n_iter", False),
     ("inpainting_mask_invert", True), ("cfg_scale", "7"), ("denoising_strength", True), ("seed", -2)],
)  # fmt: skip
def test_a1111_numbers_are_strict(keyed: TestClient, execution_log: Path, field: str, value: Any) -> None:
    detail = _a1111_detail(keyed.post("/sdapi/v1/txt2img", json={"prompt": "x", field: value}))
    assert detail.startswith(f"{field}: "), detail
    assert not execution_log.exists()


def test_a1111_fields_it_reads_are_never_ignored(keyed: TestClient) -> None:
    checkpoint = {"prompt": "x", "override_settings": {"sd_model_checkpoint": 5}}
    assert _a1111_detail(keyed.post("/sdapi/v1/txt2img", json=checkpoint)).startswith(
        "override_settings.sd_model_checkpoint: "
    )
    unknown = {"prompt": "x", "override_settings": {"sd_model_checkpoint": "nope"}}
    assert "unknown model 'nope'" in _a1111_detail(keyed.post("/sdapi/v1/txt2img", json=unknown))
    # webuiapi sends both names; the old one is checked as well
    both = {"prompt": "x", "sampler_name": "Euler a", "sampler_index": "Nope"}
    assert _a1111_detail(keyed.post("/sdapi/v1/txt2img", json=both)).startswith("sampler_index: sampler 'Nope'")
    assert keyed.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "", "steps": 10}).status_code == 200


def test_openai_numbers_are_strict(keyed: TestClient) -> None:
    for field, value in (("seed", False), ("n", True), ("steps", "30"), ("output_compression", True)):
        error = _openai_error(keyed.post("/v1/images/generations", json={"prompt": "x", field: value}))
        assert error["param"] == {"n": "n"}.get(field, field)


def test_a_prompt_blank_to_python_or_to_json_schema_is_refused_on_every_route(keyed: TestClient) -> None:
    """U+001E is a space to Python, not to JSON Schema's (ECMAScript's) regex; U+FEFF the other way round. Both
    are blank here, and the document's pattern says so: what it calls valid is accepted."""
    for prompt in ("\x1e", "\ufeff", " \x85\u3000 "):
        assert keyed.post("/generate", json={"prompt": prompt}).status_code == 422
        assert _openai_error(keyed.post("/v1/images/generations", json={"prompt": prompt}))["param"] == "prompt"
        assert _a1111_detail(keyed.post("/sdapi/v1/txt2img", json={"prompt": prompt})).startswith("prompt: ")
    document = keyed.get("/openapi.json").json()
    schemas, paths = document["components"]["schemas"], document["paths"]
    patterns = {
        schemas["GenerationRequest"]["properties"]["prompt"]["pattern"],
        schemas["Txt2ImgRequest"]["properties"]["prompt"]["pattern"],
        paths["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"][
            "prompt"
        ]["pattern"],
    }
    assert patterns == {r"[^\s\u001c-\u001f\u0085\ufeff]"}


def test_an_empty_txt2img_is_a_documented_422(keyed: TestClient) -> None:
    assert _a1111_detail(keyed.post("/sdapi/v1/txt2img", json={})) == "prompt: Field required"
    assert _a1111_detail(keyed.post("/sdapi/v1/img2img", json={"prompt": "x"})) == "init_images: Field required"
    document = keyed.get("/openapi.json").json()
    for route in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img"):
        responses = document["paths"][route]["post"]["responses"]
        assert {"200", "401", "422", "429", "500", "503", "504"} <= set(responses)
        error = responses["422"]["content"]["application/json"]["schema"]
        assert error["required"] == ["error", "detail", "body", "errors"]
    txt2img = document["components"]["schemas"]["Txt2ImgRequest"]
    assert "prompt" in txt2img["required"] and txt2img["properties"]["seed"]["minimum"] == -1


# -- methods -------------------------------------------------------------------------------------------------------
def test_a_405_lists_every_method_of_the_path(keyed: TestClient) -> None:
    for method in ("OPTIONS", "PUT", "DELETE"):
        refused = keyed.request(method, "/sdapi/v1/options")
        assert refused.status_code == 405 and refused.headers["allow"] == "GET, POST", refused.headers
    assert keyed.request("PATCH", "/generate").headers["allow"] == "POST"
    assert keyed.request("DELETE", "/status/abc").headers["allow"] == "GET"


def test_a1111_schedule_types_it_cannot_give_are_a_422(keyed: TestClient, execution_log: Path) -> None:
    unknown = {"prompt": "x", "sampler_name": "Euler", "scheduler": "Exponential"}
    assert _a1111_detail(keyed.post("/sdapi/v1/txt2img", json=unknown)) == (
        "scheduler: schedule type 'Exponential' is not available here; available: Automatic, Karras, SGM Uniform"
    )
    no_karras_variant = {"prompt": "x", "sampler_name": "Euler", "scheduler": "Karras"}
    assert _a1111_detail(keyed.post("/sdapi/v1/txt2img", json=no_karras_variant)).startswith(
        "scheduler: the Karras schedule needs a sampler_name that has it (DPM++ 2M, DPM++ 2M SDE, DPM++ SDE), "
    )
    no_sampler = {"prompt": "x", "scheduler": "karras"}
    assert _a1111_detail(keyed.post("/sdapi/v1/txt2img", json=no_sampler)).endswith("not None")
    assert not execution_log.exists()  # refused before any job
    for schedule in ("Automatic", "automatic", "Karras"):
        body = {"prompt": "x", "sampler_name": "DPM++ 2M", "scheduler": schedule, "steps": 10}
        assert keyed.post("/sdapi/v1/txt2img", json=body).status_code == 200, schedule


def test_openai_transparent_background_is_refused_not_dropped(keyed: TestClient, execution_log: Path) -> None:
    answer = keyed.post("/v1/images/generations", json={"prompt": "x", "background": "transparent"})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "background"
    assert not execution_log.exists()
    opaque = keyed.post("/v1/images/generations", json={"prompt": "x", "background": "opaque", "steps": 10})
    assert opaque.status_code == 200


def test_a1111_lora_tags_it_cannot_honour_are_a_422(keyed: TestClient, execution_log: Path) -> None:
    unknown = _a1111_detail(keyed.post("/sdapi/v1/txt2img", json={"prompt": "fox <lora:nope:0.5>"}))
    assert unknown == "prompt: unknown LoRA 'nope' in a <lora:...> tag; available: anime-style, character-detail"
    not_a_number = _a1111_detail(keyed.post("/sdapi/v1/txt2img", json={"prompt": "fox <lora:anime-style:much>"}))
    assert not_a_number == "prompt: the weight in <lora:anime-style:much> is not a number"
    assert not execution_log.exists()  # refused before any job
