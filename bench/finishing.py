"""Benchmark: what finishing a picture costs, in time and memory, on the demo model through the engine the
worker runs.

Jobs, interleaved (each round runs every case once, in turn, after one untimed job of each):

* the model alone, at ``--size``;
* the model + a refiner (switch at 0.8): a refiner fixture made for the demo model (its VAE and text encoder,
  held once with the model's; a random UNet of the model's size), so that the refiner's part costs what a
  refiner of that size costs (its pictures mean nothing);
* the hires fix at 1.5x with each upscaler: ``latent``, ``lanczos`` and an upscaler model (the tiny ESRGAN
  fixture, tiled), second pass ``--steps`` at denoise 0.5;
* an upscale of the model's picture by the upscaler model alone (4x, then Lanczos to 2x), as POST /upscale
  would run it.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over each job; on a CPU the highest RSS sampled every
5 ms during it.

    .venv/bin/python bench/finishing.py [--size 1024] [--steps 30] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from controlnet import RssSampler
from harness import Headline, Table, mib, quiet_libraries, report

from imagen.config import Settings
from imagen.generation.base import GenerationTask, HiresChoice, InputImages, RefinerChoice
from imagen.generation.diffusers.components import TinySdxlShape, build_tiny_refiner_pipeline
from imagen.generation.diffusers.engine import DiffusersEngine
from imagen.generation.diffusers.loading import load_pipeline
from imagen.generation.upscaling import load_upscaler, upscale
from imagen.registry import ModelSpec, Registry, UpscalerSpec, builtin_registry
from imagen.registry.builtin import DEMO_MODEL_ID
from imagen.testing.upscaler_fixtures import write_tiny_esrgan

REFINER = "demo-refiner"
UPSCALER = "tiny-esrgan"


def demo_refiner(registry: Registry, folder: Path) -> ModelSpec:
    """A refiner for the demo model: its VAE and second text encoder, a random UNet of its UNet's size."""
    demo = registry.model(DEMO_MODEL_ID)
    assert demo is not None
    pipe = load_pipeline(demo, torch.float32)
    unet, encoder = pipe.unet.config, pipe.text_encoder_2.config
    shape = TinySdxlShape(
        unet_channels=tuple(unet.block_out_channels), unet_down=tuple(unet.down_block_types),
        unet_up=tuple(unet.up_block_types), unet_heads=tuple(unet.attention_head_dim),
        unet_norm_groups=unet.norm_num_groups, unet_layers_per_block=unet.layers_per_block,
        text_hidden_2=encoder.hidden_size, text_projection_2=encoder.projection_dim,
        time_embed_dim=unet.addition_time_embed_dim, size=demo.size,
    )  # fmt: skip
    build_tiny_refiner_pipeline(pipe, shape, seed=7).save_pretrained(str(folder / REFINER), safe_serialization=True)
    return ModelSpec(id=REFINER, name="demo refiner (random UNet)", path=folder / REFINER, base=demo.base,
                     refiner=True, size=demo.size)


def measured(engine: DiffusersEngine, run: Callable[[], object]) -> tuple[float, int]:
    """(seconds, peak bytes) of ``run``."""
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(engine.device)
        torch.cuda.reset_peak_memory_stats(engine.device)
    with RssSampler() as sampler:
        started = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize(engine.device)
        seconds = time.perf_counter() - started
    return seconds, torch.cuda.max_memory_allocated(engine.device) if cuda else sampler.peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    quiet_libraries()

    data = Path(tempfile.mkdtemp(prefix="imagen-bench-"))
    registry = builtin_registry()
    refiner = demo_refiner(registry, data)
    esrgan = write_tiny_esrgan(data / "upscalers", scale=4)
    registry = registry.model_copy(update={
        "models": [*registry.models, refiner],
        "upscalers": [UpscalerSpec(id=UPSCALER, name="tiny ESRGAN 4x", path=esrgan)],
    })  # fmt: skip
    settings = Settings(data_dir=data, device=args.device, dtype=args.dtype, engine="diffusers", warm_up_steps=0)
    engine = DiffusersEngine(registry, settings)
    size, big = args.size, args.size * 3 // 2 // 64 * 64
    base = GenerationTask(
        prompt="a red circle on a white background", negative_prompt=None, model=DEMO_MODEL_ID, steps=args.steps,
        guidance_scale=7.5, seed=1, width=size, height=size,
    )
    picture = engine.generate(base, lambda step, percent: None, InputImages())[0].image
    upscaler = load_upscaler(esrgan, engine.device, engine.dtype)

    def job(task: GenerationTask) -> Callable[[int], object]:
        return lambda seed: engine.generate(replace(task, seed=seed), lambda step, percent: None, InputImages())

    def hires(name: str) -> GenerationTask:
        return replace(base, hires=HiresChoice(big, big, name, args.steps, 0.5, 1.5))

    cases: list[tuple[str, Callable[[int], object]]] = [
        ("model alone", job(base)),
        ("model + refiner (0.8)", job(replace(base, refiner=RefinerChoice(REFINER, 0.8)))),
        ("hires 1.5x, latent", job(hires("latent"))),
        ("hires 1.5x, lanczos", job(hires("lanczos"))),
        (f"hires 1.5x, {UPSCALER}", job(hires(UPSCALER))),
        (f"upscale 2x, {UPSCALER}", lambda seed: upscale(upscaler, picture, (2 * size, 2 * size))),
    ]
    for _, run in cases:  # loads, derived pipelines: untimed
        run(0)
    seconds: dict[str, list[float]] = {label: [] for label, _ in cases}
    peaks: dict[str, list[int]] = {label: [] for label, _ in cases}
    for round_ in range(args.runs):
        for label, run in cases:
            took, peak = measured(engine, lambda run=run, seed=10 + round_: run(seed))  # type: ignore[misc]
            seconds[label].append(took)
            peaks[label].append(peak)
    alone = statistics.median(seconds["model alone"])
    rows = [
        [label, f"{statistics.median(seconds[label]):.3f}", f"{statistics.median(seconds[label]) / alone:.2f}",
         mib(max(peaks[label])), ", ".join(f"{s:.3f}" for s in seconds[label])]
        for label, _ in cases
    ]
    info = engine.device_info()
    report(
        f"Finishing: demo model, {size}x{size} (hires to {big}x{big}), {args.steps} steps, {info.device}, torch "
        f"threads {torch.get_num_threads()}; {args.runs} interleaved rounds",
        Table(["job", "s/image (median)", "x model alone", "peak memory", "runs (s)"], rows),
        dtype=info.dtype,
        notes=[
            "peak memory: " + ("torch.cuda.max_memory_allocated per job" if engine.device.type == "cuda"
                               else "the highest RSS sampled every 5 ms during each job"),
            "refiner: a random UNet of the demo UNet's size with the demo's VAE and text encoder (held once)",
            f"hires: second pass {args.steps} steps at denoise 0.5 ({args.steps // 2} run); upscaler model: the "
            "tiny ESRGAN fixture (4x, tiled 512/32, then Lanczos)",
        ],
        headlines=[
            Headline(f"{label} / model alone, s per image", f"{statistics.median(seconds[label]) / alone:.2f}", "-")
            for label, _ in cases[1:]
        ],
    )


if __name__ == "__main__":
    main()
