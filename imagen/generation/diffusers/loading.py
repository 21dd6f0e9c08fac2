"""Turn a registry :class:`ModelSpec` into a ``StableDiffusionXLPipeline`` on its device, with no network access.

:func:`resolve_device` / :func:`resolve_dtype` turn the settings into a device and dtype, :func:`load_pipeline`
reads the files (on CPU), :func:`place_pipeline` puts the pipeline on its device (or sets up CPU offload).

* a diffusers folder: ``from_pretrained(..., use_safetensors=True)`` so no ``.bin`` is ever unpickled; one
  without tokenizers (the shipped demo model's, which its ``demo: true`` entry names) gets the shipped CLIP
  tokenizers.
* a single ``.safetensors`` checkpoint in the original (StabilityAI / civitai) key layout:
  ``from_single_file`` with the SDXL base configs shipped in ``imagen/data/sdxl-base`` and the shipped CLIP
  tokenizers. A checkpoint with another architecture size (e.g. the tiny test fixtures) can carry its own
  configs in a sibling diffusers-layout folder named ``<file name without .safetensors>.config/``.
* ``vae_path``: a diffusers VAE folder or a single ``.safetensors`` VAE (same sibling ``.config/`` rule).

Every file is checked by :mod:`imagen.registry.safe_files` before a loader sees it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline  # untyped

from imagen.config import Settings
from imagen.errors import FatalGenerationError, ImagenError, is_out_of_memory
from imagen.generation.diffusers.components import SDXL_CONFIG_DIR, SDXL_REFINER_CONFIG_DIR, load_clip_tokenizers
from imagen.registry import ModelSpec, safe_files


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ImagenError("IMAGEN_DEVICE=cuda but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """Native bf16 arithmetic (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="ignore")
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice != "auto":
        return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[choice]
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def sibling_config_dir(path: Path) -> Path | None:
    """``foo.safetensors`` → ``foo.config/`` when that folder exists (configs for a non-standard size)."""
    candidate = path.with_name(path.stem + ".config")
    return candidate if candidate.is_dir() else None


def _tokenizer_kwargs(folder: Path, refiner: bool = False) -> dict[str, Any]:
    """The shipped CLIP tokenizers, unless the folder brings its own (a refiner has the second only)."""
    if refiner:
        kwargs: dict[str, Any] = {"text_encoder": None, "tokenizer": None}
        if not (folder / "tokenizer_2").is_dir():
            kwargs["tokenizer_2"] = load_clip_tokenizers()[1]
        return kwargs
    if (folder / "tokenizer").is_dir() and (folder / "tokenizer_2").is_dir():
        return {}
    tokenizer, tokenizer_2 = load_clip_tokenizers()
    return {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2}


def load_vae(path: Path, dtype: torch.dtype) -> Any:
    try:
        safe_files.check_vae_path(path)
    except safe_files.UnsafeFileError as exc:
        raise FatalGenerationError(str(exc)) from exc
    if path.is_dir():
        vae = AutoencoderKL.from_pretrained(  # type: ignore[no-untyped-call]
            str(path), dtype=dtype, use_safetensors=True, local_files_only=True
        )
    else:
        config = sibling_config_dir(path)
        if config is not None and (config / "config.json").is_file():
            kwargs: dict[str, Any] = {"config": str(config)}
        else:
            kwargs = {"config": str(config or SDXL_CONFIG_DIR), "subfolder": "vae"}
        vae = AutoencoderKL.from_single_file(str(path), dtype=dtype, local_files_only=True, **kwargs)
    return vae


def load_pipeline(spec: ModelSpec, dtype: torch.dtype, reuse: Mapping[str, Any] | None = None) -> Any:
    """Load (on CPU, in ``dtype``) the pipeline a registry entry describes. ``reuse``: components already in
    memory (by name: ``vae``, ``text_encoder``...) that the pipeline takes instead of reading its own."""
    assert spec.path is not None  # the registry guarantees it (a demo entry gets the shipped folder)
    path = Path(spec.path)
    try:
        safe_files.check_model_path(path)
    except safe_files.UnsafeFileError as exc:
        raise FatalGenerationError(f"model {spec.id!r}: {exc}") from exc
    extra: dict[str, Any] = dict(reuse or {})
    try:
        if spec.vae_path and "vae" not in extra:
            extra["vae"] = load_vae(Path(spec.vae_path), dtype)
        # a refiner only finishes other models' pictures: the img2img pipeline, with its one text encoder
        pipeline_class = StableDiffusionXLImg2ImgPipeline if spec.refiner else StableDiffusionXLPipeline
        if path.is_dir():
            pipe = pipeline_class.from_pretrained(  # type: ignore[no-untyped-call]
                str(path),
                dtype=dtype,
                use_safetensors=True,
                local_files_only=True,
                **_tokenizer_kwargs(path, spec.refiner),
                **extra,
            )
        else:
            config = sibling_config_dir(path) or (SDXL_REFINER_CONFIG_DIR if spec.refiner else SDXL_CONFIG_DIR)
            pipe = pipeline_class.from_single_file(
                str(path),
                config=str(config),
                dtype=dtype,
                local_files_only=True,
                **_tokenizer_kwargs(config, spec.refiner),
                **extra,
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        if is_out_of_memory(exc):
            raise
        raise FatalGenerationError(f"model {spec.id!r} could not be loaded: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


SEQUENTIAL_OFFLOAD_KEEPS = ("text_encoder", "text_encoder_2")


def place_pipeline(pipe: Any, device: torch.device, settings: Settings) -> None:
    """On ``device``, or with CPU offload on CUDA; VAE tiling / slicing as configured."""
    if device.type == "cuda" and settings.cpu_offload == "model":
        pipe.enable_model_cpu_offload()
    elif device.type == "cuda" and settings.cpu_offload == "sequential":
        # Compel moves the text encoders' output to `text_encoder.device`, which sequential offload makes
        # "meta" (no data: compel cannot read it). The text encoders stay whole on the GPU (SDXL's: 1.6 GB in fp16);
        # the UNet and the VAE stream layer by layer.
        pipe._exclude_from_cpu_offload = [*pipe._exclude_from_cpu_offload, *SEQUENTIAL_OFFLOAD_KEEPS]
        pipe.enable_sequential_cpu_offload()
    else:
        pipe.to(device)
    if settings.vae_tiling:
        pipe.vae.enable_tiling()
        # SDXL's VAE config tiles above its sample_size (1024 px), i.e. never at SDXL's own 1024²:
        # 512 px tiles (64 latents) so that tiling actually lowers the decode's peak memory there.
        if getattr(pipe.vae, "tile_sample_min_size", 0) >= 1024:
            pipe.vae.tile_sample_min_size = 512
            pipe.vae.tile_latent_min_size = 64
    if settings.vae_slicing:
        pipe.vae.enable_slicing()
