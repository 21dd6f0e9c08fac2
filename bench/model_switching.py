"""Benchmark: switching models by memory budget leaks nothing, and the host-RAM tier beats the disk.

Three models: the demo model (shipped) and two tiny fixture checkpoints (``imagen fixtures``' ``sdxl-base``
and one written here with a UNet and text encoders of its own and ``sdxl-base``'s VAE files, byte for
byte). ``--jobs`` jobs (100) go round the three in turn, at 64x64 and 2 steps, so that each job needs the
model the last job did not, under each of these settings (a fresh worker process each):

* **disk**: ``IMAGEN_MODEL_MEMORY_GB`` smaller than one model (each model loads alone), no RAM tier: every
  switch reads the model from disk and frees the last one;
* **disk, release off**: the same with ``IMAGEN_RELEASE_FREED_MODELS=false`` (no gc, ``empty_cache`` or
  glibc ``malloc_trim`` after a model is freed): the "before" of the release;
* **RAM tier**: the same device budget and ``IMAGEN_MODEL_RAM_GB=1``: a model pushed off waits in host RAM
  and each switch back is a copy (on a CPU-only worker both tiers are RAM: nothing moves, the switch is a
  re-pointing);
* **device holds two**: a budget a fixture model and the demo model fit in together, not two fixtures.

Printed: the worker's RSS after each cycle (one job on each model; CUDA allocated / reserved too when there
is a GPU), then per setting the model loads, the median switch time from each tier, and the RSS growth from
the first cycle to the last (target: within 5 %; a switch from the RAM tier faster than from disk). Last,
the memory two fixture checkpoints that share their VAE hold, with and without sharing.

Both backends: the engine runs in-process (in one child process per setting), as it runs inside an
embedded worker's child or a distributed worker alike; the job backends add nothing to a model switch, so
no queue runs here. On a GPU (``--device cuda``), the RAM tier is host memory and the copies are real.

    .venv/bin/python bench/model_switching.py [--jobs 100] [--device auto]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from harness import Headline, Table, mib, quiet_libraries, report, rss_bytes

PROMPT = "a red circle on a white background"
FIXTURE_A = "sdxl-base"
FIXTURE_B = "fixture-shared-vae"
ONE_MODEL_GB = 0.001  # smaller than any of the three: each loads alone
# In float32 (halved for a 16-bit dtype): ~43 MB, a fixture (~27 MB) and the demo (~5 MB), not two fixtures
FIXTURE_AND_DEMO_GB = 0.04


@dataclass(frozen=True)
class Setting:
    name: str
    settings: dict[str, Any]


SETTINGS = [
    Setting("disk", {"model_memory_gb": ONE_MODEL_GB}),
    Setting("disk, release off", {"model_memory_gb": ONE_MODEL_GB, "release_freed_models": False}),
    Setting("RAM tier", {"model_memory_gb": ONE_MODEL_GB, "model_ram_gb": 1.0}),
    Setting("device holds two", {"model_memory_gb": FIXTURE_AND_DEMO_GB}),
]


@dataclass
class Run:
    rss: list[int] = field(default_factory=list)  # after each cycle
    cuda: list[tuple[int, int]] = field(default_factory=list)  # (allocated, reserved) after each cycle
    switches: dict[str, list[float]] = field(default_factory=lambda: {"disk": [], "ram": []})
    model_loads: int = 0
    ram_switches: int = 0
    models_freed: int = 0
    shared_components: int = 0
    dtype: str = ""


def write_models(workdir: Path) -> Any:
    """The registry: the demo model and the two fixture checkpoints that share their VAE files."""
    from imagen.generation.diffusers.components import FIXTURE_SHAPE, build_tiny_sdxl_pipeline
    from imagen.registry import Registry, builtin_registry, load_registry
    from imagen.testing.fixtures import write_fixtures

    fixtures = load_registry(write_fixtures(workdir / "fixtures"))
    base = fixtures.model(FIXTURE_A)
    assert base is not None and base.path is not None
    other = workdir / FIXTURE_B
    build_tiny_sdxl_pipeline(FIXTURE_SHAPE, seed=99).save_pretrained(str(other), safe_serialization=True)
    shutil.rmtree(other / "vae")
    shutil.copytree(Path(base.path) / "vae", other / "vae")
    return Registry(models=[*builtin_registry().models, base, base.model_copy(update={"id": FIXTURE_B, "path": other})])


def run_setting(setting: Setting, jobs: int, device: str, workdir: Path) -> Run:
    """In a fresh process: ``jobs`` jobs round the three models under ``setting``."""
    import torch

    from imagen.config import Settings
    from imagen.generation.base import GenerationTask
    from imagen.generation.diffusers.engine import DiffusersEngine
    from imagen.generation.diffusers.loading import resolve_device, resolve_dtype

    quiet_libraries()
    registry = write_models(workdir)
    values = dict(setting.settings)
    if values.get("model_memory_gb") == FIXTURE_AND_DEMO_GB:
        dtype = resolve_dtype("auto", resolve_device(device))
        values["model_memory_gb"] = FIXTURE_AND_DEMO_GB * torch.finfo(dtype).bits / 32
    settings = Settings(data_dir=workdir / "data", device=device, engine="diffusers", warm_up_steps=0, **values)
    engine = DiffusersEngine(registry, settings)
    models = [model.id for model in registry.models]
    run = Run(dtype=str(engine.dtype).removeprefix("torch."))
    cuda = engine.device.type == "cuda"
    for job in range(jobs):
        model = models[job % len(models)]
        stats = engine.stats
        before = (stats.model_loads, stats.ram_switches)
        task = GenerationTask(prompt=PROMPT, negative_prompt=None, model=model, steps=2, seed=job, width=64,
                              height=64)
        engine.generate(task, lambda step, percent: None)
        if (stats.model_loads, stats.ram_switches) != before and stats.last_switch is not None:
            source, seconds = stats.last_switch
            run.switches[source].append(seconds)
        if job % len(models) == len(models) - 1:
            run.rss.append(rss_bytes())
            if cuda:
                run.cuda.append((torch.cuda.memory_allocated(), torch.cuda.memory_reserved()))
    stats = engine.stats
    run.model_loads, run.ram_switches, run.models_freed = stats.model_loads, stats.ram_switches, stats.models_freed
    run.shared_components = stats.shared_components
    engine.close()
    return run


def sharing(device: str, workdir: Path) -> tuple[int, int, int]:
    """Bytes the two fixture checkpoints hold with sharing and without; the bytes shared."""
    from imagen.config import Settings
    from imagen.generation.base import GenerationTask
    from imagen.generation.diffusers.engine import DiffusersEngine
    from imagen.generation.diffusers.model_cache import storage_bytes

    quiet_libraries()
    registry = write_models(workdir)
    held = []
    shared = 0
    for share in (True, False):
        engine = DiffusersEngine(registry, Settings(data_dir=workdir / "data", device=device, engine="diffusers"))
        if not share:
            engine.pipeline_loader = partial(engine.pipeline_loader)  # not the default loader: handed nothing
        for model in (FIXTURE_A, FIXTURE_B):
            engine.generate(GenerationTask(prompt=PROMPT, negative_prompt=None, model=model, steps=1),
                            lambda step, percent: None)
        modules = {id(m): m for loaded in engine._models.values() for m in loaded.weight_modules()}
        held.append(storage_bytes(modules.values()))
        shared = max(shared, engine.stats.shared_bytes)
        engine.close()
    return held[0], held[1], shared


def in_child(function: Callable[..., Any], *arguments: Any) -> Any:
    """``function(*arguments)`` in a fresh process: each setting's RSS starts from the same point."""
    with tempfile.TemporaryDirectory(prefix="imagen-bench-") as tmp, ProcessPoolExecutor(
        max_workers=1, mp_context=get_context("spawn")
    ) as pool:
        return pool.submit(function, *arguments, Path(tmp)).result()


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100, help="jobs per setting, round the three models")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args()
    if args.jobs < 6:
        parser.error("--jobs: at least 6 (two cycles of the three models)")
    runs = {setting.name: in_child(run_setting, setting, args.jobs, args.device) for setting in SETTINGS}
    with_sharing, without_sharing, shared_bytes = in_child(sharing, args.device)

    names = list(runs)
    cycles = min(len(run.rss) for run in runs.values())
    cuda = any(run.cuda for run in runs.values())
    per_cycle = Table(
        ["cycle", *[f"RSS, {name}" for name in names], *([f"CUDA alloc / reserved, {names[0]}"] if cuda else [])],
        [[cycle + 1, *[mib(runs[name].rss[cycle]) for name in names],
          *([" / ".join(mib(n) for n in runs[names[0]].cuda[cycle])] if cuda else [])]
         for cycle in range(cycles)],
        caption=f"RSS of the worker process after each cycle (one job on each of the 3 models), {args.jobs} jobs",
    )

    def growth(run: Run) -> float:
        return (run.rss[-1] - run.rss[0]) / run.rss[0] * 100

    summary = Table(
        ["setting", "model loads (disk)", "switches from RAM", "models freed", "components shared",
         "median switch from disk, ms",
         "median switch from RAM, ms", "RSS after cycle 1", "RSS after the last", "growth"],
        [[name, run.model_loads, run.ram_switches, run.models_freed, run.shared_components,
          median_ms(run.switches["disk"]),
          median_ms(run.switches["ram"]), mib(run.rss[0]), mib(run.rss[-1]), f"{growth(run):+.1f} %"]
         for name, run in runs.items()],
        caption="Per setting (target: growth within ±5 %; a switch from RAM faster than from disk)",
    )
    saving = Table(
        ["two fixture checkpoints, same VAE files", "weights held"],
        [["each reads its own files", mib(without_sharing)], ["VAE held once", mib(with_sharing)],
         ["saved", f"{mib(without_sharing - with_sharing)} (the VAE: {mib(shared_bytes)})"]],
    )
    disk, ram = runs["disk"], runs["RAM tier"]
    report(
        "Model switching: RSS per cycle, switch time per tier, shared components",
        per_cycle, summary, saving,
        dtype=disk.dtype,
        notes=["Release off: IMAGEN_RELEASE_FREED_MODELS=false (no gc / empty_cache / malloc_trim after a free)."],
        headlines=[
            Headline("RSS growth, first to last cycle (disk switches)", f"{growth(disk):+.1f} %", "within ±5 %"),
            Headline("switch from RAM / from disk, median", f"{median_ms(ram.switches['ram'])} / "
                     f"{median_ms(disk.switches['disk'])} ms", "RAM faster"),
        ],
    )


if __name__ == "__main__":
    main()
