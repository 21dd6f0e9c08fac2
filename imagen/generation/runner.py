"""Runs one task with an engine and writes its PNG: the part every job backend's worker shares.

It also times the job's phases from the engine's own progress reports (each step name is a phase, until
the next one starts) and returns them beside the metadata, in ``result.timings``: /status shows them,
the PNG never holds them (the same request and seed give the same file, byte for byte).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from imagen.errors import FatalGenerationError, GenerationError, is_out_of_memory, is_out_of_space
from imagen.generation.base import (
    STEP_SAVING,
    Engine,
    GenerationTask,
    InputImages,
    PreviewCallback,
    ProgressCallback,
)
from imagen.outputs.names import image_names
from imagen.outputs.png import save_png


class PhaseTimer:
    """A progress callback that passes reports on and adds up the seconds spent in each step name."""

    def __init__(self, progress: ProgressCallback) -> None:
        self._progress = progress
        self.seconds: dict[str, float] = {}
        self._step: str | None = None
        self._since = time.perf_counter()

    def __call__(self, step: str, percent: int) -> None:
        if step != self._step:
            self._close_phase()
            self._step = step
        self._progress(step, percent)

    def stop(self) -> dict[str, float]:
        self._close_phase()
        self._step = None
        return {step: round(seconds, 4) for step, seconds in self.seconds.items()}

    def _close_phase(self) -> None:
        now = time.perf_counter()
        if self._step is not None:  # time before the first report counts in the first phase
            self.seconds[self._step] = self.seconds.get(self._step, 0.0) + now - self._since
            self._since = now


def model_removed_text(model_id: str) -> str:
    """Why a job fails whose model left the registry before it started."""
    return f"model {model_id!r} was removed from the registry before this job started"


def run_task(
    engine: Engine,
    task: GenerationTask,
    output_name: str,
    outputs_dir: Path,
    progress: ProgressCallback,
    png_compress_level: int = 1,
    preview: PreviewCallback | None = None,
    inputs: Mapping[str, bytes] | None = None,
    on_no_space: Callable[[OSError], None] | None = None,
) -> dict[str, Any]:
    """Generate, save, and return the ``result`` object ``/status`` shows on SUCCESS. A cancelled job
    (``JobCancelled`` from ``progress``, the last time just before saving) writes no PNG.

    ``inputs``: the job's input images as PNG bytes by role ("init", "mask", "ip"). Image 0 is written as
    ``output_name``, image i ≥ 1 as ``image_names(output_name, n)[i]``; each PNG's metadata carries its
    own seed. ``filename``, ``path``, ``url`` and ``metadata`` describe image 0; ``images`` lists them all.

    ``on_no_space``: called when a PNG cannot be written because the disk is full (``ENOSPC``, ``EDQUOT``);
    it waits (or raises, ``JobCancelled`` say), then the same image is written again: a full disk costs a
    wait, never the generation. Without it, the ``OSError`` is raised.
    """
    if engine.registry.model(task.model) is None:
        # Removed from the registry file while the job waited (the worker follows the file between jobs).
        raise FatalGenerationError(model_removed_text(task.model))
    started_at = time.time()
    timer = PhaseTimer(progress)
    decoded = InputImages.from_png_bytes(inputs or {})
    engine.preview = preview
    try:
        generated = engine.generate(task, timer, decoded)
    finally:
        engine.preview = None
    if len(generated) != task.num_images:
        raise GenerationError(f"the engine made {len(generated)} images, not {task.num_images}")
    timer(STEP_SAVING, 100)
    names = image_names(output_name, len(generated))
    base = task.as_dict()
    images: list[dict[str, Any]] = []
    metadatas: list[dict[str, Any]] = []
    for index, (name, image) in enumerate(zip(names, generated, strict=True)):
        metadata: dict[str, Any] = {**base, "seed": task.seed + index, **image.extra_metadata}
        while True:
            try:
                save_png(image.rgb_pixels(), metadata, outputs_dir, name, png_compress_level)
                break
            except OSError as exc:
                if on_no_space is None or not is_out_of_space(exc):
                    raise
                on_no_space(exc)
        metadatas.append(metadata)
        images.append({
            "filename": name,
            "path": os.path.join(str(outputs_dir), name),
            "url": f"/outputs/{name}",
            "seed": metadata["seed"],
        })
    return {
        "status": "success",
        "filename": names[0],
        "path": images[0]["path"],
        "url": images[0]["url"],
        "metadata": metadatas[0],
        "images": images,
        # seconds per step name, and when the worker began (Unix time): where a job's time went
        "timings": {"started_at": round(started_at, 4), "seconds": timer.stop()},
    }


def classify_failure(exc: BaseException) -> tuple[bool, str]:
    """(retryable, message) for an exception raised by an engine.

    Out-of-memory errors may pass on another attempt; everything else is a property of the request or of
    the installation and fails at once with its message.
    """
    if isinstance(exc, GenerationError):
        return exc.retryable, str(exc) or type(exc).__name__
    text = str(exc)
    if is_out_of_memory(exc):
        on_the_gpu = type(exc).__name__ == "OutOfMemoryError" or any(
            library in text.upper() for library in ("CUDA", "CUBLAS", "CUDNN", "CUFFT")
        )
        return True, "CUDA out of memory" if on_the_gpu else (f"out of memory: {text}" if text else "out of memory")
    return False, f"{type(exc).__name__}: {text}" if text else type(exc).__name__
