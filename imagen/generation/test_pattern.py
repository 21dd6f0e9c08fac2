"""A deterministic engine without torch: a colour pattern derived from the task, after a fixed time.

Used by the job-system tests and benchmarks (a generator that takes a known time, as a GPU would) and
handy to try the API on a machine with no model at all (``IMAGEN_ENGINE=test-pattern``).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace

import numpy as np
from PIL import Image

from imagen.generation.base import (
    NO_INPUTS,
    STEP_DECODING,
    STEP_GENERATION,
    STEP_LOADING_MODEL,
    DeviceInfo,
    Engine,
    GeneratedImage,
    GenerationTask,
    InputImages,
    ProgressCallback,
    denoising_steps,
)
from imagen.generation.preview import encode_preview, wants_preview


class TestPatternEngine(Engine):
    __test__ = False  # not a pytest class

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(gpu_available=False, device="cpu", dtype=None)

    def generate(
        self, task: GenerationTask, progress: ProgressCallback, inputs: InputImages = NO_INPUTS
    ) -> list[GeneratedImage]:
        """Takes ``test_pattern_seconds`` in all (drawing included), like a GPU with a fixed step time and
        a batch as fast as one image. Image i is the pattern of the same task alone with seed + i."""
        start = time.perf_counter()
        spec = self.registry.model(task.model)
        native = spec.size if spec is not None else 1024
        if task.width is not None and task.height is not None:
            width, height = task.width, task.height
        elif inputs.init is not None:
            width, height = inputs.init.size
        else:
            width, height = native, native
        progress(STEP_LOADING_MODEL, 0)
        tiles, drawn = [], []
        for index in range(task.num_images):
            alone = task if task.num_images == 1 else replace(task, seed=task.seed + index, num_images=1)
            digest = hashlib.sha256(repr(sorted(alone.as_dict().items())).encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            tile = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
            tiles.append(tile)
            scale_y, scale_x = -(-height // tile.shape[0]), -(-width // tile.shape[1])
            drawn.append(np.ascontiguousarray(tile.repeat(scale_y, axis=0).repeat(scale_x, axis=1)[:height, :width]))
        steps = denoising_steps(task)
        step_seconds = self.settings.test_pattern_seconds / max(1, steps)
        preview = self.preview
        for step in range(steps):
            progress(STEP_GENERATION, int(100 * step / steps))
            if preview is not None and wants_preview(step + 1, self.settings.preview_every_steps):
                preview(step + 1, encode_preview(tiles[0]))  # a tiny synthetic preview: the 16 px tile
            remaining = start + (step + 1) * step_seconds - time.perf_counter()
            if remaining > 0:
                time.sleep(remaining)
        progress(STEP_GENERATION, 100)
        # The steps a real engine reports after denoising, in its order (the pixels were drawn above, within
        # the time the job takes)
        progress(STEP_DECODING, 0)
        images = [
            GeneratedImage(
                image=Image.fromarray(pixels, "RGB"), extra_metadata={"width": width, "height": height}, pixels=pixels
            )
            for pixels in drawn
        ]
        progress(STEP_DECODING, 100)
        return images
