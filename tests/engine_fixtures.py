"""Helpers for the engine tests: the tiny fixtures (written once per test process), task builders."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from imagen.config import Settings
from imagen.generation.base import GenerationTask, LoraChoice
from imagen.registry import Registry, load_registry
from imagen.testing.fixtures import write_fixtures


@cache
def fixtures_registry_path() -> Path:
    """Write the fixtures once per test process (session-wide, whichever test module asks first)."""
    directory = Path(tempfile.mkdtemp(prefix="imagen-engine-fixtures-"))
    return write_fixtures(directory)


def fixtures_registry() -> Registry:
    return load_registry(fixtures_registry_path())


def fixtures_registry_data() -> dict[str, Any]:
    """The fixtures' registry as YAML data with every path absolute: a test edits it and writes it anywhere."""
    root = fixtures_registry_path().parent
    raw: dict[str, Any] = yaml.safe_load(fixtures_registry_path().read_text(encoding="utf-8"))
    for section in ("models", "loras", "controlnets", "upscalers", "embeddings"):
        for entry in raw.get(section, []):
            entry["path"] = str(root / entry["path"])
    for key in ("path", "image_encoder_path", "reference_image"):
        raw["ip_adapter"][key] = str(root / raw["ip_adapter"][key])
    return raw


def engine_settings(tmp: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"device": "cpu", "dtype": "float32", "data_dir": tmp, "engine": "diffusers"}
    values.update(overrides)
    return Settings(**values)


BASE_TASK = GenerationTask(
    prompt="a lighthouse on a cliff at dusk",
    negative_prompt=None,
    model="sdxl-base",
    steps=2,
    guidance_scale=5.0,
    seed=42,
)


def task(**changes: Any) -> GenerationTask:
    if "loras" in changes:
        changes["loras"] = tuple(LoraChoice(name, weight) for name, weight in changes["loras"])
    return replace(BASE_TASK, **changes)


class ProgressLog:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, step: str, progress: int) -> None:
        self.calls.append((step, progress))

    def steps(self) -> list[str]:
        return [step for step, _ in self.calls]


def pixels(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def image_bytes(image: Any) -> bytes:
    return bytes(image.tobytes())
