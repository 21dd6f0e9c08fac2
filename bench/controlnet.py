"""Benchmark: ControlNet's cost, in time and memory, on the demo model through the engine the worker runs.

1. Seconds per image and peak memory for text-to-image with 0, 1 and 2 ControlNets (the demo's silhouette
   ControlNet; the second unit is a second ControlNet, a copy of it read from its own file), interleaved:
   each round runs the three once, in turn, after one untimed job of each. Peak memory: on CUDA
   ``torch.cuda.max_memory_allocated`` over each job; on a CPU the highest RSS sampled every 5 ms during it
   (the kernel's own peak, VmHWM, cannot be reset on every machine), which includes what the allocator keeps.
2. The weights held after switching between the two ControlNets ``--switches`` times (one job each): the bytes
   of the distinct weight tensors of the loaded model, its derived pipelines and its ControlNets, before and
   after, and the process's RSS. Flat means each ControlNet is read once and no switch copies a weight.

    .venv/bin/python bench/controlnet.py [--size 1024] [--steps 30] [--runs 3] [--switches 20]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
from harness import Headline, Table, mib, quiet_libraries, report, rss_bytes
from PIL import Image, ImageDraw

from imagen.config import Settings
from imagen.generation.base import ControlNetChoice, GenerationTask, InputImages
from imagen.generation.diffusers.engine import DiffusersEngine
from imagen.generation.diffusers.model_cache import storage_bytes
from imagen.registry import ControlNetSpec, Registry, builtin_registry
from imagen.registry.builtin import DEMO_CONTROLNET_ID, DEMO_MODEL_ID

SECOND = "demo-silhouette-copy"


def registry_with_two(folder: Path) -> Registry:
    """The built-in registry plus a second ControlNet: the demo's, copied to its own folder (its own weights)."""
    registry = builtin_registry()
    demo = registry.controlnet(DEMO_CONTROLNET_ID)
    assert demo is not None, "the built-in registry has no demo ControlNet"
    shutil.copytree(demo.path, folder / SECOND)
    second = ControlNetSpec(id=SECOND, name="copy", path=folder / SECOND, base=demo.base)
    return registry.model_copy(update={"controlnets": [*registry.controlnets, second]})


def silhouette(size: int, left: bool) -> Image.Image:
    image = Image.new("RGB", (size, size))
    x0 = size // 10 if left else size // 2
    box = (x0, size // 4, x0 + 4 * size // 10, 3 * size // 4)
    ImageDraw.Draw(image).ellipse(box, fill="white")
    return image


def weight_bytes(engine: DiffusersEngine) -> int:
    """Bytes of the distinct weight storages of every held model: its pipelines' components (the ControlNet
    pipelines' ``controlnet`` included) and its ControlNets."""
    modules = [
        module
        for loaded in engine._models.values()
        for module in (
            *(c for pipe in (loaded.pipe, *loaded.derived.values()) for c in pipe.components.values()),
            *loaded.controlnets.values(),
        )
        if isinstance(module, torch.nn.Module)
    ]
    return storage_bytes(modules)


class RssSampler:
    """The highest RSS seen while the block runs, sampled every 5 ms by a thread."""

    def __init__(self) -> None:
        self.peak = rss_bytes()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def measured(engine: DiffusersEngine, task: GenerationTask, inputs: InputImages) -> tuple[float, int]:
    """(seconds, peak bytes) of one job."""
    cuda = engine.device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize(engine.device)
        torch.cuda.reset_peak_memory_stats(engine.device)
    with RssSampler() as sampler:
        started = time.perf_counter()
        engine.generate(task, lambda step, percent: None, inputs)
        if cuda:
            torch.cuda.synchronize(engine.device)
        seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(engine.device) if cuda else sampler.peak
    return seconds, peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--switches", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    quiet_libraries()

    data = Path(tempfile.mkdtemp(prefix="imagen-bench-"))
    settings = Settings(data_dir=data, device=args.device, dtype=args.dtype, engine="diffusers", warm_up_steps=0)
    engine = DiffusersEngine(registry_with_two(data), settings)
    size = args.size
    base = GenerationTask(
        prompt="a red shape on a white background", negative_prompt=None, model=DEMO_MODEL_ID, steps=args.steps,
        guidance_scale=7.5, seed=1, width=size, height=size,
    )
    left, right = silhouette(size, True), silhouette(size, False)
    cases: list[tuple[str, GenerationTask, InputImages]] = [
        ("0 ControlNets", base, InputImages()),
        ("1 ControlNet", replace(base, controlnets=(ControlNetChoice(DEMO_CONTROLNET_ID),)),
         InputImages(controls=(left,))),
        ("2 ControlNets", replace(base, controlnets=(ControlNetChoice(DEMO_CONTROLNET_ID), ControlNetChoice(SECOND))),
         InputImages(controls=(left, right))),
    ]
    for _, task, inputs in cases:  # loads, pipelines made: untimed
        measured(engine, task, inputs)
    seconds: dict[str, list[float]] = {label: [] for label, _, _ in cases}
    peaks: dict[str, list[int]] = {label: [] for label, _, _ in cases}
    for run in range(args.runs):
        for label, task, inputs in cases:
            took, peak = measured(engine, replace(task, seed=10 + run), inputs)
            seconds[label].append(took)
            peaks[label].append(peak)
    plain = statistics.median(seconds["0 ControlNets"])
    rows = [
        [label, f"{statistics.median(seconds[label]):.3f}", f"{statistics.median(seconds[label]) / plain:.2f}",
         mib(max(peaks[label])), ", ".join(f"{s:.3f}" for s in seconds[label])]
        for label, _, _ in cases
    ]

    gc.collect()
    before_weights, before_rss = weight_bytes(engine), rss_bytes()
    loads_before = engine.stats.controlnet_loads
    switch_rows = [["after the timed jobs", mib(before_weights), mib(before_rss), loads_before]]
    for switch in range(args.switches):
        name = DEMO_CONTROLNET_ID if switch % 2 == 0 else SECOND
        task = replace(base, steps=min(args.steps, 10), controlnets=(ControlNetChoice(name),), seed=100 + switch)
        engine.generate(task, lambda step, percent: None, InputImages(controls=(left,)))
        if switch + 1 in (1, args.switches // 2, args.switches):
            gc.collect()
            switch_rows.append([f"after switch {switch + 1}", mib(weight_bytes(engine)), mib(rss_bytes()),
                                engine.stats.controlnet_loads])
    after_weights = weight_bytes(engine)

    info = engine.device_info()
    one = statistics.median(seconds["1 ControlNet"]) / plain
    two = statistics.median(seconds["2 ControlNets"]) / plain
    report(
        f"ControlNet: demo model, {size}x{size}, {args.steps} steps, {info.device}, torch threads "
        f"{torch.get_num_threads()}; {args.runs} interleaved rounds",
        Table(["job", "s/image (median)", "x no ControlNet", "peak memory", "runs (s)"], rows),
        Table(["weights held", "distinct weights", "RSS", "ControlNet reads"], switch_rows),
        dtype=info.dtype,
        notes=[
            "peak memory: " + ("torch.cuda.max_memory_allocated per job" if engine.device.type == "cuda"
                               else "the highest RSS sampled every 5 ms during each job"),
            f"switches between {DEMO_CONTROLNET_ID} and {SECOND}: {args.switches}, 10 steps each",
        ],
        headlines=[
            Headline("1 ControlNet / none, s per image", f"{one:.2f}", "-"),
            Headline("2 ControlNets / none, s per image", f"{two:.2f}", "-"),
            Headline(f"weights after {args.switches} switches / before", f"{after_weights / before_weights:.2f}",
                     "1.00 (flat)"),
        ],
    )


if __name__ == "__main__":
    main()
