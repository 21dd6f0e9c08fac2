"""A deterministic engine without torch: a colour pattern derived from the task, after a fixed time.

Used by the job-system tests and benchmarks (a generator that takes a known time, as a GPU would) and
handy to try the API on a machine with no model at all (``IMAGEN_ENGINE=test-pattern``).
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
from PIL import Image

from imagen.generation.base import (
    STEP_GENERATION,
    STEP_LOADING_MODEL,
    DeviceInfo,
    Engine,
    GeneratedImage,
    GenerationTask,
    ProgressCallback,
)
from imagen.generation.preview import encode_preview, wants_preview


class TestPatternEngine(Engine):
    __test__ = False  # not a pytest class

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(gpu_available=False, device="cpu", dtype=None)

    def generate(self, task: GenerationTask, progress: ProgressCallback) -> GeneratedImage:
        """Takes ``test_pattern_seconds`` in all (drawing included), like a GPU with a fixed step time."""
        start = time.perf_counter()
        spec = self.registry.model(task.model)
        size = spec.size if spec is not None else 1024
        progress(STEP_LOADING_MODEL, 0)
        digest = hashlib.sha256(repr(sorted(task.as_dict().items())).encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        tile = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        scale = -(-size // tile.shape[0])
        pixels = np.ascontiguousarray(tile.repeat(scale, axis=0).repeat(scale, axis=1)[:size, :size])
        image = Image.fromarray(pixels, "RGB")
        step_seconds = self.settings.test_pattern_seconds / task.steps
        preview = self.preview
        for step in range(task.steps):
            progress(STEP_GENERATION, int(100 * step / task.steps))
            if preview is not None and wants_preview(step + 1, self.settings.preview_every_steps):
                preview(step + 1, encode_preview(tile))  # a tiny synthetic preview: the 16 px tile
            remaining = start + (step + 1) * step_seconds - time.perf_counter()
            if remaining > 0:
                time.sleep(remaining)
        return GeneratedImage(image=image, extra_metadata={"width": size, "height": size}, pixels=pixels)
