"""Benchmark: model affinity on the distributed backend (printed, not asserted). Target: with affinity, at most
a quarter of the model loads and at least twice the throughput of plain fair order, p95 wait no worse.

A private redis-server, ``--workers`` real ``imagen worker`` processes running the test-pattern engine with a
simulated model load (``IMAGEN_TEST_PATTERN_LOAD_SECONDS``, 2 s) and generation (``IMAGEN_TEST_PATTERN_SECONDS``,
0.2 s), each holding one model at a time (``IMAGEN_MAX_LOADED_MODELS=1``: a GPU with room for one checkpoint),
and the API side's ``CeleryBackend`` in this process. ``--jobs`` jobs are sent at once, their models drawn from
``--models`` models with a Zipf-like skew (model k is chosen with weight 1/k, the same draw for every run),
once with ``IMAGEN_AFFINITY=false`` (plain fair order) and once with affinity, alternating for ``--rounds``.

For each run: model loads, jobs/s from the
first submission to the last SUCCESS, and the wait (submission to start) median, p95 and max. Model loads are
the workers' own count (``imagen_worker_model_loads`` on ``/metrics``), read from their heartbeats.

    .venv/bin/python bench/model_affinity.py [--jobs 300] [--workers 4] [--models 6] [--rounds 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness import Headline, Table, imagen_env, redis_server, report, wait, wait_finished, workers

from imagen.config import Settings
from imagen.jobs.distributed.backend import CeleryBackend
from imagen.jobs.types import NewJob


@dataclass(frozen=True)
class Run:
    affinity: bool
    loads: int
    jobs_per_s: float
    wait_median_s: float
    wait_p95_s: float
    wait_max_s: float


def registry(path: Path, count: int) -> Path:
    """``count`` models (the test-pattern engine reads no file)."""
    lines = ["models:"]
    for index in range(count):
        lines += [f"  - id: model-{index}", f"    name: Model {index}", f"    path: models/model-{index}.safetensors",
                  "    size: 64"]
    path.write_text("\n".join(lines) + "\n")
    return path


def zipf_models(jobs: int, models: int, seed: int = 29) -> list[str]:
    weights = [1 / (rank + 1) for rank in range(models)]
    return random.Random(seed).choices([f"model-{index}" for index in range(models)], weights=weights, k=jobs)


def new_job(settings: Settings, prompt: str, model: str) -> NewJob:
    """A job as the API would queue it (``prepare_job``)."""
    from imagen.api.schemas import GenerationRequest
    from imagen.api.submission import prepare_job
    from imagen.registry import load_registry

    request = GenerationRequest(prompt=prompt, steps=10, model=model)
    return prepare_job(request, load_registry(settings.registry_path), settings)


def one_run(workdir: Path, url: str, models: list[str], args: argparse.Namespace, affinity: bool) -> Run:
    registry_path = workdir / "registry.yaml"
    settings = Settings(broker_url=url, engine="test-pattern", outputs_dir=workdir / "api-outputs",
                        data_dir=workdir / "api-data", max_queue=max(1000, len(models)), registry_path=registry_path)
    env = imagen_env(workdir, "worker", broker_url=url, engine="test-pattern", registry_path=registry_path,
                     test_pattern_seconds=args.generation_s, test_pattern_load_seconds=args.load_s,
                     max_loaded_models=1, affinity=str(affinity).lower(), affinity_wait_s=args.affinity_wait_s)
    backend = CeleryBackend(settings)
    backend.start()
    try:
        backend.store.client.flushall()
        with workers(args.workers, env, workdir):
            wait(lambda: sum(bool(beat.get("ready")) for beat in backend.store.workers.alive()) >= args.workers,
                 120, f"{args.workers} workers")
            first = time.time()
            job_ids = [backend.submit(new_job(settings, f"job {index}", model)).job_id
                       for index, model in enumerate(models)]
            records = wait_finished(backend, job_ids, 3600, interval=0.05)
            finished = max(record.finished_at or 0.0 for record in records)
            # Every worker beats once its last job has ended (and every 2 s): read beats made after the last end.
            wait(lambda: all(beat["at"] > finished for beat in backend.store.workers.alive()), 30, "last heartbeats")
            loads = sum(int(beat.get("model_loads") or 0) for beat in backend.store.workers.alive())
    finally:
        backend.stop()
    waits = sorted((record.started_at or 0.0) - record.created_at for record in records)
    last = max(record.finished_at or 0.0 for record in records)
    return Run(
        affinity=affinity,
        loads=loads,
        jobs_per_s=len(records) / (last - first),
        wait_median_s=statistics.median(waits),
        wait_p95_s=waits[min(len(waits) - 1, int(0.95 * len(waits)))],
        wait_max_s=waits[-1],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--load-s", type=float, default=2.0)
    parser.add_argument("--generation-s", type=float, default=0.2)
    parser.add_argument("--affinity-wait-s", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    models = zipf_models(args.jobs, args.models)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="imagen-bench-") as tmp:
        workdir = Path(tmp)
        registry(workdir / "registry.yaml", args.models)
        with redis_server(workdir) as url:
            for _ in range(args.rounds):
                for affinity in (False, True):
                    runs.append(one_run(workdir, url, models, args, affinity))

    def median_of(affinity: bool, field: str) -> float:
        return float(statistics.median(getattr(run, field) for run in runs if run.affinity is affinity))

    plain_loads, loads = median_of(False, "loads"), median_of(True, "loads")
    plain_rate, rate = median_of(False, "jobs_per_s"), median_of(True, "jobs_per_s")
    plain_p95, p95 = median_of(False, "wait_p95_s"), median_of(True, "wait_p95_s")
    counts = {model: models.count(model) for model in sorted(set(models))}
    report(
        f"Model affinity: {args.workers} workers, {args.models} models, {args.jobs} jobs sent at once "
        f"(load {args.load_s:g} s, generation {args.generation_s:g} s, one model held per worker)",
        Table(["order", "model loads", "jobs/s", "wait median", "wait p95", "wait max"], [
            ["affinity" if run.affinity else "plain fair order", run.loads, f"{run.jobs_per_s:.2f}",
             f"{run.wait_median_s:.1f} s", f"{run.wait_p95_s:.1f} s", f"{run.wait_max_s:.1f} s"]
            for run in runs
        ]),
        Table(["what", "measured", "target"], [
            ["loads, affinity / plain", f"{loads / plain_loads:.2f}", "<= 0.25"],
            ["throughput, affinity / plain", f"{rate / plain_rate:.2f}x", ">= 2x"],
            ["p95 wait, affinity / plain", f"{p95 / plain_p95:.2f}", "<= 1"],
        ]),
        notes=[f"Jobs per model: {counts}; IMAGEN_AFFINITY_WAIT_S={args.affinity_wait_s:g}."],
        headlines=[Headline("model loads, affinity / plain fair order", f"{loads / plain_loads:.2f}", "<= 0.25"),
                   Headline("throughput, affinity / plain fair order", f"{rate / plain_rate:.2f}x", ">= 2x"),
                   Headline("p95 wait, affinity / plain fair order", f"{p95 / plain_p95:.2f}", "<= 1")],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
