"""Textual inversions (embeddings): SDXL ones as A1111 and civitai ship them (``clip_l`` + ``clip_g`` in one
safetensors), in the registry, used by writing their name in the prompt; on the tiny fixtures through the real
pipelines and the API."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from imagen.errors import RegistryError
from imagen.generation.base import InputImages
from imagen.generation.diffusers.engine import DiffusersEngine
from imagen.registry import load_registry
from imagen.registry.safe_files import check_registry_files
from tests.conftest import submit, wait_status
from tests.engine_fixtures import (
    engine_settings,
    fixtures_registry,
    fixtures_registry_data,
    fixtures_registry_path,
    pixels,
    task,
)

TERMINAL = {"SUCCESS", "FAILURE", "REVOKED"}


def draw(engine: DiffusersEngine, prompt: str, negative: str | None = None) -> tuple[np.ndarray, dict]:
    [image] = engine.generate(task(prompt=prompt, negative_prompt=negative), lambda s, p: None, InputImages())
    return pixels(image.image), image.extra_metadata


@pytest.mark.engine
def test_writing_an_embeddings_name_uses_it_and_leaves_other_prompts_as_they_were(tmp_path: Path) -> None:
    fresh, _ = draw(DiffusersEngine(fixtures_registry(), engine_settings(tmp_path / "fresh")), "a lighthouse")
    engine = DiffusersEngine(fixtures_registry(), engine_settings(tmp_path / "used"))
    used, metadata = draw(engine, "a tinyword lighthouse")
    assert metadata["embeddings"] == ["tinyword"]
    assert engine._models["sdxl-base"].embeddings == {"tinyword"}
    plain, plain_metadata = draw(engine, "a lighthouse")
    assert "embeddings" not in plain_metadata
    assert np.array_equal(plain, fresh)  # loading it changed nothing for prompts that do not write it
    assert np.abs(used - plain).mean() > 1  # its two vectors reached both encoders
    assert np.array_equal(draw(engine, "a tinyword lighthouse")[0], used)
    negative, negative_metadata = draw(engine, "a lighthouse", negative="tinyword")
    assert negative_metadata["embeddings"] == ["tinyword"] and not np.array_equal(negative, plain)
    assert not np.array_equal(draw(engine, "a tinywords lighthouse")[0], used)  # a word, not a substring


@pytest.fixture
def api(make_client: Callable[..., TestClient], tmp_path: Path) -> TestClient:
    """The fixtures' registry, with a LoRA whose trigger word is the embedding's name."""
    registry = fixtures_registry_data()
    registry["loras"].append({**registry["loras"][0], "id": "clash", "trigger_words": ["TinyWord"]})
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(registry))
    return make_client(engine="diffusers", registry_path=path, device="cpu", dtype="float32")


@pytest.mark.engine
def test_embeddings_through_the_api_and_a1111(api: TestClient) -> None:
    assert api.get("/embeddings").json() == {"embeddings": [{
        "name": "tinyword", "description": "a two-vector textual inversion (clip_l + clip_g)", "base": "tiny-sdxl",
        "models": ["sdxl-base", "sdxl-single-file"]}]}  # fmt: skip
    assert list(api.get("/sdapi/v1/embeddings").json()["loaded"]) == ["tinyword"]
    done = wait_status(api, submit(api, "a tinyword fox", steps=10), TERMINAL, timeout=120)
    assert done["status"] == "SUCCESS" and done["result"]["metadata"]["embeddings"] == ["tinyword"]
    refused = api.post("/generate", json={"prompt": "a fox", "loras": [{"name": "clash"}]})
    assert refused.status_code == 422
    [error] = refused.json()["detail"]
    assert error["loc"] == ["body", "loras", 0, "name"]
    assert "trigger word 'TinyWord' is also an embedding's name" in error["msg"]


def test_a_file_that_is_not_an_sdxl_embedding_stops_the_start(tmp_path: Path) -> None:
    save_file({"emb_params": torch.zeros(1, 768)}, str(tmp_path / "sd15.safetensors"))
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump({
        "models": [{"id": "m", "name": "m", "path": str(fixtures_registry_path().parent / "models" / "sdxl-base")}],
        "embeddings": [{"name": "old", "path": "sd15.safetensors"}],
    }))  # fmt: skip
    with pytest.raises(RegistryError, match=r"embedding 'old': .* is not an SDXL embedding: no clip_l or clip_g"):
        check_registry_files(load_registry(tmp_path / "registry.yaml"))


def test_a_safetensors_file_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path: Path) -> None:
    """A small file (the demo embedding: a 128-255 byte header) begins with the byte a pickle stream begins with."""
    from imagen.registry.safe_files import read_safetensors_header

    for width in range(1, 40):
        path = tmp_path / f"small-{width}.safetensors"
        save_file({"clip_l": torch.zeros(1, width), "clip_g": torch.zeros(1, 2 * width)}, str(path))
        if path.read_bytes()[:1] == b"\x80":
            assert set(read_safetensors_header(path)) >= {"clip_l", "clip_g"}
            return
    raise AssertionError("no file of these sizes had a header length starting with 0x80")
