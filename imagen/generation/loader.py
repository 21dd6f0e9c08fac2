"""Builds the engine named by ``settings.engine`` (inside a worker process)."""

from __future__ import annotations

import importlib

from imagen.config import Settings
from imagen.errors import ImagenError
from imagen.generation.base import Engine
from imagen.registry import Registry

BUILTIN_ENGINES = {
    "diffusers": "imagen.generation.diffusers.engine:DiffusersEngine",
    "test-pattern": "imagen.generation.test_pattern:TestPatternEngine",
}


def load_engine(settings: Settings, registry: Registry) -> Engine:
    target = BUILTIN_ENGINES.get(settings.engine, settings.engine)
    module_name, _, class_name = target.partition(":")
    if not class_name:
        raise ImagenError(
            f"IMAGEN_ENGINE={settings.engine!r}: use one of {sorted(BUILTIN_ENGINES)} or `module:Class`"
        )
    engine_class = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(engine_class, type) and issubclass(engine_class, Engine)):
        raise ImagenError(f"IMAGEN_ENGINE={settings.engine!r} is not an imagen Engine subclass")
    return engine_class(registry, settings)
