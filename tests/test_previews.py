"""``GET /events/{job_id}?preview=1`` preview images on both job systems, and from real latents.

Transport: the job-system engines (the test pattern underneath) send a tiny synthetic preview every
``preview_every_steps`` steps; a stream that asked for previews receives them as ``preview`` events whose
image decodes to a small JPEG, a stream that did not gets none. The diffusers engine makes them from its
latents (by the linear latent-to-RGB map of the model's registry entry, ``latent_rgb``, or by the TAESDXL it
names as ``preview_decoder``), checked on the tiny fixture model with a tiny random ``AutoencoderTiny``.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from imagen.generation.preview import MAX_PREVIEW_PX, encode_preview
from tests.celery_support import shared_redis
from tests.conftest import submit
from tests.latches import Latches
from tests.test_events import assert_status_shape, read_in_background
from tests.test_job_contract import job_system

__all__ = ["job_system", "shared_redis"]  # fixtures

DATA_URL_PREFIX = "data:image/jpeg;base64,"


def decode_preview(image: str) -> Image.Image:
    assert image.startswith(DATA_URL_PREFIX)
    decoded = Image.open(io.BytesIO(base64.b64decode(image.removeprefix(DATA_URL_PREFIX), validate=True)))
    assert decoded.format == "JPEG"
    assert max(decoded.size) <= MAX_PREVIEW_PX
    return decoded


def test_streams_that_ask_get_preview_events_and_the_others_none(
    job_system: Callable[..., TestClient], latches: Latches
) -> None:
    client = job_system()
    submit(client, "hold blocker")
    latches.wait_started("blocker")
    job_id = submit(client, "sleep 0.3", steps=10)  # previews after steps 5 and 10 (default setting)
    # both streams connected while the job certainly waits: neither can miss a preview
    reader, without = read_in_background(client, job_id)
    with_reader, with_previews = read_in_background(client, job_id, preview=True)
    latches.release("blocker")
    for thread in (reader, with_reader):
        thread.join(60)
        assert not thread.is_alive()

    previews = [e for e in with_previews if e.name == "preview"]
    assert previews, [e.name for e in with_previews]
    for event in previews:
        assert set(event.data) == {"step", "image"}
        assert event.data["step"] in (5, 10)
        decode_preview(event.data["image"])
    assert [e.id for e in with_previews] == sorted({e.id for e in with_previews})  # one id sequence
    for event in with_previews:
        if event.name == "status":
            assert_status_shape(event, job_id)
    assert with_previews[-1].name == "status" and with_previews[-1].data["status"] == "SUCCESS"
    assert without and {e.name for e in without} == {"status"}
    assert without[-1].data["status"] == "SUCCESS"
    assert "preview" not in str(client.get(f"/status/{job_id}").json())  # never in the job record


def test_a_preview_is_a_small_jpeg() -> None:
    pixels = np.zeros((1024, 512, 3), dtype=np.uint8)
    image = Image.open(io.BytesIO(encode_preview(pixels)))
    assert image.format == "JPEG" and image.size == (128, 256)


def test_the_diffusers_engine_makes_previews_from_its_latents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from imagen.generation.diffusers import engine as engine_module
    from imagen.generation.diffusers.preview import latents_preview
    from imagen.generation.runner import run_task
    from imagen.registry import LatentRgb
    from imagen.registry.specs import SDXL_LATENT_RGB
    from tests.engine_fixtures import engine_settings, fixtures_registry, task

    latents_seen: list[torch.Tensor] = []
    maps_seen: list[LatentRgb] = []

    def recording_preview(latents: torch.Tensor, latent_rgb: LatentRgb) -> bytes:
        latents_seen.append(latents.clone())
        maps_seen.append(latent_rgb)
        return latents_preview(latents, latent_rgb)

    monkeypatch.setattr(engine_module, "latents_preview", recording_preview)
    registry = fixtures_registry()
    engine = engine_module.DiffusersEngine(registry, engine_settings(tmp_path / "data", preview_every_steps=2))
    job = task(steps=4)
    previews: list[tuple[int, bytes]] = []
    run_task(
        engine,
        job,
        "previews.png",
        tmp_path / "outputs",
        lambda step, percent: None,
        preview=lambda step, jpeg: previews.append((step, jpeg)),
    )
    assert [step for step, _ in previews] == [2, 4]
    assert engine.preview is None  # set for the job's duration only
    pipe = engine._models[job.model].pipe
    spec = registry.model(job.model)
    assert spec is not None
    latent_side = spec.size // pipe.vae_scale_factor
    assert [tuple(latents.shape) for latents in latents_seen] == [(1, 4, latent_side, latent_side)] * 2
    assert not torch.equal(latents_seen[0], latents_seen[1])  # the denoising moved on between them
    assert maps_seen == [SDXL_LATENT_RGB] * 2  # the model's own map: its entry gives none, so SDXL's
    for (_, jpeg), latents in zip(previews, latents_seen, strict=True):
        assert jpeg == latents_preview(latents)  # made from the step's latents, no VAE
        image = Image.open(io.BytesIO(jpeg))
        assert image.format == "JPEG" and image.size == (min(latent_side, MAX_PREVIEW_PX),) * 2


def test_a_bad_preview_flag_is_a_422_naming_it(client: TestClient) -> None:
    job_id = submit(client, "quick")
    response = client.get(f"/events/{job_id}", params={"preview": "maybe"})
    assert response.status_code == 422
    assert "preview" in str(response.json()["detail"])


def _tiny_taesdxl(folder: Path) -> None:
    """A small random ``AutoencoderTiny`` (TAESDXL's architecture: 4 latent channels, 8x upsampling)."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(7)
    channels, blocks = (8, 8, 8, 8), (1, 1, 1, 1)
    decoder = AutoencoderTiny(
        encoder_block_out_channels=channels,
        decoder_block_out_channels=channels,
        num_encoder_blocks=blocks,
        num_decoder_blocks=blocks,
        latent_channels=4,
    )
    decoder.save_pretrained(str(folder), safe_serialization=True)


def _registry_with_preview_decoder(tmp_path: Path, decoder_entry: str) -> Path:
    """The tiny fixtures' registry, its ``sdxl-base`` naming ``decoder_entry`` as its preview decoder."""
    return _fixtures_registry_with(tmp_path, preview_decoder=decoder_entry)  # relative: to the file's folder


def _fixtures_registry_with(tmp_path: Path, **fields: object) -> Path:
    """The tiny fixtures' registry with only ``sdxl-base``, given ``fields`` in its entry."""
    import yaml

    from tests.engine_fixtures import fixtures_registry_path

    source = fixtures_registry_path()
    raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    raw["models"] = [m for m in raw["models"] if m["id"] == "sdxl-base"]
    raw["models"][0]["path"] = str(source.parent / raw["models"][0]["path"])
    raw["models"][0].update(fields)
    for section in ("loras", "ip_adapter", "controlnets", "upscalers", "embeddings"):
        raw.pop(section)
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_a_model_with_a_preview_decoder_gets_its_previews_from_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from safetensors.torch import load_file

    from imagen.generation.diffusers import engine as engine_module
    from imagen.generation.diffusers.preview import decoder_preview, latents_preview
    from imagen.generation.runner import run_task
    from imagen.registry import load_registry
    from imagen.registry.safe_files import check_registry_files
    from tests.engine_fixtures import engine_settings, task

    _tiny_taesdxl(tmp_path / "taesdxl")
    registry = load_registry(_registry_with_preview_decoder(tmp_path, "taesdxl"))
    spec = registry.model("sdxl-base")
    assert spec is not None and spec.preview_decoder == (tmp_path / "taesdxl").resolve()
    check_registry_files(registry)  # safetensors folder: accepted at start

    engine = engine_module.DiffusersEngine(registry, engine_settings(tmp_path / "data", preview_every_steps=2))
    latents_seen: list[torch.Tensor] = []
    previews: list[tuple[int, bytes]] = []

    def recording_preview(decoder: object, latents: torch.Tensor) -> bytes:
        latents_seen.append(latents.clone())
        return decoder_preview(decoder, latents)

    monkeypatch.setattr(engine_module, "decoder_preview", recording_preview)
    run_task(
        engine,
        task(steps=4),
        "previews.png",
        tmp_path / "outputs",
        lambda step, percent: None,
        preview=lambda step, jpeg: previews.append((step, jpeg)),
    )
    loaded = engine._models["sdxl-base"]
    decoder = loaded.preview_decoder
    assert type(decoder).__name__ == "AutoencoderTiny"
    saved = load_file(str(tmp_path / "taesdxl" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(saved[name], value) for name, value in decoder.state_dict().items())  # those weights
    assert [step for step, _ in previews] == [2, 4] and len(latents_seen) == 2
    latent_side = spec.size // loaded.pipe.vae_scale_factor
    for (_, jpeg), latents in zip(previews, latents_seen, strict=True):
        assert jpeg == decoder_preview(decoder, latents)  # decoded by the TAESDXL ...
        assert jpeg != latents_preview(latents)  # ... not by the linear approximation
        image = decode_preview("data:image/jpeg;base64," + base64.b64encode(jpeg).decode())
        assert image.size == (min(8 * latent_side, MAX_PREVIEW_PX),) * 2  # TAESD upsamples 8x


def test_a_models_own_latent_rgb_map_draws_its_previews(tmp_path: Path) -> None:
    """The linear map is data on the registry entry (``latent_rgb``), read as every model's is. This one ignores
    the latents and adds a fixed colour, so each preview is that colour whatever was denoised."""
    from imagen.generation.diffusers.engine import DiffusersEngine
    from imagen.generation.runner import run_task
    from imagen.registry import LatentRgb, load_registry
    from tests.engine_fixtures import engine_settings, task

    flat = {"factors": [[0, 0, 0]] * 4, "bias": [0.6, -0.2, -1.0]}
    registry = load_registry(_fixtures_registry_with(tmp_path, latent_rgb=flat))
    spec = registry.model("sdxl-base")
    assert spec is not None and spec.latent_rgb == LatentRgb(factors=((0, 0, 0),) * 4, bias=(0.6, -0.2, -1.0))
    engine = DiffusersEngine(registry, engine_settings(tmp_path / "data", preview_every_steps=2))
    previews: list[tuple[int, bytes]] = []
    run_task(
        engine,
        task(steps=4),
        "flat.png",
        tmp_path / "outputs",
        lambda step, percent: None,
        preview=lambda step, jpeg: previews.append((step, jpeg)),
    )
    assert [step for step, _ in previews] == [2, 4]
    for _, jpeg in previews:
        pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.int16)
        assert np.abs(pixels - np.array([204, 102, 0])).max() <= 2  # (bias + 1) * 127.5


def test_a_preview_decoder_without_safetensors_weights_is_refused_at_start(tmp_path: Path) -> None:
    from imagen.errors import RegistryError
    from imagen.registry import load_registry
    from imagen.registry.safe_files import check_registry_files

    folder = tmp_path / "taesdxl"
    folder.mkdir()
    (folder / "config.json").write_text("{}", encoding="utf-8")
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    registry = load_registry(_registry_with_preview_decoder(tmp_path, "taesdxl"))
    with pytest.raises(RegistryError, match=r"'sdxl-base' preview_decoder: .*only pickle weights"):
        check_registry_files(registry)
