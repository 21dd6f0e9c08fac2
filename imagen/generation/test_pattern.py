"""A deterministic engine without torch: a colour pattern derived from the task, after a fixed time.

Used by the job-system tests and benchmarks (a generator that takes a known time, as a GPU would) and
handy to try the API on a machine with no model at all (``IMAGEN_ENGINE=test-pattern``).

It holds models as the diffusers engine does, without weights: a job's model (or one ``load_model`` names)
is held until ``unload_model`` frees it or, past ``IMAGEN_MAX_LOADED_MODELS``, the least recently used
leaves; "loading" one it does not hold takes ``IMAGEN_TEST_PATTERN_LOAD_SECONDS``. So the workers' reports,
``/models`` ``loaded_on``, model orders and job routing by held model can be tested and measured here.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import replace

import numpy as np
from PIL import Image

from imagen.config import Settings
from imagen.generation.base import (
    NO_INPUTS,
    STEP_DECODING,
    STEP_GENERATION,
    STEP_LOADING_MODEL,
    TIER_DEVICE,
    DeviceInfo,
    Engine,
    GeneratedImage,
    GenerationTask,
    InputImages,
    ProgressCallback,
    denoising_steps,
)
from imagen.generation.preview import encode_preview, wants_preview
from imagen.registry import Registry


class TestPatternEngine(Engine):
    __test__ = False  # not a pytest class

    def __init__(self, registry: Registry, settings: Settings) -> None:
        super().__init__(registry, settings)
        self._held: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._held_lock = threading.Lock()  # the heartbeat thread reads what a job changes
        self._loads = 0

    def held_models(self) -> dict[str, str]:
        with self._held_lock:
            return dict.fromkeys(self._held, TIER_DEVICE)

    def model_loads(self) -> int:
        return self._loads

    def load_model(self, model_id: str) -> None:
        with self._held_lock:
            if model_id in self._held:
                self._held.move_to_end(model_id)
                return
        time.sleep(self.settings.test_pattern_load_seconds)
        with self._held_lock:
            self._held[model_id] = None
            self._loads += 1
            limit = self.settings.max_loaded_models
            while limit is not None and len(self._held) > limit:
                self._held.popitem(last=False)

    def unload_model(self, model_id: str) -> None:
        with self._held_lock:
            self._held.pop(model_id, None)

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(gpu_available=False, device="cpu", dtype=None)

    def generate(
        self, task: GenerationTask, progress: ProgressCallback, inputs: InputImages = NO_INPUTS
    ) -> list[GeneratedImage]:
        """Takes ``test_pattern_seconds`` in all (drawing included), like a GPU with a fixed step time and
        a batch as fast as one image, after loading its model if it is not held. Image i is the pattern of the
        same task alone with seed + i."""
        progress(STEP_LOADING_MODEL, 0)
        self.load_model(task.model)
        start = time.perf_counter()
        spec = self.registry.model(task.model)
        native = spec.size if spec is not None else 1024
        if task.width is not None and task.height is not None:
            width, height = task.width, task.height
        elif inputs.init is not None:
            width, height = inputs.init.size
        else:
            width, height = native, native
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
