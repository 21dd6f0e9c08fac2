"""Preview images for ``GET /events?preview=1``: small JPEGs of a job's image while it is denoised.

An engine turns what it holds into RGB pixels (the diffusers engine: its latents, by SDXL's linear
latent-to-RGB approximation, ``diffusers/preview.py``), and this module makes the JPEG: at most
``MAX_PREVIEW_PX`` on a side, low quality, a few kilobytes, so a preview costs the job almost nothing and
fits a pub/sub message. No torch here.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

MAX_PREVIEW_PX = 256
JPEG_QUALITY = 70


def encode_preview(pixels: np.ndarray[Any, np.dtype[np.uint8]]) -> bytes:
    """A JPEG of RGB pixels (H, W, 3), scaled down to fit ``MAX_PREVIEW_PX``."""
    image = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    if max(image.size) > MAX_PREVIEW_PX:
        image.thumbnail((MAX_PREVIEW_PX, MAX_PREVIEW_PX), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def wants_preview(step: int, every: int) -> bool:
    """After denoising step ``step`` (1-based): every ``every`` steps."""
    return step % every == 0
