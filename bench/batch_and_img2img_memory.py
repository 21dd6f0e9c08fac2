"""Benchmark: several images per job, and memory with img2img / inpainting pipelines.

On the demo model (SDXL architecture, trained on shapes, shipped; the very engine the worker runs):

1. s/image for ``num_images`` 1 vs 4 (one job, one batch): the median of ``--runs`` jobs each, one untimed
   warm-up job first; printed: both, and the ratio (batch s/image over single s/image; < 1: the batch is
   cheaper than 4 jobs).
2. memory after a text-to-image job, an img2img job and an inpainting job on the same loaded model: the
   process' RSS (and peak RSS), the bytes of all distinct weight tensors reachable from the loaded pipeline
   and its img2img / inpaint pipelines (equal to the text-to-image figure when ``from_pipe`` shares every
   weight), and on CUDA ``torch.cuda.memory_allocated``.

    .venv/bin/python bench/batch_and_img2img_memory.py [--steps 10] [--runs 3] [--size 1024]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from harness import Headline, Table, mib, peak_rss_bytes, quiet_libraries, report, rss_bytes
from PIL import Image

from imagen.config import Settings
from imagen.generation.base import NO_INPUTS, GenerationTask, InputImages
from imagen.generation.diffusers.engine import DiffusersEngine
from imagen.generation.diffusers.model_cache import storage_bytes
from imagen.registry import builtin_registry
from imagen.registry.builtin import DEMO_MODEL_ID


def weight_bytes(engine: DiffusersEngine) -> int:
    """Bytes of the distinct tensors (by storage) held by every loaded pipeline, derived ones included."""
    return storage_bytes(
        component
        for loaded in engine._models.values()
        for pipe in (loaded.pipe, *loaded.derived.values())
        for component in pipe.components.values()
        if isinstance(component, torch.nn.Module)
    )


def sync(engine: DiffusersEngine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def timed(engine: DiffusersEngine, task: GenerationTask, inputs: InputImages = NO_INPUTS) -> float:
    sync(engine)
    started = time.perf_counter()
    images = engine.generate(task, lambda step, percent: None, inputs)
    sync(engine)
    assert len(images) == task.num_images
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=None, help="image side (default: the demo's native 1024)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    quiet_libraries()

    data = Path(tempfile.mkdtemp(prefix="imagen-bench-"))
    settings = Settings(data_dir=data, device=args.device, dtype=args.dtype, engine="diffusers", warm_up_steps=0)
    engine = DiffusersEngine(builtin_registry(), settings)
    size = args.size or builtin_registry().models[0].size
    base = GenerationTask(
        prompt="a large green star on the left on a beige background", negative_prompt=None, model=DEMO_MODEL_ID,
        steps=args.steps, guidance_scale=7.5, seed=1, width=size, height=size,
    )

    # 1. num_images 1 vs 4 (interleaved, after one warm-up of each)
    timed(engine, base)
    timed(engine, replace(base, num_images=4))
    single: list[float] = []
    batch: list[float] = []
    for run in range(args.runs):
        single.append(timed(engine, replace(base, seed=10 + run)))
        batch.append(timed(engine, replace(base, seed=20 + run, num_images=4)) / 4)
    one, four = statistics.median(single), statistics.median(batch)

    # 2. memory after each kind of job
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    jobs: list[tuple[str, GenerationTask, InputImages]] = [
        ("text-to-image", base, InputImages()),
        ("img2img", replace(base, init_image=True, strength=0.75), InputImages(init=init)),
        ("inpaint", replace(base, init_image=True, mask_image=True, strength=0.75), InputImages(init=init, mask=mask)),
        ("text-to-image again", base, InputImages()),
    ]
    memory: list[list[object]] = []
    weights: list[int] = []
    for label, task, inputs in jobs:
        seconds = timed(engine, task, inputs)
        gc.collect()
        weights.append(weight_bytes(engine))
        cuda = mib(torch.cuda.memory_allocated(engine.device)) if engine.device.type == "cuda" else "-"
        memory.append([label, f"{seconds:.2f}", mib(rss_bytes()), mib(peak_rss_bytes()), mib(weights[-1]), cuda])

    info = engine.device_info()
    report(
        f"Several images per job, img2img and inpainting memory: demo model, {size}x{size}, {args.steps} steps, "
        f"{info.device}, torch threads {torch.get_num_threads()}",
        Table(["num_images", "s/image (median)", "runs (s/image)"], [
            [1, f"{one:.3f}", ", ".join(f"{s:.3f}" for s in single)],
            ["4 (one job, one batch)", f"{four:.3f}", ", ".join(f"{s:.3f}" for s in batch)],
        ]),
        Table(["after", "job s", "RSS", "peak RSS", "distinct weights", "CUDA allocated"], memory),
        dtype=info.dtype,
        notes=[f"ratio batch/single s/image: {four / one:.2f}  (4 images in one job take {4 * four / one:.2f}x one "
               "job)", f"model loads: {engine.stats.model_loads}"],
        headlines=[Headline("num_images 4 / 1, s per image", f"{four / one:.2f}", "< 1"),
                   Headline("weights after img2img and inpaint / after text-to-image",
                            f"{max(weights) / weights[0]:.2f}", "1.00 (shared)")],
    )


if __name__ == "__main__":
    main()
