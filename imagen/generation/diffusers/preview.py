"""SDXL latents to preview pixels without the VAE: a linear map of the 4 latent channels to RGB, or TAESDXL.

The map is the model's own, from its registry entry (``ModelSpec.latent_rgb``): SDXL's approximation unless
the entry gives another (the demo model's is exact). It applies to the scaled latents, i.e. the ``latents``
diffusers hands the step callback; the result is in [-1, 1] like the VAE's output. For a 1024 px image it is
a 128 x 128 x 4 by 4 x 3 product: well under a millisecond, no extra weights.

A model whose registry entry names a ``preview_decoder`` (TAESDXL: a diffusers ``AutoencoderTiny`` folder)
gets sharper previews from it instead: it decodes the same latents (its ``scaling_factor`` is 1, as they
come) to full-size pixels, which ``encode_preview`` then scales down. It is loaded once with the pipeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from imagen.generation.preview import encode_preview
from imagen.registry.specs import SDXL_LATENT_RGB, LatentRgb


def latents_to_pixels(
    latents: torch.Tensor, latent_rgb: LatentRgb = SDXL_LATENT_RGB
) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """The first image of a (batch, 4, h, w) latent batch as RGB uint8 (h, w, 3), by a model's linear map."""
    first = latents[0].detach().float()
    matrix = torch.tensor(latent_rgb.factors, device=first.device)
    offset = torch.tensor(latent_rgb.bias, device=first.device)
    return _to_uint8(torch.einsum("chw,cr->hwr", first, matrix) + offset)


def _to_uint8(rgb: torch.Tensor) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """(h, w, 3) floats in [-1, 1] to uint8 pixels."""
    pixels = ((rgb.float() + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
    return np.asarray(pixels, dtype=np.uint8)


def latents_preview(latents: torch.Tensor, latent_rgb: LatentRgb = SDXL_LATENT_RGB) -> bytes:
    """A JPEG preview of the latents (``imagen.generation.preview``)."""
    return encode_preview(latents_to_pixels(latents, latent_rgb))


def load_preview_decoder(path: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """The registry's TAESDXL folder (checked safetensors-only at start) as an ``AutoencoderTiny``."""
    from diffusers import AutoencoderTiny

    decoder = AutoencoderTiny.from_pretrained(  # type: ignore[no-untyped-call]
        str(path), dtype=dtype, use_safetensors=True, local_files_only=True
    )
    return decoder.to(device).eval()


def decoder_pixels(decoder: Any, latents: torch.Tensor) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """The first image of a latent batch decoded by an ``AutoencoderTiny``, as RGB uint8 (H, W, 3)."""
    with torch.inference_mode():
        first = latents[:1].to(device=decoder.device, dtype=decoder.dtype)
        decoded = decoder.decode(first / decoder.config.scaling_factor, return_dict=False)[0]
        return _to_uint8(decoded[0].permute(1, 2, 0))


def decoder_preview(decoder: Any, latents: torch.Tensor) -> bytes:
    """A JPEG preview of the latents decoded by the model's TAESDXL."""
    return encode_preview(decoder_pixels(decoder, latents))
