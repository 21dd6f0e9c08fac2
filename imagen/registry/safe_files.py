"""Safetensors-only file checks, done before any file reaches torch or diffusers.

Pickle-based weights (``.ckpt``, ``.pt``, ``.bin``, ``.pth``, or a pickle renamed ``.safetensors``) can run
arbitrary code when loaded, so they are refused from their name and their first bytes, never opened by a
loader. Everything here reads headers only (the 8-byte length and the JSON that follows) and imports no
torch: the API calls :func:`check_registry_files` at start-up so that a bad registry fails there, not in
the middle of a job.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from imagen.errors import RegistryError
from imagen.registry import Registry

PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Diffusers folder components that carry weights (each must hold a .safetensors file).
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")

# LyCORIS algorithms told apart by their key suffixes; only LoRA / LoCon map onto diffusers' PEFT loader.
UNSUPPORTED_LYCORIS = {
    "hada_w1_a": "LoHa",
    "hada_w1_b": "LoHa",
    "lokr_w1": "LoKr",
    "lokr_w1_a": "LoKr",
    "lokr_w2": "LoKr",
    "oft_blocks": "OFT",
    "oft_diag": "OFT",
    "lora_mid": "LoCon with Tucker decomposition (lora_mid)",
    "diff": "full-weight diff (LyCORIS 'full')",
    "w_norm": "norm-layer diff",
}
KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
PEFT_MARKERS = ("lora_A.", "lora_B.", "lora.down.", "lora.up.", "lora_magnitude_vector", ".alpha")


class UnsafeFileError(ValueError):
    """A weight file that is not a loadable safetensors file (missing, pickle, corrupt)."""


def _pickle_hint(path: Path) -> str:
    return (
        f"{path} is a pickle-based checkpoint; only .safetensors files are loaded "
        "(pickle files can run code). "
        "Convert it to safetensors first."
    )


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, after checking that the file really is one."""
    if not path.exists():
        raise UnsafeFileError(f"file not found: {path}")
    if not path.is_file():
        raise UnsafeFileError(f"not a file: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFileError(_pickle_hint(path))
    if path.suffix.lower() != ".safetensors":
        raise UnsafeFileError(f"{path}: expected a .safetensors file")
    size = path.stat().st_size
    with path.open("rb") as handle:
        start = handle.read(8)
        length = struct.unpack("<Q", start)[0] if len(start) == 8 else 0
        # read as safetensors first: a small header's length can itself begin with 0x80 (a 128-255 byte header)
        raw = handle.read(length) if 2 <= length <= min(MAX_HEADER_BYTES, size - 8) else b""
    if not raw.startswith(b"{"):
        if start[:2] == b"PK" or start[:1] == b"\x80":
            # A torch zip archive or a raw pickle stream (protocol 2+ starts with 0x80), renamed.
            raise UnsafeFileError(_pickle_hint(path) + " (its content is a pickle despite its name)")
        if len(start) < 8:
            raise UnsafeFileError(f"{path} is not a safetensors file (too short)")
        if not raw:
            raise UnsafeFileError(f"{path} is not a safetensors file (bad header length)")
        raise UnsafeFileError(f"{path} is not a safetensors file (header is not JSON)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsafeFileError(f"{path} is not a safetensors file (header: {exc})") from exc
    if not isinstance(header, dict):
        raise UnsafeFileError(f"{path} is not a safetensors file (header is not a mapping)")
    return header


def tensor_names(path: Path) -> list[str]:
    return [name for name in read_safetensors_header(path) if name != "__metadata__"]


def check_diffusers_folder(path: Path, components: Iterable[str] = WEIGHT_COMPONENTS) -> None:
    """A diffusers pipeline folder whose weight components all have safetensors files."""
    if not (path / "model_index.json").is_file():
        raise UnsafeFileError(f"{path} is not a diffusers folder (no model_index.json)")
    for component in components:
        folder = path / component
        if folder.is_dir():
            check_weights_folder(folder)


def check_weights_folder(folder: Path) -> None:
    """A diffusers / transformers model folder (config.json + safetensors weights)."""
    if not folder.is_dir():
        raise UnsafeFileError(f"folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise UnsafeFileError(f"{folder} has no config.json")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        detail = f" (only pickle weights: {', '.join(pickles)})" if pickles else ""
        raise UnsafeFileError(f"{folder} has no .safetensors weights{detail}")
    for weight in weights:
        read_safetensors_header(weight)


def check_model_path(path: Path) -> None:
    """A model: a diffusers folder or a single-file safetensors checkpoint."""
    if path.is_dir():
        check_diffusers_folder(path)
    else:
        read_safetensors_header(path)


def check_vae_path(path: Path) -> None:
    if path.is_dir():
        check_weights_folder(path)
    else:
        read_safetensors_header(path)


def check_controlnet_path(path: Path) -> None:
    """A ControlNet: a diffusers model folder or one safetensors file."""
    if path.is_dir():
        check_weights_folder(path)
    else:
        read_safetensors_header(path)


def check_embedding(path: Path) -> None:
    """An SDXL textual inversion: a safetensors file with ``clip_l`` and ``clip_g`` (A1111 / civitai)."""
    names = set(tensor_names(path))
    missing = [name for name in ("clip_l", "clip_g") if name not in names]
    if missing:
        raise UnsafeFileError(f"{path} is not an SDXL embedding: no {' or '.join(missing)} tensor "
                              f"(it holds {', '.join(sorted(names)[:5]) or 'nothing'})")


def lora_format(path: Path) -> str:
    """``kohya``, ``locon`` or ``peft``; raises :class:`UnsafeFileError` for unsupported LyCORIS types."""
    names = tensor_names(path)
    if not names:
        raise UnsafeFileError(f"{path} holds no tensors")
    found = sorted(
        {
            kind
            for name in names
            for suffix, kind in UNSUPPORTED_LYCORIS.items()
            if name.endswith("." + suffix)
        }
    )
    if found:
        raise UnsafeFileError(
            f"{path}: LyCORIS type {', '.join(found)} is not supported "
            "(supported: LoRA and LoCon in kohya or "
            "diffusers/PEFT layout)"
        )
    if all(name.endswith(KOHYA_SUFFIXES) for name in names) and any(".lora_down." in name for name in names):
        # LoCon = kohya/LyCORIS LoRA that also adapts convolutions (4-D down weights).
        header = read_safetensors_header(path)
        conv = any(
            name.endswith("lora_down.weight") and len(header[name].get("shape", [])) == 4 for name in names
        )
        return "locon" if conv else "kohya"
    if all(any(marker in name for marker in PEFT_MARKERS) for name in names):
        return "peft"
    unknown = next(n for n in names if not any(m in n for m in (*PEFT_MARKERS, *KOHYA_SUFFIXES)))
    raise UnsafeFileError(f"{path}: not a LoRA file in a known layout (unexpected tensor {unknown!r})")


def check_image(path: Path) -> None:
    if not path.is_file():
        raise UnsafeFileError(f"reference image not found: {path}")


def registry_problems(registry: Registry) -> list[str]:
    """Every unusable path in the registry, one message each (empty list: all good)."""
    problems: list[str] = []

    def attempt(label: str, check: Any, path: Path) -> None:
        try:
            check(path)
        except UnsafeFileError as exc:
            problems.append(f"{label}: {exc}")

    for model in registry.models:
        if model.preview_decoder is not None:
            attempt(f"model {model.id!r} preview_decoder", check_weights_folder, model.preview_decoder)
        if model.path is not None:
            attempt(f"model {model.id!r}", check_model_path, model.path)
        if model.vae_path:
            attempt(f"model {model.id!r} vae_path", check_vae_path, Path(model.vae_path))
    for lora in registry.loras:
        attempt(f"LoRA {lora.id!r}", lora_format, lora.path)
    for controlnet in registry.controlnets:
        attempt(f"ControlNet {controlnet.id!r}", check_controlnet_path, controlnet.path)
    for embedding in registry.embeddings:
        attempt(f"embedding {embedding.name!r}", check_embedding, embedding.path)
    for upscaler in registry.upscalers:
        attempt(f"upscaler {upscaler.id!r}", read_safetensors_header, upscaler.path)
    if registry.ip_adapter is not None:
        ip = registry.ip_adapter
        attempt("ip_adapter path", read_safetensors_header, ip.path)
        attempt("ip_adapter image_encoder_path", check_weights_folder, ip.image_encoder_path)
        attempt("ip_adapter reference_image", check_image, ip.reference_image)
    return problems


def check_registry_files(registry: Registry) -> None:
    """Raise :class:`RegistryError` listing every missing, pickle or unsupported file the registry names."""
    problems = registry_problems(registry)
    if problems:
        raise RegistryError("the registry names unusable files:\n- " + "\n- ".join(problems))
