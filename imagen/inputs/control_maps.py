"""Control maps for ControlNet: what a preprocessor makes of a control image, and how a map is fitted to the
picture's size.

The preprocessors here need no weights: ``none`` (the image is already a control map) and ``canny``
(OpenCV's Canny edge detector, with its two hysteresis thresholds, as AUTOMATIC1111's ControlNet extension
runs it). Preprocessors that need weights (depth, pose, line art) are not offered: nothing is downloaded at
run time, and none is installed (docs/controlnet.md says how this may grow).

As in the ControlNet extension, a preprocessor runs on the image scaled so that its short side is
``processor_res`` (none given: the picture's own short side, A1111's "pixel perfect"), and the map it makes
is then fitted to the picture's size by the unit's ``resize_mode``:

* ``crop`` ("Crop and Resize"): scaled to cover the picture, the overflow cropped evenly;
* ``fill`` ("Resize and Fill"): scaled to fit inside, the rest filled with black (no control there);
* ``stretch`` ("Just Resize"): scaled to the picture's size, its aspect ratio not kept.

Pure CPU work with numpy, OpenCV and Pillow (no torch): the worker runs it for each job and the API runs it in
a worker thread for ``POST /controlnet/detect``, the page's preview of a map.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image

Preprocessor = Literal["none", "canny"]
PREPROCESSORS: dict[str, str] = {
    "none": "The image is already a control map (edges, depth, pose...): used as it is.",
    "canny": "OpenCV's Canny edges (white on black), with `low_threshold` and `high_threshold` (1-255).",
}
ResizeMode = Literal["crop", "fill", "stretch"]
RESIZE_MODES = ("crop", "fill", "stretch")
# AUTOMATIC1111's names for the resize modes (its ControlNet extension also takes their index, 0-2).
A1111_RESIZE_MODES: dict[str, ResizeMode] = {
    "Just Resize": "stretch",
    "Crop and Resize": "crop",
    "Resize and Fill": "fill",
}
A1111_NAMES: dict[ResizeMode, str] = {ours: theirs for theirs, ours in A1111_RESIZE_MODES.items()}

DEFAULT_LOW_THRESHOLD = 100
DEFAULT_HIGH_THRESHOLD = 200
MIN_PROCESSOR_RES = 64
MAX_PROCESSOR_RES = 2048


def detect(
    image: Image.Image,
    preprocessor: str,
    low_threshold: int = DEFAULT_LOW_THRESHOLD,
    high_threshold: int = DEFAULT_HIGH_THRESHOLD,
    processor_res: int | None = None,
) -> Image.Image:
    """The control map ``preprocessor`` makes of ``image`` (RGB), at ``processor_res`` on its short side
    (None: the image's own size)."""
    rgb = image.convert("RGB")
    if preprocessor == "none":
        return rgb
    if preprocessor != "canny":
        raise ValueError(f"unknown preprocessor {preprocessor!r}; available: {', '.join(PREPROCESSORS)}")
    import cv2  # here: the API process imports this module for its names and needs OpenCV only to detect

    if processor_res is not None:
        rgb = _short_side(rgb, processor_res)
    edges = cv2.Canny(np.asarray(rgb), low_threshold, high_threshold)
    return Image.fromarray(np.ascontiguousarray(np.stack([edges] * 3, axis=-1)), "RGB")


def fit(control_map: Image.Image, width: int, height: int, resize_mode: str) -> Image.Image:
    """The map at exactly ``width`` x ``height``, by ``resize_mode`` (crop, fill or stretch)."""
    if control_map.size == (width, height):
        return control_map
    if resize_mode == "stretch":
        return control_map.resize((width, height), Image.Resampling.LANCZOS)
    source_w, source_h = control_map.size
    cover = resize_mode == "crop"
    scale = (max if cover else min)(width / source_w, height / source_h)
    scaled_w, scaled_h = max(1, round(source_w * scale)), max(1, round(source_h * scale))
    scaled = control_map.resize((scaled_w, scaled_h), Image.Resampling.LANCZOS)
    if cover:
        left, top = (scaled_w - width) // 2, (scaled_h - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    canvas = Image.new("RGB", (width, height))
    canvas.paste(scaled, ((width - scaled_w) // 2, (height - scaled_h) // 2))
    return canvas


def _short_side(image: Image.Image, side: int) -> Image.Image:
    width, height = image.size
    scale = side / min(width, height)
    if scale == 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
