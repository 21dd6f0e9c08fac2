"""Benchmark: what a job that must switch model or LoRA set costs over one that needs nothing new.

In the diffusers engine (the one a worker runs), on the tiny fixtures (``imagen fixtures``: 64x64, 4 steps),
one model kept loaded: a warm job without LoRA, the same LoRA set again, a switch between two LoRA sets whose
adapters are already loaded, and a model switch (a reload). Medians of 4-6 jobs each, after one job of each
kind has loaded everything once.

    .venv/bin/python bench/switch_times.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from harness import Headline, Table, quiet_libraries, report

PROMPT = "a large green star on the left on a beige background"


def switch_times(workdir: Path) -> tuple[dict[str, float], str]:
    """Median seconds of each kind of job; the engine's dtype."""
    from imagen.config import Settings
    from imagen.generation.base import GenerationTask, LoraChoice
    from imagen.generation.diffusers.engine import DiffusersEngine
    from imagen.registry import load_registry
    from imagen.testing.fixtures import write_fixtures

    registry = load_registry(write_fixtures(workdir / "fixtures"))
    engine = DiffusersEngine(registry, Settings(data_dir=workdir / "data", max_loaded_models=1))

    def job(model: str, loras: tuple[tuple[str, float], ...] = ()) -> float:
        task = GenerationTask(prompt=PROMPT, negative_prompt=None, model=model, steps=4, seed=1,
                              loras=tuple(LoraChoice(name, weight) for name, weight in loras))
        start = time.perf_counter()
        engine.generate(task, lambda step, percent: None)
        return time.perf_counter() - start

    median = statistics.median
    set_a = (("anime-style", 0.75),)
    set_b = (("character-detail", 0.6), ("locon-detail", 0.8))
    job("sdxl-base"), job("sdxl-base", set_a), job("sdxl-base", set_b)  # load everything once
    warm = median([job("sdxl-base") for _ in range(5)])
    same_set = median([job("sdxl-base", set_a) for _ in range(5)])
    lora_switch = median([job("sdxl-base", set_a if i % 2 else set_b) for i in range(6)])
    model_switch = median([job("sdxl-single-file" if i % 2 == 0 else "sdxl-base") for i in range(4)])
    engine.close()
    return {"warm job (no LoRA)": warm, "same LoRA set again": same_set,
            "LoRA set switch (adapters already loaded)": lora_switch,
            "model switch (reload, 1 model kept)": model_switch}, str(engine.dtype).removeprefix("torch.")


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="imagen-bench-") as tmp:
        times, dtype = switch_times(Path(tmp))
    warm = times["warm job (no LoRA)"]
    extra = {name: value - warm for name, value in times.items()}
    report(
        "Switch times, tiny fixtures (64x64, 4 steps), in the engine",
        Table(["job", "median ms", "over a warm job"],
              [[name, f"{value * 1000:.0f}", "-" if name == "warm job (no LoRA)" else f"{extra[name] * 1000:+.0f} ms"]
               for name, value in times.items()]),
        dtype=dtype,
        headlines=[Headline("LoRA set switch, over a warm job",
                            f"{extra['LoRA set switch (adapters already loaded)'] * 1000:+.0f} ms"),
                   Headline("model switch, over a warm job",
                            f"{extra['model switch (reload, 1 model kept)'] * 1000:+.0f} ms")],
    )


if __name__ == "__main__":
    main()
