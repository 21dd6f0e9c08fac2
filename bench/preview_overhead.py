"""Benchmark: what ``GET /events?preview=1`` previews cost a job (target: at most 5 % slower).

The demo model (SDXL architecture, trained on shapes, 1024x1024, the pipeline the server builds) in the
diffusers engine, one job as a worker runs it (``runner.run_task``: generate, then write the PNG), with
previews (every ``preview_every_steps`` steps: the model's linear latent-to-RGB map of the step's latents,
exact for the demo model, and a JPEG) and without. The two paths are interleaved (without, with, with,
without, ...), after one untimed warm-up each. Printed: each path's median and runs, the ratio of the medians
(target <= 1.05), the time the jobs with previews spent making them (measured inside the engine, so a
machine busy with other work cannot blur it as it blurs the wall times) as a share of those jobs, and one
preview alone (median of 50).

    .venv/bin/python bench/preview_overhead.py [--runs 5] [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import Headline, Table, quiet_libraries, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    quiet_libraries()

    import torch

    from imagen.config import Settings
    from imagen.generation.base import GenerationTask
    from imagen.generation.diffusers import engine as engine_module
    from imagen.generation.diffusers.preview import latents_preview
    from imagen.generation.runner import run_task
    from imagen.registry import builtin_registry
    from imagen.registry.demo_model import LATENT_DOWNSCALE

    workdir = Path(tempfile.mkdtemp(prefix="imagen-preview-bench-"))
    settings = Settings(data_dir=workdir / "data")
    engine = engine_module.DiffusersEngine(builtin_registry(), settings)
    spent_in_previews = [0.0]

    def timed_preview(latents: torch.Tensor, *args: Any, **kwargs: Any) -> bytes:
        start = time.perf_counter()
        try:
            return latents_preview(latents, *args, **kwargs)
        finally:
            spent_in_previews[0] += time.perf_counter() - start

    engine_module.latents_preview = timed_preview  # type: ignore[attr-defined]  # the engine previews with it
    task = GenerationTask(prompt="a large green star on the left on a beige background", negative_prompt=None,
                          model="demo", steps=args.steps, guidance_scale=7.5, seed=1)
    previews: list[int] = []

    def job(with_previews: bool, name: str) -> float:
        start = time.perf_counter()
        run_task(engine, task, name, workdir / "outputs", lambda step, percent: None,
                 preview=(lambda step, jpeg: previews.append(len(jpeg))) if with_previews else None)
        return time.perf_counter() - start

    job(False, "warm-up-a.png")
    job(True, "warm-up-b.png")
    times: dict[bool, list[float]] = {False: [], True: []}
    spent_in_previews[0] = 0.0
    for run in range(args.runs):
        order = (False, True) if run % 2 == 0 else (True, False)
        for with_previews in order:
            times[with_previews].append(job(with_previews, f"run-{run}-{int(with_previews)}.png"))

    cells = 1024 // LATENT_DOWNSCALE
    latents = torch.randn(1, 4, cells, cells, device=engine.device)
    one: list[float] = []
    for _ in range(50):
        start = time.perf_counter()
        latents_preview(latents)
        one.append(time.perf_counter() - start)

    ratio = statistics.median(times[True]) / statistics.median(times[False])
    share = spent_in_previews[0] / sum(times[True])
    per_job = args.steps // settings.preview_every_steps
    report(
        f"Previews: demo model, 1024x1024, {args.steps} steps, {engine.device}, a preview every "
        f"{settings.preview_every_steps} steps ({per_job} per job, ~{statistics.median(previews) / 1024:.1f} KiB "
        f"each), {args.runs} runs per path (interleaved)",
        Table(["path", "median s", "runs (s)"], [
            [label, f"{statistics.median(times[with_previews]):.3f}",
             " ".join(f"{t:.3f}" for t in times[with_previews])]
            for with_previews, label in ((False, "without previews"), (True, "with previews"))
        ]),
        dtype=str(engine.dtype).removeprefix("torch."),
        notes=[
            f"ratio of the medians (with / without): {ratio:.3f} (target <= 1.05)",
            f"time spent making previews: {spent_in_previews[0] / args.runs * 1000:.1f} ms per job, "
            f"{share * 100:.3f} % of the jobs with previews",
            f"one preview alone ({cells}x{cells} latents -> JPEG): median {statistics.median(one) * 1000:.2f} ms",
        ],
        headlines=[Headline("with / without previews (medians)", f"{ratio:.3f}", "<= 1.05"),
                   Headline("time spent making previews", f"{share * 100:.3f} % of a job")],
    )

if __name__ == "__main__":
    main()
