"""The compatibility routes decode and encode images outside the event loop: while one of them does that
work, `/health` (and every other request) is still answered.

Each test holds the route's image work on a latch the test controls (the function the route hands to a worker
thread waits on it), sends `/health`, and asserts it is answered while the heavy request is still held. Work
done on the event loop would block the loop on the latch, and `/health` would get no answer. A real uvicorn
server (``tests.http_thread``) serves the app, so the event loop is a real one.

Also here: the A1111 inpainting mask, which was decoded on the loop before any check, is checked first (its
size read from its header) and refused with a 422 that names `mask`.
"""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from imagen.api import a1111_compat, json_body, openai_compat
from tests.http_thread import http_server


class Latch:
    """Holds whoever calls a wrapped function until the test releases it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def held(*args: Any, **kwargs: Any) -> Any:
            self.entered.set()
            assert self.released.wait(60), "the test never released the latch"
            return function(*args, **kwargs)

        return held


def png(size: tuple[int, int], mode: str = "RGB", color: Any = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format="PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def claimed_png(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width``×``height`` 1-bit pixels (its pixel data is a stub)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b""
    )


def _edit(url: str) -> httpx.Response:
    return httpx.post(
        url + "/v1/images/edits", data={"prompt": "make it green", "response_format": "b64_json"},
        files={"image": ("in.png", png((512, 512)), "image/png")}, timeout=60,
    )


def _generation(url: str) -> httpx.Response:
    return httpx.post(
        url + "/v1/images/generations",
        json={"prompt": "a fox", "n": 2, "response_format": "b64_json", "output_format": "webp", "steps": 10},
        timeout=60,
    )


def _inverted_inpainting(url: str) -> httpx.Response:
    return httpx.post(url + "/sdapi/v1/img2img", json={
        "init_images": [b64(png((512, 512)))], "mask": b64(png((512, 512), "L", 0)), "inpainting_mask_invert": 1,
        "prompt": "x", "steps": 10,
    }, timeout=60)


def _native_generate(url: str) -> httpx.Response:
    return httpx.post(url + "/generate", json={"prompt": "a fox", "steps": 10}, timeout=60)


def _txt2img(url: str) -> httpx.Response:
    return httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 10, "batch_size": 2}, timeout=60)


# Each heavy route, the module and function that does its image work in a worker thread, and its request.
HEAVY_ROUTES = {
    "openai edit: decodes the image": (openai_compat, "check_image", _edit),
    "openai b64_json webp: converts and encodes": (openai_compat, "_convert", _generation),
    "a1111 inverted mask: decodes and inverts it": (a1111_compat, "_inverted_mask", _inverted_inpainting),
    "a1111 answer: base64 of the images": (a1111_compat, "_images_answer", _txt2img),
    "native generate: parses its JSON body": (json_body, "_loads", _native_generate),
}


@pytest.mark.parametrize("route", HEAVY_ROUTES)
def test_health_is_answered_while_a_heavy_route_does_its_image_work(
    route: str, make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    module, name, send = HEAVY_ROUTES[route]
    latch = Latch()
    monkeypatch.setattr(module, name, latch.wrap(getattr(module, name)))
    client = make_client()
    with http_server(client) as url:
        answers: list[httpx.Response] = []
        heavy = threading.Thread(target=lambda: answers.append(send(url)))
        heavy.start()
        try:
            assert latch.entered.wait(60), "the route never reached its image work"
            health = httpx.get(url + "/health", timeout=10)  # no answer if the event loop is held
            assert health.status_code == 200
            assert not answers  # the heavy request is still held on the latch
        finally:
            latch.released.set()
            heavy.join(60)
        assert answers[0].status_code in (200, 201), answers[0].text


@pytest.mark.parametrize(
    ("mask", "problem"),
    [
        ("!!not base64!!", "base64 is not valid"),
        (b64(b"hello, not an image"), "not a PNG, JPEG or WebP image"),
        (b64(claimed_png(13_000, 13_000)), "pixels"),  # 20 KB that would decode to 169 million pixels
        (b64(claimed_png(20_000, 20_000)), "pixels"),
    ],
    ids=["bad base64", "not an image", "13,000²", "20,000²"],
)
@pytest.mark.parametrize("inverted", [1, 0], ids=["inverted", "as sent"])
def test_a_bad_a1111_mask_is_a_422_naming_mask(client: TestClient, mask: str, problem: str, inverted: int) -> None:
    answer = client.post("/sdapi/v1/img2img", json={
        "init_images": [b64(png((512, 512)))], "mask": mask, "inpainting_mask_invert": inverted, "prompt": "x",
    })
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert detail.startswith("mask: ") and problem in detail, detail
