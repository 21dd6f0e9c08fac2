"""Safetensors-only loading, registry file checks, trigger words, original-layout export (no pipelines)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from imagen.errors import FatalGenerationError, RegistryError
from imagen.generation.diffusers.components import FIXTURE_SHAPE, build_tiny_sdxl_pipeline, load_clip_tokenizers
from imagen.generation.diffusers.engine import DiffusersEngine
from imagen.generation.diffusers.prompts import add_trigger_words
from imagen.registry import LoraSpec, ModelSpec, Registry, load_registry, safe_files
from imagen.testing import ldm_export
from tests.engine_fixtures import engine_settings, fixtures_registry, fixtures_registry_path, task


class WritesCanary:
    """Unpickling this calls ``Path.write_text`` on the canary: proof that pickle code ran."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.canary, "pickle code ran"))


def _malicious_files(tmp_path: Path) -> tuple[Path, list[Path]]:
    canary = tmp_path / "canary.txt"
    payload = pickle.dumps({"state_dict": WritesCanary(canary)}, protocol=2)
    files = []
    for name in ("model.ckpt", "model.pt", "model.bin", "model.pth", "renamed.safetensors"):
        path = tmp_path / name
        path.write_bytes(payload)
        files.append(path)
    zipped = tmp_path / "torch-zip.safetensors"
    torch.save({"x": WritesCanary(canary)}, zipped)
    files.append(zipped)
    return canary, files


def test_pickle_files_are_refused_and_never_run(tmp_path: Path) -> None:
    canary, files = _malicious_files(tmp_path)
    for path in files:
        with pytest.raises(safe_files.UnsafeFileError, match="pickle"):
            safe_files.read_safetensors_header(path)
    models = [ModelSpec(id=f"m{i}", name="m", path=p, size=64) for i, p in enumerate(files)]
    registry = Registry(models=models)
    with pytest.raises(RegistryError, match="pickle"):
        safe_files.check_registry_files(registry)
    engine = DiffusersEngine(registry, engine_settings(tmp_path))
    for model in models:
        with pytest.raises(FatalGenerationError, match="pickle"):
            engine.generate(task(model=model.id), lambda step, pct: None)
    assert not canary.exists()


def test_diffusers_folder_with_only_pickle_weights_is_refused(tmp_path: Path) -> None:
    canary, _ = _malicious_files(tmp_path)
    source = fixtures_registry_path().parent / "models" / "sdxl-base"
    folder = tmp_path / "pickled-folder"
    shutil.copytree(source, folder)
    weights = next((folder / "unet").glob("*.safetensors"))
    weights.unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(WritesCanary(canary)))
    registry = Registry(models=[ModelSpec(id="pickled", name="p", path=folder, size=64)])
    with pytest.raises(RegistryError, match=r"no \.safetensors weights"):
        safe_files.check_registry_files(registry)
    with pytest.raises(FatalGenerationError, match=r"no \.safetensors weights"):
        DiffusersEngine(registry, engine_settings(tmp_path)).generate(
            task(model="pickled"), lambda s, p: None
        )
    assert not canary.exists()


def test_fixture_registry_passes_the_file_check() -> None:
    safe_files.check_registry_files(fixtures_registry())


def test_lora_formats_are_recognised() -> None:
    loras = {lora.id: lora.path for lora in fixtures_registry().loras}
    assert safe_files.lora_format(loras["anime-style"]) == "kohya"
    assert safe_files.lora_format(loras["character-detail"]) == "peft"
    assert safe_files.lora_format(loras["locon-detail"]) == "locon"


def test_unsupported_lycoris_type_is_refused_at_registry_load() -> None:
    registry = load_registry(fixtures_registry_path().parent / "registry-unsupported.yaml")
    with pytest.raises(RegistryError, match=r"loha-style.*LoHa is not supported"):
        safe_files.check_registry_files(registry)


def test_missing_files_are_all_reported(tmp_path: Path) -> None:
    good = fixtures_registry()
    assert good.ip_adapter is not None
    registry = Registry(
        models=[ModelSpec(id="gone", name="g", path=tmp_path / "nope.safetensors", size=64)],
        loras=[LoraSpec(id="gone-lora", name="g", path=tmp_path / "nope-lora.safetensors")],
        ip_adapter=good.ip_adapter.model_copy(update={"reference_image": tmp_path / "missing.png"}),
    )
    with pytest.raises(RegistryError) as info:
        safe_files.check_registry_files(registry)
    message = str(info.value)
    for expected in ("model 'gone'", "LoRA 'gone-lora'", "reference_image", "not found"):
        assert expected in message


def test_missing_model_file_is_a_fatal_generation_error(tmp_path: Path) -> None:
    registry = Registry(models=[ModelSpec(id="gone", name="g", path=tmp_path / "nope.safetensors", size=64)])
    engine = DiffusersEngine(registry, engine_settings(tmp_path))
    with pytest.raises(FatalGenerationError, match="not found"):
        engine.generate(task(model="gone"), lambda step, pct: None)


@pytest.mark.parametrize(
    ("prompt", "words", "expected"),
    [
        ("a cat", ["anime style", "detailed"], "anime style, detailed, a cat"),
        (
            "Anime Style portrait, DETAILED eyes",
            ["anime style", "detailed"],
            "Anime Style portrait, DETAILED eyes",
        ),
        ("a detailed cat", ["anime style", "detailed"], "anime style, a detailed cat"),
        ("undetailed sketch", ["detailed"], "detailed, undetailed sketch"),  # whole words only
        ("a cat", ["x", "X"], "x, a cat"),  # never duplicated
        ("a cat", [], "a cat"),
    ],
)
def test_trigger_words(prompt: str, words: list[str], expected: str) -> None:
    assert add_trigger_words(prompt, words) == expected


def test_shipped_clip_tokenizer_is_the_real_one() -> None:
    tokenizer, tokenizer_2 = load_clip_tokenizers()
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer_2.pad_token == "!" and tokenizer.pad_token == "<|endoftext|>"


def test_original_layout_export_round_trips_through_diffusers_conversion() -> None:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    pipe = build_tiny_sdxl_pipeline(FIXTURE_SHAPE)
    unet = pipe.unet.state_dict()
    back = convert_ldm_unet_checkpoint(
        ldm_export.unet_to_ldm(unet, dict(pipe.unet.config)), dict(pipe.unet.config)
    )
    assert back.keys() == unet.keys() and all(torch.equal(back[k], unet[k]) for k in unet)
    vae = pipe.vae.state_dict()
    back = convert_ldm_vae_checkpoint(
        ldm_export.vae_to_ldm(vae, dict(pipe.vae.config)), dict(pipe.vae.config)
    )
    assert back.keys() == vae.keys() and all(torch.equal(back[k].reshape(vae[k].shape), vae[k]) for k in vae)
    te2 = {k: v for k, v in pipe.text_encoder_2.state_dict().items() if not k.endswith("position_ids")}
    back = convert_open_clip_checkpoint(
        pipe.text_encoder_2, ldm_export.open_clip_to_ldm(te2), ldm_export.TE2_PREFIX
    )
    assert back.keys() == te2.keys() and all(torch.equal(back[k], te2[k]) for k in te2)
