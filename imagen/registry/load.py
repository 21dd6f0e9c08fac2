"""Which registry a server serves: the YAML file ``IMAGEN_REGISTRY_PATH`` names, or the built-in one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from imagen.errors import RegistryError
from imagen.registry.builtin import builtin_registry
from imagen.registry.specs import Registry


def load_registry(path: Path | None) -> Registry:
    """Read and validate the registry file; relative paths are taken from the file's folder."""
    if path is None:
        return builtin_registry()
    try:
        raw: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise RegistryError(f"registry file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise RegistryError(f"registry file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise RegistryError(f"registry file {path} must be a mapping with `models:` (and `loras:`)")
    base = path.resolve().parent
    models = raw.get("models") or []
    declared_vae_paths = [entry.get("vae_path") if isinstance(entry, dict) else None for entry in models]
    ip_adapter = raw.get("ip_adapter")
    entries = [
        *models,
        *(raw.get("loras") or []),
        *(raw.get("controlnets") or []),
        *(raw.get("upscalers") or []),
        *(raw.get("embeddings") or []),
        *([ip_adapter] if ip_adapter else []),
    ]
    for entry in entries:
        if isinstance(entry, dict):
            for key in ("path", "vae_path", "preview_decoder", "image_encoder_path", "reference_image"):
                value = entry.get(key)
                if isinstance(value, str) and value and not Path(value).is_absolute():
                    entry[key] = str((base / value).resolve())
    try:
        registry = Registry.model_validate(raw)
    except ValidationError as exc:
        raise RegistryError(f"registry file {path} is invalid:\n{exc}") from exc
    for model, declared in zip(registry.models, declared_vae_paths, strict=True):
        model._declared_vae_path = declared
    return registry
