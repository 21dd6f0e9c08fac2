"""OpenAI's Images API (/v1/images/generations, /v1/images/edits, /v1/models) through the real `openai`
package, on both job backends: both response formats, an edit, and an error for each status."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from imagen.access.keys import add_key
from tests.celery_support import shared_redis
from tests.conftest import submit, wait_status
from tests.http_thread import http_server
from tests.test_job_contract import RUNNING, job_system

__all__ = ["job_system", "shared_redis"]  # fixtures (job_system runs a test on both backends)


def _png(size: tuple[int, int], mode: str = "RGB", color: object = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format="PNG")  # type: ignore[arg-type]
    return out.getvalue()


def test_openai_client_generates_edits_and_gets_openai_errors(
    job_system: Callable[..., TestClient], tmp_path: Path
) -> None:
    keys_path = tmp_path / "keys.yaml"
    key = add_key(keys_path, "alice")
    api = job_system(api_keys_file=str(keys_path), max_queue=1)
    with http_server(api) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)

        assert [m.id for m in client.models.list()] == ["sdxl-base", "pony-xl-v6"]

        # url (the default): absolute, on this server, and the file is there for the key
        answer = client.images.generate(
            model="pony-xl-v6", prompt="a red fox", n=2, size="512x512", extra_body={"seed": 42, "steps": 10}
        )
        assert len(answer.data) == 2
        assert answer.size == "512x512" and answer.output_format == "png"
        assert answer.data[0].revised_prompt == "a red fox"
        first = answer.data[0].url
        assert first is not None and first.startswith(url + "/download/pony_xl_v6")
        image = httpx.get(first, headers={"Authorization": f"Bearer {key}"})
        assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (512, 512)
        # behind a proxy: its forwarded address
        behind = httpx.post(
            url + "/v1/images/generations", json={"prompt": "fox", "steps": 10},
            headers={"Authorization": f"Bearer {key}", "X-Forwarded-Proto": "https",
                     "X-Forwarded-Host": "img.example.com"}, timeout=30,
        ).json()
        assert behind["data"][0]["url"].startswith("https://img.example.com/download/")

        # b64_json, with another output format; OpenAI's model names mean the default model
        answer = client.images.generate(
            model="dall-e-3", prompt="a blue fox", response_format="b64_json", output_format="jpeg", quality="low",
        )
        assert answer.output_format == "jpeg" and answer.quality == "low"
        picture = Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json or "")))
        assert picture.format == "JPEG"

        # edit: img2img of the given image, and inpainting where the mask is transparent
        edited = client.images.edit(
            image=("in.png", _png((512, 512)), "image/png"), prompt="make it green", response_format="b64_json",
        )
        assert Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json or ""))).size == (512, 512)
        mask = _png((512, 512), "RGBA", (0, 0, 0, 0))
        edited = client.images.edit(
            image=("in.png", _png((512, 512)), "image/png"), mask=("mask.png", mask, "image/png"),
            prompt="a hat", n=1, size="512x512",
        )
        assert edited.data[0].url

        # errors, each in OpenAI's body
        with pytest.raises(openai.BadRequestError) as bad:
            client.images.generate(prompt="fox", size="1000x1000")
        assert bad.value.body["param"] == "size"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as bad:
            client.images.generate(prompt="fox", n=9)
        assert bad.value.body["param"] == "n"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as bad:  # a form without its prompt
            client.post("/images/edits", cast_to=object, body=None, files=[("image", ("a.png", _png((512, 512))))],
                        options={"headers": {"Content-Type": "multipart/form-data"}})
        assert bad.value.body["param"] == "prompt"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError) as missing:
            client.images.generate(prompt="fox", model="no-such-model")
        assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="imk_wrong", max_retries=0).images.generate(prompt="fox")
        with pytest.raises(openai.InternalServerError) as failed:
            client.images.generate(prompt="fatal")
        assert "weight file missing" in failed.value.body["message"]  # type: ignore[index]

        # the queue is full: 429 (a running job, one waiting, max_queue=1)
        headers = {"Authorization": f"Bearer {key}"}
        api.headers.update(headers)
        blocker = submit(api, "hang")
        wait_status(api, blocker, RUNNING)
        submit(api, "waiting")
        with pytest.raises(openai.RateLimitError) as full:
            client.images.generate(prompt="one too many")
        assert full.value.body["code"] == "queue_full"  # type: ignore[index]


def test_revised_prompt_has_the_loras_trigger_words(make_client: Callable[..., TestClient]) -> None:
    """With the real engine (tiny random-weight SDXL on the CPU): the prompt as the model received it."""
    from tests.engine_fixtures import fixtures_registry_path

    api = make_client(engine="diffusers", registry_path=fixtures_registry_path(), device="cpu", dtype="float32")
    with http_server(api) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        answer = client.images.generate(
            prompt="a fox", response_format="b64_json", extra_body={"steps": 10, "loras": [{"name": "anime-style"}]}
        )
    assert answer.data[0].revised_prompt == "anime style, detailed, a fox"  # trigger words go in front
