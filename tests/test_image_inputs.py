"""Images in requests: uploads, data URLs, every bad image as a 422 at submission, sizes,
samplers, several images per job, on both backends where a job runs."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from imagen.access.keys import add_key
from imagen.inputs.images import MAX_IMAGE_BYTES
from imagen.sampler_names import SAMPLER_NAMES
from tests.celery_support import shared_redis
from tests.conftest import submit, wait_for, wait_status
from tests.latches import Latches
from tests.test_job_contract import job_system

__all__ = ["job_system", "shared_redis"]  # fixtures
TERMINAL = {"SUCCESS", "FAILURE", "REVOKED"}


def picture(size: tuple[int, int] = (640, 512), mode: str = "RGB", color: Any = (200, 30, 30), fmt: str = "PNG",
            **save: Any) -> bytes:  # fmt: skip
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def png_claiming(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header claims width×height (its data would decompress to gigabytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b""
    )


def upload(client: TestClient, data: bytes, name: str = "x.png", headers: dict[str, str] | None = None) -> Any:
    return client.post("/uploads", files={"file": (name, data, "application/octet-stream")}, headers=headers or {})


def error_for(response: Any, field: str) -> str:
    assert response.status_code == 422, response.text[:500]
    messages = [e["msg"] for e in response.json()["detail"] if e["loc"][-1] == field]
    assert messages, response.json()
    return str(messages[0])


@pytest.fixture
def api(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(engine="test-pattern")


# -- uploads ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_an_upload_of_each_format_is_kept_for_an_hour(api: TestClient, fmt: str) -> None:
    answer = upload(api, picture(fmt=fmt), name="anything.bin")  # the name says nothing; the content does
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert (body["width"], body["height"]) == (640, 512)
    assert len(body["upload_id"]) == 32
    import time

    assert 3590 < body["expires_at"] - time.time() <= 3600


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"just some text, not an image", "not a PNG, JPEG or WebP"),
        (picture(fmt="GIF"), "not a PNG, JPEG or WebP"),
        (picture()[:200], "truncated"),
        (png_claiming(100_000, 100_000), "pixels"),
        (b"", "empty"),
    ],
    ids=["text", "gif", "truncated", "decompression-bomb", "empty"],
)
def test_a_bad_upload_is_a_422_that_says_why(api: TestClient, data: bytes, says: str) -> None:
    assert says in error_for(upload(api, data), "file")


def test_an_upload_over_20_mb_is_refused(api: TestClient) -> None:
    huge = picture() + b"\0" * (MAX_IMAGE_BYTES + 1)
    assert "20 MB" in error_for(upload(api, huge), "file")


def test_exif_orientation_is_applied(api: TestClient) -> None:
    image = Image.new("RGB", (640, 512), (0, 0, 255))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    body = upload(api, buffer.getvalue()).json()
    assert (body["width"], body["height"]) == (512, 640)


# -- what a request may say -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"width": 1024}, "height", "width and height go together"),
        ({"width": 1000, "height": 1024}, "width", "multiple of 64"),
        ({"width": 4096, "height": 1024}, "width", "2048"),
        ({"scheduler": "Euler b"}, "scheduler", "DPM++ 2M Karras"),
        ({"clip_skip": 3}, "clip_skip", "2"),
        ({"num_images": 5}, "num_images", "4"),
        ({"strength": 0.5}, "strength", "needs init_image"),
        ({"mask_image": data_url(picture())}, "mask_image", "needs init_image"),
        ({"init_image": "upload:0123456789abcdef0123456789abcdef"}, "init_image", "unknown or expired upload"),
        ({"init_image": "https://example.com/cat.png"}, "init_image", "data URL"),
        ({"init_image": data_url(b"not an image")}, "init_image", "not a PNG, JPEG or WebP"),
        ({"init_image": data_url(png_claiming(100_000, 100_000))}, "init_image", "pixels"),
        ({"init_image": data_url(picture()), "mask_image": data_url(picture((320, 256)))}, "mask_image",
         "same size"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_each_bad_field_is_a_422_naming_it(api: TestClient, fields: dict[str, Any], field: str, says: str) -> None:
    assert says in error_for(api.post("/generate", json={"prompt": "x", **fields}), field)


def test_schedulers_and_model_sizes_are_listed(api: TestClient) -> None:
    assert api.get("/schedulers").json() == {"schedulers": list(SAMPLER_NAMES)}
    models = api.get("/models").json()["models"]
    assert all(model["native_size"] and model["sizes"] for model in models)


def test_an_expired_upload_is_a_422_at_submission(make_client: Callable[..., TestClient]) -> None:
    client = make_client(engine="test-pattern", upload_ttl_s=0.2)
    upload_id = upload(client, picture()).json()["upload_id"]
    wait_for(lambda: client.post("/generate", json={"prompt": "x", "init_image": f"upload:{upload_id}"}).status_code
             == 422, timeout=5)  # fmt: skip


def test_another_keys_upload_is_unknown(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    mine, theirs = add_key(keys, "mine"), add_key(keys, "theirs")
    client = make_client(engine="test-pattern", api_keys_file=keys)
    upload_id = upload(client, picture(), headers={"Authorization": f"Bearer {theirs}"}).json()["upload_id"]
    refused = client.post(
        "/generate", json={"prompt": "x", "init_image": f"upload:{upload_id}"},
        headers={"Authorization": f"Bearer {mine}"},
    )  # fmt: skip
    assert "unknown or expired upload" in error_for(refused, "init_image")


# -- jobs with images, both backends ----------------------------------------------------------------------
def test_img2img_takes_its_size_from_the_image_and_the_alpha_as_its_mask(
    job_system: Callable[..., TestClient],
) -> None:
    client = job_system(engine="test-pattern")
    init = Image.new("RGBA", (700, 520), (10, 120, 10, 255))
    init.paste((0, 0, 0, 0), (0, 0, 350, 520))  # left half transparent: repaint it
    buffer = io.BytesIO()
    init.save(buffer, format="PNG")
    upload_id = upload(client, buffer.getvalue()).json()["upload_id"]
    job_id = submit(client, "img2img", init_image=f"upload:{upload_id}")
    done = wait_status(client, job_id, TERMINAL)
    assert done["status"] == "SUCCESS", done
    metadata = done["result"]["metadata"]
    assert (metadata["width"], metadata["height"]) == (704, 512)  # 700×520 rounded to multiples of 64
    assert metadata["strength"] == 0.75 and metadata["init_image"] and metadata["mask_image"]
    image = client.get(f"/image/{job_id}")
    assert Image.open(io.BytesIO(image.content)).size == (704, 512)
    header = json.loads(image.headers["x-generation-metadata"])
    assert (header["size"], header["strength"], header["init_image"], header["mask_image"]) == (
        "704x512", 0.75, True, True
    )
    assert "ip_image" not in header


def test_num_images_makes_one_job_with_several_files(job_system: Callable[..., TestClient], tmp_path: Path) -> None:
    client = job_system(engine="test-pattern")
    job_id = submit(client, "four", num_images=3, seed=40, width=640, height=512)
    done = wait_status(client, job_id, TERMINAL)
    assert done["status"] == "SUCCESS", done
    images = done["result"]["images"]
    assert [image["seed"] for image in images] == [40, 41, 42]
    assert images[0]["filename"] == done["result"]["filename"]
    bodies = [client.get(f"/image/{job_id}", params={"index": i}) for i in range(3)]
    assert all(body.status_code == 200 for body in bodies)
    assert len({body.content for body in bodies}) == 3
    assert bodies[2].content == client.get(f"/download/{images[2]['filename']}").content
    assert Image.open(io.BytesIO(bodies[1].content)).size == (640, 512)
    assert client.get(f"/image/{job_id}", params={"index": 3}).status_code == 404


def test_img2img_progress_counts_the_steps_it_really_runs(
    job_system: Callable[..., TestClient], latches: Latches
) -> None:
    client = job_system()  # the scripted engine: "hold" reports progress until released
    job_id = submit(client, "hold job", steps=20, strength=0.5, init_image=data_url(picture()))
    running = wait_for(lambda: (body := client.get(f"/status/{job_id}").json()).get("meta", {}).get("total_steps")
                       and body)  # fmt: skip
    latches.release("job")
    assert running["meta"]["total_steps"] == 10  # 20 steps × strength 0.5
    assert wait_status(client, job_id, TERMINAL)["status"] == "SUCCESS"
