"""Engines for the job-system tests: the prompt is a small script saying what the job should do.

    "sleep 0.3"      take 0.3 s (reporting progress), then succeed
    "oom"            raise an out-of-memory error every attempt (retryable)
    "oom-once"       out of memory on the first attempt only
    "fatal"          fail in a way retrying cannot fix
    "crash-once"     SIGKILL its own process on the first attempt, succeed on the next
    "hang"           never return
    "hold NAME"      report progress, then wait until the test releases latch NAME (tests/latches.py), then succeed
    "phases A B"     the steps as the diffusers engine reports them, held denoising (latch A), then decoding (B)
Anything else succeeds at once. Each execution appends the prompt to $IMAGEN_TEST_EXECUTION_LOG.

It holds models as the test-pattern engine does (a job's model is held from the job's start, while the
script runs), so the workers' reports, /models ``loaded_on``, the operator's load and unload orders and
job routing by held model can be tested on both backends.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from imagen.errors import FatalGenerationError
from imagen.generation.base import (
    NO_INPUTS,
    GeneratedImage,
    GenerationTask,
    InputImages,
    ProgressCallback,
)
from imagen.generation.test_pattern import TestPatternEngine
from tests.latches import hold_until_released


def _record(task: GenerationTask) -> int:
    """Log this execution; return how many times this prompt ran before."""
    log_path = os.environ.get("IMAGEN_TEST_EXECUTION_LOG")
    if not log_path:
        return 0
    path = Path(log_path)
    previous = path.read_text().splitlines().count(task.prompt) if path.exists() else 0
    with path.open("a") as handle:
        handle.write(task.prompt + "\n")
    return previous


class ScriptedEngine(TestPatternEngine):
    def generate(
        self, task: GenerationTask, progress: ProgressCallback, inputs: InputImages = NO_INPUTS
    ) -> list[GeneratedImage]:
        self.load_model(task.model)
        previous_runs = _record(task)
        words = task.prompt.split()
        command = words[0] if words else ""
        if command == "sleep":
            duration = float(words[1])
            deadline = time.monotonic() + duration
            for step in range(task.steps):
                progress("generation_gpu", int(100 * step / task.steps))
                time.sleep(max(0.0, deadline - time.monotonic()) / (task.steps - step))
        elif command == "oom" or (command == "oom-once" and previous_runs == 0):
            raise MemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        elif command == "fatal":
            raise FatalGenerationError("weight file missing: /models/nowhere.safetensors")
        elif command == "crash-once" and previous_runs == 0:
            progress("generation_gpu", 10)
            os.kill(os.getpid(), signal.SIGKILL)
        elif command == "hold":
            hold_until_released(words[1], lambda percent: progress("generation_gpu", percent))
        elif command == "phases":
            hold_until_released(words[1], lambda percent: progress("generation_gpu", percent))
            progress("generation_gpu", 100)
            hold_until_released(words[2], lambda _: progress("decoding", 0))
            progress("decoding", 100)
        elif command == "hang":
            progress("generation_gpu", 1)
            while True:
                time.sleep(1)
        return super().generate(task, lambda step, percent: None, inputs)
