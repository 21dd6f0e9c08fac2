"""The diffusers engine on the tiny fixture models (real pipelines, CPU, 2 steps, 64x64)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from imagen.errors import FatalGenerationError
from imagen.generation.base import (
    STEP_DECODING,
    STEP_ENCODING_PROMPT,
    STEP_GENERATION,
    STEP_LOADING_LORAS,
    STEP_LOADING_MODEL,
)
from imagen.generation.diffusers.engine import DiffusersEngine
from imagen.generation.diffusers.prompts import PromptEncoder
from imagen.registry import ModelSpec, Registry, builtin_registry
from imagen.testing import ldm_export
from tests.engine_fixtures import (
    ProgressLog,
    engine_settings,
    fixtures_registry,
    fixtures_registry_path,
    image_bytes,
    pixels,
    task,
)

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> DiffusersEngine:
    return DiffusersEngine(fixtures_registry(), engine_settings(tmp_path_factory.mktemp("engine")))


def test_diffusers_folder_generates_at_native_size(engine: DiffusersEngine) -> None:
    (result,) = engine.generate(task(), ProgressLog())
    assert result.image.size == (64, 64) and result.image.mode == "RGB"
    meta = result.extra_metadata
    assert meta["width"] == meta["height"] == 64
    assert meta["sampler"] == "euler" and meta["scheduler"] == "EulerDiscreteScheduler"
    assert meta["final_negative_prompt"] == fixtures_registry().models[0].default_negative
    assert pixels(result.image).std() > 0


def test_single_file_checkpoint_matches_the_diffusers_folder(engine: DiffusersEngine) -> None:
    # Same weights, original key layout: diffusers' from_single_file conversion must give the same image.
    folder = engine.generate(task(), ProgressLog())[0].image
    single = engine.generate(task(model="sdxl-single-file"), ProgressLog())[0].image
    assert image_bytes(single) == image_bytes(folder)


def test_vae_override_from_folder_and_single_file(tmp_path: Path) -> None:
    base = fixtures_registry().models[0]
    models_dir = fixtures_registry_path().parent / "models"
    # A single-file VAE in the original layout, its tiny config in the sibling ``.config/`` folder.
    vae = AutoencoderKL.from_pretrained(str(models_dir / "sdxl-base" / "vae"))
    vae_file = tmp_path / "tiny-vae.safetensors"
    save_file(
        {
            k.removeprefix("first_stage_model."): v.contiguous()
            for k, v in ldm_export.vae_to_ldm(vae.state_dict(), dict(vae.config)).items()
        },
        str(vae_file),
    )
    (tmp_path / "tiny-vae.config").mkdir()
    shutil.copy(
        models_dir / "sdxl-base" / "vae" / "config.json", tmp_path / "tiny-vae.config" / "config.json"
    )
    registry = Registry(
        models=[
            base,
            base.model_copy(update={"id": "vae-folder", "vae_path": str(models_dir / "sdxl-base" / "vae")}),
            base.model_copy(
                update={
                    "id": "vae-file",
                    "path": models_dir / "sdxl-single-file.safetensors",
                    "vae_path": str(vae_file),
                }
            ),
        ]
    )
    engine = DiffusersEngine(registry, engine_settings(tmp_path, max_loaded_models=3))
    reference = image_bytes(engine.generate(task(), ProgressLog())[0].image)
    assert image_bytes(engine.generate(task(model="vae-folder"), ProgressLog())[0].image) == reference
    assert image_bytes(engine.generate(task(model="vae-file"), ProgressLog())[0].image) == reference


def test_same_seed_same_bytes_other_seed_other_image(engine: DiffusersEngine) -> None:
    first = engine.generate(task(seed=7), ProgressLog())[0].image
    again = engine.generate(task(seed=7), ProgressLog())[0].image
    other = engine.generate(task(seed=8), ProgressLog())[0].image
    assert image_bytes(first) == image_bytes(again)
    assert image_bytes(first) != image_bytes(other)


def test_seed_reproduces_across_engines(tmp_path: Path, engine: DiffusersEngine) -> None:
    fresh = DiffusersEngine(fixtures_registry(), engine_settings(tmp_path))
    assert image_bytes(fresh.generate(task(seed=3), ProgressLog())[0].image) == image_bytes(
        engine.generate(task(seed=3), ProgressLog())[0].image
    )


def test_progress_reports_each_stage_and_each_step(tmp_path: Path) -> None:
    engine = DiffusersEngine(fixtures_registry(), engine_settings(tmp_path))
    log = ProgressLog()
    engine.generate(task(steps=4), log)
    names = log.steps()
    order = [STEP_LOADING_MODEL, STEP_LOADING_LORAS, STEP_ENCODING_PROMPT, STEP_GENERATION, STEP_DECODING]
    assert [names.index(name) for name in order] == sorted(names.index(name) for name in order)
    assert [pct for step, pct in log.calls if step == STEP_GENERATION] == [0, 25, 50, 75, 100]
    warm = ProgressLog()
    engine.generate(task(steps=4), warm)
    assert STEP_LOADING_MODEL not in warm.steps()


def test_second_job_on_a_model_loads_nothing_and_switching_frees(tmp_path: Path) -> None:
    # a memory budget smaller than one model: each model still loads, alone
    engine = DiffusersEngine(fixtures_registry(), engine_settings(tmp_path, model_memory_gb=0.001))
    engine.generate(task(), ProgressLog())
    engine.generate(task(seed=5, prompt="another prompt"), ProgressLog())
    assert engine.stats.model_loads == 1
    engine.generate(task(model="sdxl-single-file"), ProgressLog())
    assert engine.stats.model_loads == 2 and list(engine._models) == ["sdxl-single-file"]
    two = DiffusersEngine(fixtures_registry(), engine_settings(tmp_path, max_loaded_models=2))
    for model in ("sdxl-base", "sdxl-single-file", "sdxl-base", "sdxl-single-file"):
        two.generate(task(model=model), ProgressLog())
    assert two.stats.model_loads == 2


def test_long_prompt_is_not_truncated(engine: DiffusersEngine) -> None:
    words = " ".join(f"word{i % 50} scenic" for i in range(150))  # 300 words, far beyond 77 tokens
    (first,) = engine.generate(task(prompt=words + ", red sunset over the sea"), ProgressLog())
    (second,) = engine.generate(task(prompt=words + ", green forest in the snow"), ProgressLog())
    assert first.extra_metadata["final_prompt"].endswith("red sunset over the sea")
    assert image_bytes(first.image) != image_bytes(second.image)


def test_prompt_weighting_changes_the_image(engine: DiffusersEngine) -> None:
    plain = image_bytes(engine.generate(task(prompt="a lighthouse, stormy sea"), ProgressLog())[0].image)
    weighted = image_bytes(engine.generate(task(prompt="a lighthouse, (stormy sea)1.5"), ProgressLog())[0].image)
    plus = image_bytes(engine.generate(task(prompt="a lighthouse, stormy++ sea"), ProgressLog())[0].image)
    negative = image_bytes(
        engine.generate(
            task(prompt="a lighthouse, stormy sea", negative_prompt="(blurry)1.4"), ProgressLog()
        )[0].image
    )
    assert len({plain, weighted, plus, negative}) == 4


def test_default_negative_applies_only_when_none(engine: DiffusersEngine) -> None:
    (explicit,) = engine.generate(task(negative_prompt=""), ProgressLog())
    (default,) = engine.generate(task(), ProgressLog())
    assert explicit.extra_metadata["final_negative_prompt"] == ""
    assert image_bytes(explicit.image) != image_bytes(default.image)


def test_an_empty_negative_prompt_is_zeros_as_sdxl_pipelines_give_it(engine: DiffusersEngine) -> None:
    # SDXL was trained with dropped captions as zeros (pipeline config force_zeros_for_empty_prompt): guidance
    # must get zeros for "no negative prompt", not Compel's encoding of "" (a conditioning never trained on).
    engine.generate(task(), ProgressLog())
    loaded = engine._models["sdxl-base"]
    assert loaded.pipe.config.force_zeros_for_empty_prompt
    texts_encoded: list[int] = []  # texts per pass of the first text encoder
    hook = loaded.pipe.text_encoder.register_forward_hook(lambda m, args, out: texts_encoded.append(len(args[0])))
    try:
        for blank in ("", "  "):
            out = loaded.encoder.encode("a lighthouse", blank)
            assert out.negative_prompt_embeds.shape == out.prompt_embeds.shape
            assert not out.negative_prompt_embeds.any() and not out.negative_pooled_prompt_embeds.any()
        assert sum(texts_encoded) == 2  # the prompt, twice: a blank negative prompt is not encoded at all
        worded = loaded.encoder.encode("a lighthouse", "blurry")
        assert sum(texts_encoded) == 4
    finally:
        hook.remove()
    assert worded.negative_prompt_embeds.any() and worded.negative_pooled_prompt_embeds.any()
    # A model whose config does not ask for zeros gets the encoding of "", as diffusers gives it.
    loaded.pipe.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        encoded = PromptEncoder(loaded.pipe, torch.device("cpu"), torch.float32).encode("a lighthouse", "")
    finally:
        loaded.pipe.register_to_config(force_zeros_for_empty_prompt=True)
    assert encoded.negative_prompt_embeds.any() and encoded.negative_pooled_prompt_embeds.any()


def test_unknown_model_is_fatal(engine: DiffusersEngine) -> None:
    with pytest.raises(FatalGenerationError, match="unknown model"):
        engine.generate(task(model="nope"), ProgressLog())


def test_demo_model_generates_at_1024(tmp_path: Path) -> None:
    engine = DiffusersEngine(builtin_registry(), engine_settings(tmp_path, dtype="auto"))
    (result,) = engine.generate(task(model="demo", steps=2), ProgressLog())
    assert result.image.size == (1024, 1024)
    assert np.asarray(result.image).std() > 0
    info = engine.device_info()
    assert info.gpu_available is False and info.device == "cpu"


def test_dtype_setting(tmp_path: Path) -> None:
    spec = ModelSpec(id="demo", name="d", demo=True)
    engine = DiffusersEngine(Registry(models=[spec]), engine_settings(tmp_path, dtype="bfloat16"))
    assert engine.device_info().dtype == "bfloat16"
