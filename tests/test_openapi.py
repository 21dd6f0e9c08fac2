"""The OpenAPI document says every answer each route gives, and a schemathesis run holds the server to it.

The run (``--checks all``: server errors, undocumented codes and media types, response schemas, headers,
invalid data accepted, valid data refused, unsupported methods, stateful links...) is bounded in examples
and time and uses a fixed seed. What it found while this was built, all fixed: unknown model/LoRA ids and
blank prompts that the document called valid, ``"seed": 100.0`` refused although JSON Schema calls it an
integer, a 500 for a JSON body sent as ``text/plain`` (the 422 echoed raw bytes), and the undocumented
400 FastAPI gives a body that is not UTF-8.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import REPO, ServerProcess


def _responses(document: dict[str, Any], path: str, method: str = "get") -> dict[str, Any]:
    responses: dict[str, Any] = document["paths"][path][method]["responses"]
    return responses


def test_every_answer_is_documented(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    generate = _responses(document, "/generate", "post")
    assert {"201", "400", "413", "422", "503"} <= set(generate)
    assert "Retry-After" in generate["503"]["headers"]
    assert set(_responses(document, "/status/{job_id}")) >= {"200", "404"}
    image = _responses(document, "/image/{job_id}")
    assert set(image) >= {"200", "202", "404", "410", "500"}
    assert set(image["200"]["content"]) == {"image/png"}
    assert {"X-Job-ID", "X-Generation-Metadata"} <= set(image["200"]["headers"])
    assert set(_responses(document, "/cancel/{job_id}", "post")) >= {"200", "404", "409"}
    for route in ("/download/{filename}", "/outputs/{filename}"):
        served = _responses(document, route)
        assert set(served) >= {"200", "404"} and set(served["200"]["content"]) == {"image/png"}
    for route in ("/models", "/loras", "/health"):
        assert "200" in _responses(document, route)


def test_the_request_schema_names_this_servers_ids_and_limits(make_client: Callable[..., TestClient]) -> None:
    request = make_client(max_loras=1).get("/openapi.json").json()["components"]["schemas"]
    generation = request["GenerationRequest"]["properties"]
    assert {"type": "string", "enum": ["sdxl-base", "pony-xl-v6"]} in generation["model"]["anyOf"]
    assert generation["loras"]["maxItems"] == 1  # IMAGEN_MAX_LORAS
    assert request["LoraRequest"]["properties"]["name"]["enum"] == ["anime-style", "character-detail"]
    assert generation["ip_strength"]["maximum"] == 1.0


def test_without_an_ip_adapter_the_schema_allows_only_zero(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    registry = tmp_path / "plain.yaml"
    registry.write_text("models:\n  - {id: sdxl-base, name: SDXL, path: m.safetensors}\n")
    schemas = make_client(registry_path=registry).get("/openapi.json").json()["components"]["schemas"]
    generation = schemas["GenerationRequest"]["properties"]
    assert generation["ip_strength"]["maximum"] == 0.0 and generation["loras"]["maxItems"] == 0
    assert "enum" not in schemas["LoraRequest"]["properties"]["name"]


@pytest.mark.slow  # moved out of the default suite (session 25: it ran 9:20 of its 10 minutes); .ci/run runs it
def test_schemathesis_finds_nothing(make_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = make_server(engine="test-pattern", max_queue="100000")
    server.start()
    command = [
        str(Path(sys.executable).with_name("schemathesis")), "run", f"{server.url}/openapi.json",
        "--checks", "all", "--max-examples", "40", "--seed", "8", "--workers", "1",
        "--exclude-path", "/uploads",  # random bytes are not an image (tests/test_image_inputs.py covers it)
        # OpenAI's and AUTOMATIC1111's APIs keep their own (looser) contracts: the real clients' tests cover
        # them (tests/test_openai_compat.py, tests/test_a1111_compat.py)
        "--exclude-path-regex", "^/(v1/images|sdapi)/",
        "--request-timeout", "10",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks"}
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-6000:]
    assert "12 selected / 28 total" in output, output[-3000:]  # all but /uploads and the compatibility APIs
