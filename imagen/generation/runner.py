"""Runs one task with an engine and writes its PNG: the part every job backend's worker shares."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from imagen.errors import GenerationError
from imagen.generation.base import STEP_SAVING, Engine, GenerationTask, ProgressCallback
from imagen.outputs.png import save_png


def run_task(
    engine: Engine,
    task: GenerationTask,
    output_name: str,
    outputs_dir: Path,
    progress: ProgressCallback,
    png_compress_level: int = 1,
) -> dict[str, Any]:
    """Generate, save, and return the ``result`` object ``/status`` shows on SUCCESS."""
    generated = engine.generate(task, progress)
    progress(STEP_SAVING, 100)
    metadata: dict[str, Any] = {**task.as_dict(), **generated.extra_metadata}
    save_png(generated.rgb_pixels(), metadata, outputs_dir, output_name, png_compress_level)
    return {
        "status": "success",
        "filename": output_name,
        "path": os.path.join(str(outputs_dir), output_name),
        "url": f"/outputs/{output_name}",
        "metadata": metadata,
    }


def classify_failure(exc: BaseException) -> tuple[bool, str]:
    """(retryable, message) for an exception raised by an engine.

    Out-of-memory errors may pass on another attempt; everything else is a property of the request or of
    the installation and fails at once with its message.
    """
    if isinstance(exc, GenerationError):
        return exc.retryable, str(exc) or type(exc).__name__
    text = str(exc)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text:
        return True, "CUDA out of memory" if "CUDA" in text or type(exc).__name__ == "OutOfMemoryError" else (
            f"out of memory: {text}" if text else "out of memory"
        )
    return False, f"{type(exc).__name__}: {text}" if text else type(exc).__name__
