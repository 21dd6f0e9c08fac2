"""The SDXL fields' generation-side plumbing without torch: task fields, input images, file names, samplers, the
A1111 chunk, registry defaults, and run_task with the test-pattern engine."""

from __future__ import annotations

import hashlib
import io
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagen.config import Settings
from imagen.errors import RegistryError
from imagen.generation.base import GenerationTask, InputImages, LoraChoice, StepMeter, denoising_steps
from imagen.generation.runner import run_task
from imagen.generation.samplers import sampler_available, scheduler_for
from imagen.generation.test_pattern import TestPatternEngine
from imagen.outputs.names import image_names, is_servable_name
from imagen.outputs.png import a1111_parameters
from imagen.registry import ModelSpec, builtin_registry, load_registry
from imagen.sampler_names import SAMPLER_NAMES, a1111_sampler_fields, is_sampler_name

TASK = GenerationTask(
    prompt="a lighthouse", negative_prompt=None, model="demo", steps=4, guidance_scale=5.0, seed=42
)
# The dict every task had before the SDXL fields: a request using none of the new fields must still give it.
OLD_KEYS = ["prompt", "negative_prompt", "model", "loras", "steps", "guidance_scale", "seed", "ip_strength"]


def _engine(tmp_path: Path) -> TestPatternEngine:
    return TestPatternEngine(builtin_registry(), Settings(data_dir=tmp_path, test_pattern_seconds=0.0))


def _png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as opened:
        return np.asarray(opened.convert("RGB"))


def _png_metadata(path: Path) -> tuple[dict[str, object], str]:
    with Image.open(path) as opened:
        opened.load()
        return json.loads(opened.text["imagen"]), opened.text["parameters"]


def test_default_task_dict_is_unchanged_and_new_fields_appear_only_when_set() -> None:
    assert list(TASK.as_dict()) == OLD_KEYS
    changed = replace(
        TASK, width=1216, height=832, num_images=3, scheduler="DPM++ 2M Karras", clip_skip=2, strength=0.5,
        init_image=True, mask_image=True, ip_image=True,
    )
    data = changed.as_dict()
    assert {key: data[key] for key in data if key not in OLD_KEYS} == {
        "width": 1216, "height": 832, "num_images": 3, "scheduler": "DPM++ 2M Karras", "clip_skip": 2,
        "strength": 0.5, "init_image": True, "mask_image": True, "ip_image": True,
    }
    assert GenerationTask.from_dict(json.loads(json.dumps(data))) == changed
    old = {key: TASK.as_dict()[key] for key in OLD_KEYS}  # a task stored before the SDXL fields
    assert GenerationTask.from_dict(old) == TASK
    # clip_skip=1 given explicitly is kept (it overrides a registry default of 2)
    assert replace(TASK, clip_skip=1).as_dict()["clip_skip"] == 1


def test_denoising_steps_follow_strength_as_diffusers_counts_them() -> None:
    assert denoising_steps(TASK) == 4
    assert denoising_steps(replace(TASK, steps=30, init_image=True, strength=0.5)) == 15
    assert denoising_steps(replace(TASK, steps=30, init_image=True, strength=0.75)) == 22
    assert denoising_steps(replace(TASK, steps=30, init_image=True, strength=1.0)) == 30
    assert denoising_steps(replace(TASK, steps=30, init_image=True, strength=0.0)) == 0
    assert denoising_steps(replace(TASK, steps=30, strength=0.5)) == 30  # no init image: no strength
    assert denoising_steps(replace(TASK, steps=30, init_image=True)) == 22  # the default strength, 0.75
    meter = StepMeter(denoising_steps(replace(TASK, steps=30, init_image=True, strength=0.5)))
    assert meter("generation_gpu", 100) == {"current_step": 15, "total_steps": 15, "eta_s": 0.0}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_input_images_decode_by_role() -> None:
    init = Image.new("RGB", (8, 4), (10, 20, 30))
    mask = Image.new("L", (8, 4), 255)
    decoded = InputImages.from_png_bytes({"init": _png(init), "mask": _png(mask.convert("RGB"))})
    assert decoded.init is not None and decoded.init.mode == "RGB" and decoded.init.size == (8, 4)
    assert decoded.mask is not None and decoded.mask.mode == "L" and decoded.mask.getpixel((0, 0)) == 255
    assert decoded.ip is None
    assert InputImages.from_png_bytes({}) == InputImages()
    with pytest.raises(ValueError, match="unknown input image roles: style"):
        InputImages.from_png_bytes({"style": _png(init)})


def test_image_names() -> None:
    name = "sdxl_base_20260130_123456_abc123.png"
    assert image_names(name, 1) == [name]
    assert image_names(name, 3) == [
        name, "sdxl_base_20260130_123456_abc123_1.png", "sdxl_base_20260130_123456_abc123_2.png"
    ]
    assert all(is_servable_name(n) for n in image_names(name, 4))
    with pytest.raises(ValueError):
        image_names(name, 0)


def test_sampler_names_and_mapping() -> None:
    assert len(SAMPLER_NAMES) == 16 and SAMPLER_NAMES[0] == "Euler" and SAMPLER_NAMES[-1] == "TCD"
    assert scheduler_for("DPM++ 2M Karras").class_name == "DPMSolverMultistepScheduler"
    assert scheduler_for("DPM++ 2M Karras").overrides == {"use_karras_sigmas": True}
    assert scheduler_for("DPM++ 2M SDE").overrides == {"algorithm_type": "sde-dpmsolver++"}
    assert scheduler_for("DPM++ SDE Karras").class_name == "DPMSolverSinglestepScheduler"
    assert scheduler_for("Euler a").class_name == "EulerAncestralDiscreteScheduler"
    assert scheduler_for("DPM2 a").class_name == "KDPM2AncestralDiscreteScheduler"
    with pytest.raises(ValueError, match="unknown scheduler 'euler'"):
        scheduler_for("euler")
    assert not is_sampler_name("euler") and is_sampler_name("UniPC")
    assert a1111_sampler_fields("DPM++ 2M SDE Karras") == ("DPM++ 2M SDE", "Karras")
    assert a1111_sampler_fields("Euler a") == ("Euler a", None)
    assert a1111_sampler_fields("Euler SGM Uniform") == ("Euler", "SGM Uniform")
    assert scheduler_for("Euler SGM Uniform").overrides == {"timestep_spacing": "trailing"}
    assert (scheduler_for("LCM").class_name, scheduler_for("TCD").class_name) == ("LCMScheduler", "TCDScheduler")
    assert all(sampler_available(name) for name in SAMPLER_NAMES if name != "LMS")


def test_samplers_module_imports_neither_torch_nor_diffusers() -> None:
    import subprocess

    code = "import sys, imagen.generation.samplers; print(any(m in sys.modules for m in ('torch', 'diffusers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a1111_parameters_add_the_new_fields_only_when_used() -> None:
    default = {**TASK.as_dict(), "sampler": "euler", "width": 1024, "height": 1024}
    assert a1111_parameters(default) == (
        "a lighthouse\nSteps: 4, Sampler: euler, CFG scale: 5.0, Seed: 42, Size: 1024x1024, Model: demo, "
        "Version: imagen"
    )
    used = {
        **default, "sampler": "DPM++ 2M Karras", "width": 1216, "height": 832, "clip_skip": 2, "strength": 0.5,
    }
    assert a1111_parameters(used).splitlines()[1] == (
        "Steps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.0, Seed: 42, Size: 1216x832, "
        "Model: demo, Denoising strength: 0.5, Clip skip: 2, Version: imagen"
    )
    rescaled = {**default, "guidance_rescale": 0.7}
    assert "CFG scale: 5.0, Seed: 42, Size: 1024x1024, Model: demo, CFG Rescale phi: 0.7, Version: imagen" in (
        a1111_parameters(rescaled)
    )


def test_registry_scheduler_and_clip_skip(tmp_path: Path) -> None:
    spec = ModelSpec(id="pony", name="Pony", demo=True, scheduler="Euler a", clip_skip=2)
    assert (spec.scheduler, spec.clip_skip) == ("Euler a", 2)
    assert ModelSpec(id="plain", name="Plain", demo=True).scheduler is None
    for bad in ("scheduler: euler_a", "clip_skip: 3"):
        path = tmp_path / "registry.yaml"
        path.write_text(f"models:\n  - id: pony\n    name: Pony\n    demo: true\n    {bad}\n")
        with pytest.raises(RegistryError, match=r"scheduler|clip_skip"):
            load_registry(path)


def test_default_png_is_byte_identical_to_before(tmp_path: Path) -> None:
    # Recorded with the code before the SDXL fields (commit 2edab76), same engine and task.
    task = GenerationTask(
        prompt="a lighthouse on a cliff at dusk", negative_prompt=None, model="demo", steps=2,
        guidance_scale=5.0, seed=42,
    )
    engine = TestPatternEngine(builtin_registry(), Settings(data_dir=tmp_path, test_pattern_seconds=0.0))
    result = run_task(engine, task, "x.png", tmp_path / "out", lambda step, percent: None)
    digest = hashlib.sha256((tmp_path / "out" / "x.png").read_bytes()).hexdigest()
    assert digest == "39233cecabd63c0522c85f1359427c3e5931158307813e31ba468908717e0eec"
    assert result["images"] == [
        {"filename": "x.png", "path": str(tmp_path / "out" / "x.png"), "url": "/outputs/x.png", "seed": 42}
    ]
    assert list(result["metadata"]) == [*OLD_KEYS, "width", "height"]


def test_run_task_writes_every_image_with_its_own_seed(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    task = replace(TASK, num_images=4, width=96, height=64)
    name = "demo_20260130_123456_abc123.png"
    result = run_task(engine, task, name, tmp_path / "out", lambda step, percent: None)
    names = image_names(name, 4)
    assert [image["filename"] for image in result["images"]] == names
    assert [image["seed"] for image in result["images"]] == [42, 43, 44, 45]
    assert result["filename"] == name and result["url"] == f"/outputs/{name}"
    assert result["path"] == str(tmp_path / "out" / name) and result["metadata"]["seed"] == 42
    arrays = [_png_pixels(tmp_path / "out" / n) for n in names]
    assert all(array.shape == (64, 96, 3) for array in arrays)
    assert len({array.tobytes() for array in arrays}) == 4
    metadata, parameters = _png_metadata(tmp_path / "out" / names[3])
    assert metadata["seed"] == 45 and metadata["num_images"] == 4 and "Seed: 45," in parameters
    # image 3 is the same request alone with seed + 3
    alone = run_task(engine, replace(task, num_images=1, seed=45), "alone.png", tmp_path / "out", lambda s, p: None)
    assert np.array_equal(_png_pixels(Path(alone["path"])), arrays[3])


def test_test_pattern_takes_the_init_image_size_and_denoises_strength_x_steps(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    calls: list[tuple[str, int]] = []
    task = replace(TASK, steps=10, init_image=True, strength=0.5)
    (image,) = engine.generate(task, lambda s, p: calls.append((s, p)), InputImages(init=Image.new("RGB", (80, 48))))
    assert image.image.size == (80, 48)
    assert [p for s, p in calls if s == "generation_gpu"] == [0, 20, 40, 60, 80, 100]  # 5 steps of 10, then done


def test_task_with_loras_round_trips(tmp_path: Path) -> None:
    task = replace(TASK, loras=(LoraChoice("a", 0.5),), scheduler="UniPC")
    assert GenerationTask.from_dict(task.as_dict()) == task
