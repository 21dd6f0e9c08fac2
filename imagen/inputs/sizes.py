"""Image sizes a job may have: the rule for ``width``/``height``, SDXL's aspect buckets, and the size an
img2img job takes from its init image."""

from __future__ import annotations

import math

MIN_SIDE, MAX_SIDE, SIDE_STEP = 512, 2048, 64
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # 4.2 MP

# SDXL's training buckets around 1024² (portrait and landscape), as SDXL's report lists them.
SDXL_BUCKETS: tuple[tuple[int, int], ...] = (
    (1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344), (1536, 640),
    (640, 1536),
)  # fmt: skip


def recommended_sizes(native: int) -> list[tuple[int, int]]:
    """What ``GET /models`` recommends for a model of native size ``native``²."""
    return list(SDXL_BUCKETS) if native == 1024 else [(native, native)]


def size_problem(width: int, height: int) -> str | None:
    """Why (width, height) is not a size a request may ask for; None when it is."""
    for name, side in (("width", width), ("height", height)):
        if side % SIDE_STEP or not MIN_SIDE <= side <= MAX_SIDE:
            return f"{name} must be a multiple of {SIDE_STEP} from {MIN_SIDE} to {MAX_SIDE}, not {side}"
    if width * height > MAX_PIXELS:
        return f"at most {MAX_PIXELS:,} pixels ({MAX_SIDE}×{MAX_SIDE}), not {width}×{height}"
    return None


# The hires fix's final sides: multiples of 64 like every size here, so whole latent cells for any VAE
# (SDXL's: 8 pixels a cell; the demo model's: 32).
HIRES_STEP = SIDE_STEP


def hires_size(
    width: int,
    height: int,
    scale: float,
    target_width: int | None,
    target_height: int | None,
    step: int = HIRES_STEP,
) -> tuple[int, int]:
    """A picture's size made larger, as A1111 computes it (the hires fix, the extras' upscale): ``width`` x
    ``height`` times ``scale``; or the target given (one side only: the other keeps the aspect); each side
    rounded to a multiple of ``step`` (64 for the hires fix; 1 for a plain upscale)."""

    def rounded(side: float) -> int:
        return max(step, step * round(side / step))

    if target_width and target_height:
        return rounded(target_width), rounded(target_height)
    if target_width:
        return rounded(target_width), rounded(height * target_width / width)
    if target_height:
        return rounded(width * target_height / height), rounded(target_height)
    return rounded(width * scale), rounded(height * scale)


def output_size_problem(width: int, height: int, max_pixels: int) -> str | None:
    """Why a final picture of (width, height) is too big for this server (IMAGEN_MAX_OUTPUT_PIXELS)."""
    if width * height > max_pixels:
        return f"at most {max_pixels:,} pixels on this server (IMAGEN_MAX_OUTPUT_PIXELS), not {width}×{height}"
    return None


def _round_side(side: float) -> int:
    return max(MIN_SIDE, min(MAX_SIDE, SIDE_STEP * round(side / SIDE_STEP)))


def size_from_image(width: int, height: int) -> tuple[int, int]:
    """The job size of an img2img request that gives none: the image's, scaled into the allowed range (its
    aspect kept as far as the range allows) and rounded to multiples of 64."""
    scale = 1.0
    if width * height > MAX_PIXELS:
        scale = math.sqrt(MAX_PIXELS / (width * height))
    if min(width, height) * scale < MIN_SIDE:
        scale = MIN_SIDE / min(width, height)
    if max(width, height) * scale > MAX_SIDE:
        scale = MAX_SIDE / max(width, height)
    return _round_side(width * scale), _round_side(height * scale)
