"""Each endpoint of the API reference v2.0: shapes, status codes, headers, files."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import requests
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from imagen.api.app import create_app
from imagen.api.headers import MAX_HEADER_BYTES, generation_metadata_header
from imagen.config import Settings
from imagen.jobs.embedded.backend import EmbeddedBackend
from imagen.jobs.types import JobRecord
from tests.conftest import ServerProcess, free_port, wait_for, wait_status
from tests.latches import Latches

FILENAME = re.compile(r"^sdxl_base_\d{8}_\d{6}_[0-9a-f]{8}\.png$")


def test_generate_answers_201_queued(client: TestClient) -> None:
    response = client.post("/generate", json={"prompt": "a beautiful sunset over mountains"})
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"job_id", "status", "message"}
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", body["job_id"])
    assert body["status"] == "queued"
    assert re.fullmatch(r"Tâche en file d'attente\. Position estimée: \d+", body["message"])


def test_success_status_result_and_png(client: TestClient, tmp_path: Path) -> None:
    body = {"prompt": "a cute robot", "negative_prompt": "blurry", "loras": [{"name": "anime-style", "weight": 0.6}],
            "steps": 12, "guidance_scale": 8.0, "seed": 42, "ip_strength": 0.0}
    job_id = client.post("/generate", json=body).json()["job_id"]
    done = wait_status(client, job_id, {"SUCCESS", "FAILURE"})
    assert done["status"] == "SUCCESS", done
    result = done["result"]
    assert result["status"] == "success"
    assert FILENAME.match(result["filename"]), result["filename"]
    assert result["path"] == os.path.join(str(tmp_path / "outputs"), result["filename"])
    assert result["url"] == f"/outputs/{result['filename']}"
    metadata = result["metadata"]
    assert {k: metadata[k] for k in ("model", "loras", "steps", "guidance_scale", "seed", "ip_strength")} == {
        "model": "sdxl-base", "loras": [{"name": "anime-style", "weight": 0.6}], "steps": 12,
        "guidance_scale": 8.0, "seed": 42, "ip_strength": 0.0,
    }

    image = client.get(f"/image/{job_id}")
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/png"
    assert image.headers["x-job-id"] == job_id
    assert json.loads(image.headers["x-generation-metadata"]) == {
        "model": "sdxl-base", "loras": [{"name": "anime-style", "weight": 0.6}], "steps": 12,
        "guidance_scale": 8.0, "seed": 42, "ip_strength": 0.0, "size": "64x64",
    }
    assert int(image.headers["content-length"]) == len(image.content)
    png = Image.open(io.BytesIO(image.content))
    assert (png.format, png.mode, png.size) == ("PNG", "RGB", (64, 64))  # the registry's native size
    assert png.text["parameters"].startswith("a cute robot\nNegative prompt: blurry\nSteps: 12, ")
    assert "CFG scale: 8.0, Seed: 42, Size: 64x64, Model: sdxl-base" in png.text["parameters"]
    assert json.loads(png.text["imagen"]) == metadata

    for route in ("/download/", "/outputs/"):
        served = client.get(route + result["filename"])
        assert served.status_code == 200
        assert served.headers["content-type"] == "image/png"
        assert served.content == image.content


def test_null_seed_reports_the_seed_used_and_reproduces(client: TestClient) -> None:
    first = client.post("/generate", json={"prompt": "seedless"}).json()["job_id"]
    done = wait_status(client, first, {"SUCCESS"})
    seed = done["result"]["metadata"]["seed"]
    assert isinstance(seed, int)
    again = client.post("/generate", json={"prompt": "seedless", "seed": seed}).json()["job_id"]
    wait_status(client, again, {"SUCCESS"})
    assert client.get(f"/image/{first}").content == client.get(f"/image/{again}").content


def test_image_is_202_while_queued_or_running(client: TestClient, latches: Latches) -> None:
    running = client.post("/generate", json={"prompt": "hold running", "steps": 10}).json()["job_id"]
    queued = client.post("/generate", json={"prompt": "queued"}).json()["job_id"]
    wait_status(client, running, {"PROGRESS"})
    response = client.get(f"/image/{running}")
    assert response.status_code == 202
    detail = response.json()["detail"]
    assert detail["status"] == "processing"
    assert detail["message"] == "Image en cours de génération"
    assert detail["state"] == "PROGRESS"
    assert detail["meta"]["step"] == "generation_gpu"
    waiting = client.get(f"/image/{queued}")
    assert waiting.status_code == 202
    assert waiting.json()["detail"]["state"] == "PENDING"
    assert client.get(f"/status/{queued}").json() == {"job_id": queued, "status": "PENDING", "result": None}
    latches.release("running")


def test_download_of_a_missing_file_is_404(client: TestClient) -> None:
    for route in ("/download/", "/outputs/"):
        response = client.get(route + "20260130_123456_abc123.png")
        assert response.status_code == 404
        assert response.json() == {"detail": "Image non trouvée"}


def test_models_loras_health(client: TestClient) -> None:
    models = client.get("/models").json()["models"]
    reference_fields = {"id", "name", "description", "vae_path", "default_negative"}
    assert {field: models[0][field] for field in reference_fields} == {
        "id": "sdxl-base", "name": "SDXL Base 1.0", "description": "Stable Diffusion XL base model - polyvalent",
        "vae_path": "madebyollin/sdxl-vae-fp16-fix",  # as the registry file writes it, never a server path
        "default_negative": "low quality, blurry, distorted, ugly, bad anatomy",
    }
    # the extensions: sizes and defaults for width/height, scheduler, clip_skip, the guidance rescale and stop,
    # where it is held, and the ControlNets that fit it
    assert set(models[0]) - reference_fields == {
        "native_size", "sizes", "default_scheduler", "clip_skip", "guidance_rescale", "guidance_stop", "loaded_on",
        "base", "controlnets", "steps", "guidance_scale", "timestep_spacing", "refiner", "default_refiner",
        "refiners",
    }
    assert (models[0]["base"], models[0]["controlnets"]) == ("sdxl", ["canny-sdxl", "union-sdxl"])
    assert models[0]["native_size"] == {"width": 64, "height": 64} and models[0]["clip_skip"] == 1
    assert (models[0]["guidance_rescale"], models[0]["guidance_stop"]) == (0.0, 1.0)
    assert [m["id"] for m in models] == ["sdxl-base", "pony-xl-v6"]
    loras = client.get("/loras").json()["loras"]
    assert loras == [
        {"id": "anime-style", "name": "Anime Style Enhancer", "description": "Améliore le style anime et les détails",
         "default_weight": 0.75, "trigger_words": ["anime style", "detailed"]},
        {"id": "character-detail", "name": "Character Detail Enhancement",
         "description": "Améliore les détails des personnages (visage, yeux, etc.)", "default_weight": 0.6,
         "trigger_words": None},
    ]
    health = wait_for(lambda: (body := client.get("/health").json())["workers"][0]["ready"] and body)
    (worker,) = health["workers"]
    assert health == {
        "status": "ok",
        "gpu_available": False,
        "queue_broker": "embedded",
        "reasons": [],
        "workers": [{"host": socket.gethostname(), "pid": worker["pid"], "ready": True, "device": "cpu",
                     "gpu_available": False, "models": {}}],
    }
    assert worker["pid"] != os.getpid()  # a child process runs the engine, never the API process


def test_health_says_why_a_generation_worker_cannot_start(make_client: Callable[..., TestClient]) -> None:
    client = make_client(engine="tests.engines:NoSuchEngine")
    health = wait_for(lambda: (body := client.get("/health").json())["workers"][0].get("error") and body)
    (worker,) = health["workers"]
    assert worker["ready"] is False and health["gpu_available"] is False
    assert "NoSuchEngine" in worker["error"]


def test_file_name_prefix_comes_from_the_registry(client: TestClient) -> None:
    job_id = client.post("/generate", json={"prompt": "pony", "model": "pony-xl-v6"}).json()["job_id"]
    done = wait_status(client, job_id, {"SUCCESS"})
    assert re.fullmatch(r"pony_xl_v6_\d{8}_\d{6}_[0-9a-f]{8}\.png", done["result"]["filename"])


def test_nothing_outside_outputs_is_served(
    make_server: Callable[..., ServerProcess], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG secret")
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "link_out.png").symlink_to(secret)
    (outputs / "inside.png").write_bytes(b"\x89PNG inside")
    (outputs / "inside_link.png").symlink_to(outputs / "inside.png")
    server = make_server()
    server.start()
    attacks = [
        "../secret.png", "..%2fsecret.png", "%2e%2e%2fsecret.png", "%2e%2e/secret.png", "..%5csecret.png",
        "..\\secret.png", "%2e%2e%5csecret.png", f"{secret}", f"%2F{str(secret).lstrip('/')}", "link_out.png",
        "./inside.png", "inside.png%00.png", "../outputs/inside.png", "..%252fsecret.png", "",
        "..", "%2e%2e", ".partial-x.png", "registry.yaml",
    ]
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    request.addfinalizer(connection.close)
    for route in ("/download/", "/outputs/"):
        for attack in attacks:
            connection.request("GET", route + attack)
            response = connection.getresponse()
            body = response.read()
            assert response.status == 404, (route, attack, body)
            assert b"secret" not in body and b"inside" not in body
        connection.request("GET", route + "inside.png")
        ok = connection.getresponse()
        assert (ok.status, ok.read()) == (200, b"\x89PNG inside")
        connection.request("GET", route + "inside_link.png")
        link = connection.getresponse()
        assert (link.status, link.read()) == (200, b"\x89PNG inside")


def test_metadata_header_of_a_long_non_ascii_prompt_is_short_ascii_json(
    make_server: Callable[..., ServerProcess],
) -> None:
    """A valid 19,000-character prompt once made the header ~110 KB: ``requests`` refused the answer."""
    server = make_server()
    server.start()
    prompt = ("un château éclairé au crépuscule 🌅, " * 600)[:19_000]
    body = {"prompt": prompt, "loras": [{"name": "anime-style", "weight": 0.5}], "seed": 7, "steps": 10}
    job_id = requests.post(f"{server.url}/generate", json=body, timeout=10).json()["job_id"]
    with server.client() as client:
        done = wait_status(client, job_id, {"SUCCESS"})
    assert done["result"]["metadata"]["prompt"] == prompt  # the full metadata stays in /status

    image = requests.get(f"{server.url}/image/{job_id}", timeout=10)
    assert image.status_code == 200
    assert image.content.startswith(b"\x89PNG")
    header = image.headers["X-Generation-Metadata"]
    assert header.isascii() and len(header) <= MAX_HEADER_BYTES
    assert json.loads(header) == {
        "model": "sdxl-base", "loras": [{"name": "anime-style", "weight": 0.5}], "steps": 10,
        "guidance_scale": 7.5, "seed": 7, "ip_strength": 0.0, "size": "64x64",
    }
    assert json.loads(Image.open(io.BytesIO(image.content)).text["imagen"])["prompt"] == prompt  # and in the PNG


def test_metadata_header_stays_under_2_kb_whatever_the_metadata() -> None:
    huge = "𝔏é\ud800" * 3000  # astral, accented and a lone surrogate: 6 to 12 bytes each once escaped
    metadata = {
        "prompt": huge, "negative_prompt": huge, "model": huge,
        "loras": [{"name": f"{i}{huge}", "weight": 0.1 + 0.2} for i in range(20)],
        "steps": 100, "guidance_scale": 0.1 + 0.2, "seed": 2**53 - 1, "ip_strength": 0.1 + 0.2,
        "width": 4096, "height": 4096, "sampler": huge, "scheduler": huge, "final_prompt": huge,
    }
    header = generation_metadata_header(metadata)
    assert header.isascii() and len(header) <= MAX_HEADER_BYTES
    summary = json.loads(header)
    assert list(summary) == ["model", "loras", "steps", "guidance_scale", "seed", "ip_strength", "size", "sampler"]
    assert len(summary["loras"]) == 8 and summary["loras"][3]["name"].startswith("3𝔏é")
    assert summary["model"].endswith("...") and summary["size"] == "4096x4096" and summary["seed"] == 2**53 - 1


class _BlockingBackend(EmbeddedBackend):
    """The embedded backend, whose ``get`` of the job id "blocked" waits (a stalled Redis or disk)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.entered = threading.Event()
        self.release = threading.Event()

    def get(self, job_id: str) -> JobRecord | None:
        if job_id == "blocked":
            self.entered.set()
            self.release.wait(30)
        return super().get(job_id)


@pytest.mark.parametrize("route", ["/status/", "/image/"])
def test_health_answers_while_a_backend_call_is_blocked(make_settings: Callable[..., Settings], route: str) -> None:
    settings = make_settings()
    backend = _BlockingBackend(settings)
    server = uvicorn.Server(uvicorn.Config(create_app(settings, backend), host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    url = f"http://127.0.0.1:{server.config.port}"
    try:
        wait_for(lambda: server.started)
        blocked = threading.Thread(target=lambda: httpx.get(url + route + "blocked", timeout=30), daemon=True)
        blocked.start()
        assert backend.entered.wait(10)
        started = time.monotonic()
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 2
        assert httpx.get(url + "/models", timeout=5).status_code == 200
    finally:
        backend.release.set()
        server.should_exit = True
        serving.join(timeout=20)
