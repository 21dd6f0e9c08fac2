"""Benchmark: SDXL generation speed and peak memory, plain diffusers vs imagen's engine.

A full-size SDXL pipeline is built from the shipped SDXL base configs (``imagen/data/sdxl-base``) with
random weights: timing does not depend on weight values and nothing is downloaded. One run times, side by
side and one after the other (never two full-size pipelines in memory at once):

* ``plain diffusers``: ``StableDiffusionXLPipeline(...).to(device, dtype)`` called as a user would
  (fp16 on a GPU, fp32 on a CPU, default settings);
* ``imagen``: a real :class:`DiffusersEngine` with its speed settings (what users get: warm-up at start,
  Compel prompt encoding, its decode), fed the random pipeline instead of a file on disk;
* on CUDA also ``imagen, no compile`` (eager with the other speed options) so the compile gain is visible.

Columns: seconds per image (whole call: prompt encoding, denoising, VAE decode), seconds per UNet step
(time between the first and the last step callbacks / (steps - 1); CFG on so each step is a batch of 2),
peak memory (``torch.cuda.max_memory_allocated`` on a GPU, the process' peak RSS on a CPU), ratio of s/image
to plain diffusers. Warm-up runs (and the compile they trigger) are excluded and reported separately.

On a GPU box (full size: 1024², 30 steps, fp16)::

    .venv/bin/python bench/sdxl_speed.py --memory-modes --lora-switch

On a CPU (reduced: 512², 3 steps by default; ``--cpu-dtype-check`` times one full-size UNet step at 1024²
in fp32 vs bf16, a minute or more each on 2 cores)::

    .venv/bin/python bench/sdxl_speed.py --cpu-dtype-check --memory-modes --lora-switch
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from harness import Headline, Table, peak_rss_bytes, report, reset_peak_rss
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from imagen.config import Settings
from imagen.generation.base import STEP_GENERATION, STEP_LOADING_LORAS, GenerationTask, LoraChoice
from imagen.generation.diffusers.components import SDXL_CONFIG_DIR, load_clip_tokenizers
from imagen.generation.diffusers.engine import DiffusersEngine
from imagen.generation.diffusers.loading import resolve_dtype
from imagen.registry import LoraSpec, ModelSpec, Registry
from imagen.testing.fixtures import write_attention_loras

PROMPT = "a lighthouse on a cliff at dusk, dramatic sky, highly detailed"
NEGATIVE = "blurry, low quality"
GUIDANCE = 5.0
SEED = 1234


# --- measuring ------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def gib(n: int | None) -> str:
    return "not measured" if n is None else f"{n / 2**30:.2f} GiB"


@dataclass
class Row:
    name: str
    s_image: float | None
    s_step: float | None
    peak: int | None
    peak_kind: str
    warm_up_s: float | None = None
    note: str = ""


class StepClock:
    """Time stamps of step ends (synchronised on CUDA, so a stamp is when the GPU really finished)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def stamp(self) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def per_step(self, fallback_total: float, steps: int) -> float:
        if len(self.stamps) >= 2:
            return (self.stamps[-1] - self.stamps[0]) / (len(self.stamps) - 1)
        return fallback_total / max(steps, 1)


# --- building the full-size pipeline ----------------------------------------------------------------
@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_unet(device: torch.device, dtype: torch.dtype, seed: int = SEED) -> Any:
    config = UNet2DConditionModel.load_config(str(SDXL_CONFIG_DIR / "unet"))
    with torch.random.fork_rng(devices=[]), torch.device(device), default_dtype(dtype):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(config)  # type: ignore[no-untyped-call]
    return unet.to(device=device, dtype=dtype).eval()


def build_components(device: torch.device, dtype: torch.dtype, seed: int = SEED) -> dict[str, Any]:
    """Full-size SDXL components from the shipped configs, random weights, created on ``device`` in ``dtype``
    (creating them on the GPU directly takes seconds instead of a minute of CPU init)."""
    unet = build_unet(device, dtype, seed)
    vae_config = AutoencoderKL.load_config(str(SDXL_CONFIG_DIR / "vae"))
    te_config = CLIPTextConfig.from_pretrained(str(SDXL_CONFIG_DIR / "text_encoder"))
    te2_config = CLIPTextConfig.from_pretrained(str(SDXL_CONFIG_DIR / "text_encoder_2"))
    with torch.random.fork_rng(devices=[]), torch.device(device), default_dtype(dtype):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL.from_config(vae_config)  # type: ignore[no-untyped-call]
        text_encoder = CLIPTextModel(te_config)
        text_encoder_2 = CLIPTextModelWithProjection(te2_config)
    tokenizer, tokenizer_2 = load_clip_tokenizers()
    scheduler = EulerDiscreteScheduler.from_pretrained(  # type: ignore[no-untyped-call]
        str(SDXL_CONFIG_DIR), subfolder="scheduler"
    )
    return {
        "unet": unet,
        "vae": vae.to(device=device, dtype=dtype).eval(),
        "text_encoder": text_encoder.to(device=device, dtype=dtype).eval(),  # type: ignore[call-arg]
        "text_encoder_2": text_encoder_2.to(device=device, dtype=dtype).eval(),  # type: ignore[call-arg]
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
    }


def free(device: torch.device) -> None:
    torch._dynamo.reset()  # compiled code of a freed pipeline: never reused, and it counts against limits
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- plain diffusers ----------------------------------------------------------------------------------
def run_plain(args: argparse.Namespace, device: torch.device) -> Row:
    dtype = torch.float16 if device.type == "cuda" else torch.float32  # what a user writes / the default
    components = build_components(device, dtype)
    pipe: Any = StableDiffusionXLPipeline(**components)  # type: ignore[no-untyped-call]
    pipe = pipe.to(device.type, dtype)
    del components
    pipe.set_progress_bar_config(disable=True)

    def call(steps: int, clock: StepClock | None) -> None:
        def on_step_end(_p: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if clock is not None:
                clock.stamp()
            return kwargs

        pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            height=args.size,
            width=args.size,
            generator=torch.Generator("cpu").manual_seed(SEED),
            callback_on_step_end=on_step_end,
        )

    started = time.perf_counter()
    for _ in range(args.warmup):
        call(args.warmup_steps, None)
    sync(device)
    warm = time.perf_counter() - started
    row = time_images(args, device, f"plain diffusers ({_dtype_name(dtype)})", call)
    row.warm_up_s = warm
    pipe = None
    free(device)
    return row


def time_images(
    args: argparse.Namespace, device: torch.device, name: str, call: Callable[[int, StepClock | None], None]
) -> Row:
    per_image: list[float] = []
    per_step: list[float] = []
    reset_peak(device)
    for _ in range(args.images):
        clock = StepClock(device)
        sync(device)
        started = time.perf_counter()
        call(args.steps, clock)
        sync(device)
        total = time.perf_counter() - started
        per_image.append(total)
        per_step.append(clock.per_step(total, args.steps))
    return Row(
        name=name,
        s_image=min(per_image) if args.best else sum(per_image) / len(per_image),
        s_step=min(per_step) if args.best else sum(per_step) / len(per_step),
        peak=peak_bytes(device),
        peak_kind="GPU allocated" if device.type == "cuda" else "RSS",
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- imagen's engine ----------------------------------------------------------------------------------
class RandomPipelineEngine(DiffusersEngine):
    """The real engine, except that "loading" a model builds the random full-size pipeline."""

    build_device: torch.device

    def build_random_pipeline(self, spec: ModelSpec, dtype: torch.dtype) -> Any:
        components = build_components(self.build_device, dtype)
        pipe: Any = StableDiffusionXLPipeline(**components, add_watermarker=False)  # type: ignore[no-untyped-call]
        pipe.set_progress_bar_config(disable=True)
        return pipe


def make_engine(
    args: argparse.Namespace,
    device: torch.device,
    workdir: Path,
    loras: list[LoraSpec] | None = None,
    **overrides: Any,
) -> RandomPipelineEngine:
    spec = ModelSpec(id="sdxl-random", name="SDXL (random weights)", path=workdir / "unused", size=args.size)
    registry = Registry(models=[spec], loras=loras or [])
    values: dict[str, Any] = {
        "device": device.type,
        "dtype": args.dtype,
        "data_dir": workdir,
        "outputs_dir": workdir / "outputs",
        "warm_up_steps": args.warmup_steps,
        "compile_cache_dir": args.compile_cache_dir,
    }
    if args.compile_mode:
        values["compile_mode"] = args.compile_mode
    values.update(overrides)
    settings = Settings(**values)
    engine = RandomPipelineEngine(registry, settings)
    # Build on the GPU when there is one (seconds); the engine then places it as configured (offload...).
    engine.build_device = device
    engine.pipeline_loader = engine.build_random_pipeline
    return engine


def engine_task(args: argparse.Namespace, steps: int, loras: tuple[LoraChoice, ...] = ()) -> GenerationTask:
    return GenerationTask(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        model="sdxl-random",
        loras=loras,
        steps=steps,
        guidance_scale=GUIDANCE,
        seed=SEED,
    )


def run_engine(args: argparse.Namespace, device: torch.device, name: str, **overrides: Any) -> Row:
    with tempfile.TemporaryDirectory(prefix="imagen-bench-") as tmp:
        engine = make_engine(args, device, Path(tmp), **overrides)
        sync(device)
        started = time.perf_counter()
        engine.warm_up()  # what the worker process does before taking jobs (model build + compile here)
        for _ in range(max(0, args.warmup - 1)):
            engine.generate(engine_task(args, args.warmup_steps), lambda s, p: None)
        sync(device)
        warm = time.perf_counter() - started
        loads = engine.stats.model_loads

        def call(steps: int, clock: StepClock | None) -> None:
            def progress(step: str, pct: int) -> None:
                if clock is not None and step == STEP_GENERATION and pct > 0:
                    clock.stamp()

            engine.generate(engine_task(args, steps), progress)

        options = engine.acceleration_summary()
        label = f"{name} ({engine.device_info().dtype}{', ' + options if options else ''})"
        row = time_images(args, device, label, call)
        row.warm_up_s = warm
        if engine.stats.model_loads != loads:
            row.note = "a timed job loaded the model!"
        engine.close()
        engine = None  # type: ignore[assignment]
    free(device)
    return row


# --- CPU: fp32 vs bf16 for one full-size UNet step ----------------------------------------------------
def unet_inputs(batch: int, latent: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    gen = torch.Generator("cpu").manual_seed(SEED)
    return {
        "sample": torch.randn(batch, 4, latent, latent, generator=gen).to(device, dtype),
        "timestep": torch.tensor(500.0, device=device),
        "encoder_hidden_states": torch.randn(batch, 77, 2048, generator=gen).to(device, dtype),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, 1280, generator=gen).to(device, dtype),
            "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch).to(device, dtype),
        },
        "return_dict": False,
    }


def cpu_dtype_check(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    """One UNet step at 1024² (latents 128×128, batch 2 = CFG), full-size SDXL UNet, on this CPU."""
    device = torch.device("cpu")
    results: list[tuple[str, float, float]] = []
    print(f"building the full-size SDXL UNet (fp32) on {torch.get_num_threads()} CPU threads...", flush=True)
    unet = build_unet(device, torch.float32)
    variants = [(torch.float32, False), (torch.bfloat16, False)]
    if args.cpu_dtype_channels_last:
        variants = [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)]
        variants.append((torch.bfloat16, True))
    current = torch.float32
    for dtype, channels_last in variants:
        if dtype != current:
            unet.to(dtype=dtype)  # in place: the fp32 weights are released as they are converted
            current = dtype
        unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        name = _dtype_name(dtype) + (" + channels_last" if channels_last else "")
        with torch.inference_mode():
            unet(**unet_inputs(2, 32, dtype, device))  # warm-up at a small size (kernel selection)
            inputs = unet_inputs(2, 128, dtype, device)
            if channels_last:
                inputs["sample"] = inputs["sample"].contiguous(memory_format=torch.channels_last)
            times = []
            for _ in range(args.cpu_dtype_repeats):
                started = time.perf_counter()
                out = unet(**inputs)[0]
                times.append(time.perf_counter() - started)
            finite = bool(torch.isfinite(out).all())
        results.append((name, min(times), float(out.float().abs().mean())))
        print(f"  {name}: {min(times):.1f} s per UNet step (finite output: {finite})", flush=True)
    del unet
    gc.collect()
    return results


# --- memory modes -------------------------------------------------------------------------------------
MEMORY_MODES: list[tuple[str, dict[str, Any]]] = [
    ("default", {}),
    ("VAE tiling", {"vae_tiling": True}),
    ("VAE slicing", {"vae_slicing": True}),
    ("model CPU offload", {"cpu_offload": "model"}),
    ("sequential CPU offload", {"cpu_offload": "sequential"}),
]


def memory_modes(args: argparse.Namespace, device: torch.device) -> list[Row]:
    rows = []
    for name, overrides in MEMORY_MODES:
        if device.type != "cuda" and "cpu_offload" in overrides:
            rows.append(Row(name, None, None, None, "", note="CUDA only (the engine offloads only on CUDA)"))
            continue
        row = run_engine(args, device, f"imagen, {name}", **{"compile": args.memory_compile, **overrides})
        rows.append(row)
        show_row(row_cells(row, None))
    return rows


# --- LoRA switching -----------------------------------------------------------------------------------
def lora_switch(args: argparse.Namespace, device: torch.device) -> list[list[str]]:
    """Switch between two LoRAs job after job; report the switch step and the job right after a switch."""
    lines = []
    with tempfile.TemporaryDirectory(prefix="imagen-bench-lora-") as tmp:
        workdir = Path(tmp)
        probe = make_engine(args, device, workdir)
        dtype = resolve_dtype(args.dtype, device)
        probe_pipe = probe.build_random_pipeline(probe.registry.models[0], dtype)
        loras = write_attention_loras(probe_pipe, workdir, rank=args.lora_rank, seed=SEED + 100)
        del probe_pipe, probe
        free(device)
        variants: list[tuple[str, dict[str, Any]]] = [
            ("regular adapters (set_adapters), compile off", {"compile": "off", "lora_hotswap": "off"}),
            ("hotswap slots, compile off", {"compile": "off", "lora_hotswap": "on"}),
        ]
        if args.lora_compile == "on" or (args.lora_compile == "auto" and device.type == "cuda"):
            variants.append(("hotswap slots, compile on", {"compile": "on", "lora_hotswap": "on"}))
        for label, overrides in variants:
            engine = make_engine(args, device, workdir, loras=loras, **overrides)
            engine.warm_up()
            switch_s: list[float] = []
            job_s: list[float] = []
            for job in range(args.lora_jobs):
                marks: dict[str, float] = {}

                def progress(step: str, pct: int, marks: dict[str, float] = marks) -> None:
                    if step == STEP_LOADING_LORAS:
                        sync(device)
                        marks[f"lora{pct}"] = time.perf_counter()

                choice = (LoraChoice(f"lora-{job % 2}", 0.8),)
                sync(device)
                started = time.perf_counter()
                engine.generate(engine_task(args, args.steps, choice), progress)
                sync(device)
                if job >= 2:  # both LoRAs read from disk once; from here on every job is a switch
                    job_s.append(time.perf_counter() - started)
                    switch_s.append(marks["lora100"] - marks["lora0"])
            if job_s:
                lines.append([label, f"{1000 * sum(switch_s) / len(switch_s):.1f} ms",
                              f"{sum(job_s) / len(job_s):.2f} s", engine.acceleration_summary()])
                show_row(lines[-1])
            engine.close()
            del engine
            free(device)
    return lines


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def tiny_compile_lora(args: argparse.Namespace) -> list[list[str]]:
    """LoRA switching with torch.compile on the tiny fixture model (64², 2 steps), for machines where the
    full-size compile is out of reach (a 2-core CPU): the mechanism and whether a switch recompiles."""
    from imagen.registry import load_registry
    from imagen.testing.fixtures import write_fixtures

    lines = []
    with tempfile.TemporaryDirectory(prefix="imagen-bench-tiny-") as tmp:
        workdir = Path(tmp)
        registry = load_registry(write_fixtures(workdir / "fixtures"))
        base = registry.models[0]
        common: dict[str, Any] = {"device": "cpu", "dtype": "float32", "data_dir": workdir, "warm_up_steps": 2}
        probe = DiffusersEngine(registry, Settings(**common, compile="off"))
        loras = write_attention_loras(probe._model(base, lambda s, p: None).pipe, workdir, rank=8, seed=SEED + 100)
        probe.close()
        tiny = Registry(models=[base], loras=loras)
        variants: list[tuple[str, dict[str, Any]]] = [
            ("regular adapters, compile off", {"compile": "off", "lora_hotswap": "off"}),
            ("hotswap slots, compile off", {"compile": "off", "lora_hotswap": "on"}),
            ("regular adapters, compile on", {"compile": "on", "lora_hotswap": "off"}),
            ("hotswap slots, compile on", {"compile": "on", "lora_hotswap": "on"}),
        ]
        for label, overrides in variants:
            torch._dynamo.reset()
            engine = DiffusersEngine(
                tiny,
                Settings(**common, compile_mode="default", compile_cache_dir=args.compile_cache_dir, **overrides),
            )
            started = time.perf_counter()
            engine.warm_up()
            warm = time.perf_counter() - started
            switch_s: list[float] = []
            job_s: list[float] = []
            graphs_at_steady = 0
            for job in range(args.lora_jobs + 2):
                marks: dict[str, float] = {}

                def progress(step: str, pct: int, marks: dict[str, float] = marks) -> None:
                    if step == STEP_LOADING_LORAS:
                        marks[f"lora{pct}"] = time.perf_counter()

                if job == 3:
                    graphs_at_steady = _graphs()
                task = GenerationTask(
                    prompt="a lighthouse",
                    negative_prompt=None,
                    model=base.id,
                    steps=2,
                    guidance_scale=5.0,
                    seed=job,
                    loras=(LoraChoice(f"lora-{job % 2}", 0.4 + 0.1 * (job % 3)),),
                )
                started = time.perf_counter()
                engine.generate(task, progress)
                if job >= 3:  # both LoRAs loaded and both graphs built: from here on, steady switching
                    job_s.append(time.perf_counter() - started)
                    switch_s.append(marks["lora100"] - marks["lora0"])
            new_graphs = _graphs() - graphs_at_steady
            lines.append([label, f"{1000 * sum(switch_s) / len(switch_s):.1f} ms", f"{sum(job_s) / len(job_s):.3f} s",
                          str(new_graphs), f"{warm:.1f} s"])
            show_row(lines[-1])
            engine.close()
    return lines


# --- main ---------------------------------------------------------------------------------------------
ROW_COLUMNS = ["configuration", "s/image", "s/step", "peak memory", "ratio to plain diffusers", "warm-up (excluded)"]


def row_cells(row: Row, base: float | None) -> list[str]:
    if row.s_image is None:
        return [row.name, "–", "–", "not measured", "–", row.note]
    ratio = f"{row.s_image / base:.2f}×" if base else "–"
    peak = f"{gib(row.peak)} ({row.peak_kind})" if row.peak is not None else "not measured"
    warm = f"{row.warm_up_s:.1f} s" if row.warm_up_s is not None else "–"
    note = f" {row.note}" if row.note else ""
    step = f"{row.s_step:.3f}" if row.s_step is not None else "–"
    return [row.name, f"{row.s_image:.3f}", step, peak, ratio, warm + note]


def show_row(cells: list[str]) -> None:
    """A row as soon as it is measured (on stderr): it survives a run killed by its time limit."""
    print("  | " + " | ".join(cells) + " |", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--dtype", default="auto", help="imagen's IMAGEN_DTYPE for the engine rows")
    parser.add_argument("--size", type=int, help="image side (default: 1024 on CUDA, 512 on CPU)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: 30 on CUDA, 3 on CPU)")
    parser.add_argument("--images", type=int, help="timed images per configuration (default 5 CUDA, 1 CPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up images per configuration")
    parser.add_argument("--warmup-steps", type=int, help="steps of a warm-up image (default: 2 CPU, 30 CUDA)")
    parser.add_argument("--best", action="store_true", help="report the best timed image, not the mean")
    parser.add_argument("--skip-main", action="store_true", help="skip the plain vs imagen table")
    parser.add_argument(
        "--rows",
        default="plain,eager,imagen",
        help="rows of the main table: plain (diffusers), eager (imagen, no compile; CUDA only), imagen",
    )
    parser.add_argument(
        "--compile-mode",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="IMAGEN_COMPILE_MODE for the engine rows (default: imagen's own default)",
    )
    parser.add_argument("--cpu-dtype-check", action="store_true", help="fp32 vs bf16, one 1024² UNet step")
    parser.add_argument("--cpu-dtype-channels-last", action="store_true", help="also channels_last variants")
    parser.add_argument("--cpu-dtype-repeats", type=int, default=1)
    parser.add_argument("--memory-modes", action="store_true", help="default / VAE tiling / offload modes")
    parser.add_argument("--memory-size", type=int, help="image side for memory modes (default: --size)")
    parser.add_argument("--memory-steps", type=int, help="steps for memory modes (default: --steps)")
    parser.add_argument(
        "--memory-compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="IMAGEN_COMPILE for the memory-mode rows (off: their figures without a compile per mode)",
    )
    parser.add_argument("--lora-switch", action="store_true", help="LoRA switch time, compile off/on")
    parser.add_argument(
        "--lora-compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="auto: the compile-on run only on CUDA",
    )
    parser.add_argument("--lora-size", type=int, help="image side for the LoRA part (default: --size)")
    parser.add_argument("--lora-steps", type=int, help="steps for the LoRA part (default: --steps)")
    parser.add_argument("--lora-jobs", type=int, default=6)
    parser.add_argument(
        "--tiny-compile-lora", action="store_true", help="LoRA switching with compile on the tiny fixture model"
    )
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument(
        "--compile-cache-dir",
        type=Path,
        help="IMAGEN_COMPILE_CACHE_DIR for the engine rows (default: a fresh temporary folder, i.e. a cold "
        "compile; run twice with the same folder to see the warm-restart warm-up time)",
    )
    args = parser.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.device = "cuda" if cuda else "cpu"
    args.size = args.size or (1024 if cuda else 512)
    args.steps = args.steps or (30 if cuda else 3)
    args.images = args.images or (5 if cuda else 1)
    args.warmup_steps = args.warmup_steps or (args.steps if cuda else 2)
    if args.compile_cache_dir is None:
        args.compile_cache_dir = Path(tempfile.mkdtemp(prefix="imagen-compile-cache-"))
    return args


def with_size(args: argparse.Namespace, size: int | None, steps: int | None) -> argparse.Namespace:
    copy = argparse.Namespace(**vars(args))
    copy.size = size or args.size
    copy.steps = steps or args.steps
    copy.warmup_steps = min(args.warmup_steps, copy.steps)
    return copy


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message=".*invalid value encountered in cast.*")
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = str(resolve_dtype(args.dtype, device)).removeprefix("torch.")
    setup = (f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
             f"{torch.get_num_threads()} CPU threads; {args.images} timed image(s) after {args.warmup} warm-up "
             f"image(s), batch 1, CFG on (guidance {GUIDANCE})")
    if args.cpu_dtype_check:
        results = cpu_dtype_check(args)
        fp32 = results[0][1]
        report(
            "SDXL speed, CPU: one full-size UNet step at 1024² (latents 128×128, batch 2 for CFG)",
            Table(["dtype", "s per UNet step", "speed vs fp32"],
                  [[name, f"{seconds:.1f}", f"{fp32 / seconds:.2f}×"] for name, seconds, _ in results]),
            notes=[setup],
            headlines=[Headline(f"{name}: one 1024² UNet step vs fp32", f"{fp32 / seconds:.2f}×")
                       for name, seconds, _ in results[1:]],
        )
    if not args.skip_main:
        wanted = {row.strip() for row in args.rows.split(",")}
        rows: list[Row] = []

        def add(row: Row) -> None:
            rows.append(row)
            show_row(row_cells(row, rows[0].s_image))

        if "plain" in wanted:
            add(run_plain(args, device))
        if "eager" in wanted and device.type == "cuda":
            add(run_engine(args, device, "imagen, no compile", compile="off"))
        if "imagen" in wanted:
            add(run_engine(args, device, "imagen"))
        base = rows[0].s_image if rows and "plain" in wanted else None
        last = rows[-1].s_image if rows else None
        report(
            f"SDXL speed: plain diffusers vs imagen ({args.size}², {args.steps} steps, {device.type})",
            Table(ROW_COLUMNS, [row_cells(row, base) for row in rows]),
            dtype=dtype, notes=[setup],
            headlines=[Headline(f"{rows[-1].name}: s/image vs plain diffusers", f"{last / base:.2f}×")]
            if base and last and len(rows) > 1 else [],
        )
    if args.memory_modes:
        margs = with_size(args, args.memory_size, args.memory_steps)
        mrows = memory_modes(margs, device)
        default = mrows[0].s_image
        report(
            f"SDXL memory modes ({margs.size}², {margs.steps} steps, {device.type})",
            Table([*ROW_COLUMNS[:4], "ratio to default", ROW_COLUMNS[5]], [row_cells(row, default) for row in mrows]),
            dtype=dtype, notes=[setup],
        )
    if args.lora_switch:
        largs = with_size(args, args.lora_size, args.lora_steps)
        report(
            f"LoRA switching ({largs.size}², {largs.steps} steps, {device.type}, 2 LoRAs alternating)",
            Table(["engine", "LoRA switch step (mean)", "job right after a switch (mean)", "speed options"],
                  lora_switch(largs, device)),
            dtype=dtype, notes=[setup],
        )
    if args.tiny_compile_lora:
        report(
            "LoRA switching with torch.compile, tiny fixture model (64², 2 steps, CPU)",
            Table(["engine", "LoRA switch step (mean)", "job after a switch (mean)",
                   "graphs compiled while switching", "warm-up"], tiny_compile_lora(args)),
            dtype="float32",
        )


if __name__ == "__main__":
    main()
