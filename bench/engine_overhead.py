"""Issue 3 benchmark: a job through the service vs the same diffusers call made directly; switch times.

1. The demo model (SDXL architecture, tiny random weights, native 1024x1024) on this machine: the median
   time of the plain diffusers pipeline call vs the median time from POST /generate to SUCCESS through a
   real `imagen serve` (same steps, size, dtype). Ratio target <= 1.05.
2. Model switch and LoRA-set switch, measured in the engine on the tiny fixtures (`imagen fixtures`):
   the extra time of a job that must switch, over a job that needs nothing new.

    .venv/bin/python bench/engine_overhead.py [--steps 30] [--repeats 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPT = "a majestic dragon flying over mountains at sunset"
NEGATIVE = "low quality, blurry, distorted, ugly, bad anatomy"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def direct_times(steps: int, repeats: int, dtype_name: str) -> list[float]:
    import torch

    from imagen.generation.diffusers.components import DEMO_SHAPE, build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline(DEMO_SHAPE, seed=0).to("cpu", getattr(torch, dtype_name))
    pipe.set_progress_bar_config(disable=True)
    times = []
    for index in range(repeats + 1):
        start = time.perf_counter()
        pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
             width=1024, height=1024, generator=torch.Generator("cpu").manual_seed(index)).images[0]
        if index:  # the first call warms up
            times.append(time.perf_counter() - start)
    del pipe
    return times


def service_times(steps: int, repeats: int, workdir: Path) -> list[float]:
    port = free_port()
    env = {**os.environ, "IMAGEN_DATA_DIR": str(workdir / "data"), "IMAGEN_OUTPUTS_DIR": str(workdir / "outputs"),
           "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "imagen", "serve", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def call(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        connection.request(method, path, body=json.dumps(body) if body else None,
                           headers={"Content-Type": "application/json"})
        result: dict[str, Any] = json.loads(connection.getresponse().read())
        return result

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                call("GET", "/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                connection.close()
                time.sleep(0.1)
        times = []
        for index in range(repeats + 1):
            start = time.perf_counter()
            job = call("POST", "/generate", {"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": steps,
                                             "guidance_scale": 7.5, "seed": index})
            while (state := call("GET", f"/status/{job['job_id']}"))["status"] not in ("SUCCESS", "FAILURE"):
                time.sleep(0.02)  # polling costs CPU that the 2-core generation needs
            assert state["status"] == "SUCCESS", state
            if index:  # the first job loads the model
                times.append(time.perf_counter() - start)
        return times
    finally:
        server.kill()
        server.wait()


def switch_times(workdir: Path) -> dict[str, float]:
    from imagen.config import Settings
    from imagen.devtools.fixtures import write_fixtures
    from imagen.generation.base import GenerationTask, LoraChoice
    from imagen.generation.diffusers.engine import DiffusersEngine
    from imagen.registry import load_registry

    registry = load_registry(write_fixtures(workdir / "fixtures"))
    engine = DiffusersEngine(registry, Settings(data_dir=workdir / "data", max_loaded_models=1))

    def job(model: str, loras: tuple[tuple[str, float], ...] = ()) -> float:
        task = GenerationTask(prompt=PROMPT, negative_prompt=None, model=model, steps=4, seed=1,
                              loras=tuple(LoraChoice(name, weight) for name, weight in loras))
        start = time.perf_counter()
        engine.generate(task, lambda step, percent: None)
        return time.perf_counter() - start

    def median(values: list[float]) -> float:
        return statistics.median(values)

    set_a = (("anime-style", 0.75),)
    set_b = (("character-detail", 0.6), ("locon-detail", 0.8))
    job("sdxl-base"), job("sdxl-base", set_a), job("sdxl-base", set_b)  # load everything once
    warm = median([job("sdxl-base") for _ in range(5)])
    same_set = median([job("sdxl-base", set_a) for _ in range(5)])
    lora_switch = median([job("sdxl-base", set_a if i % 2 else set_b) for i in range(6)])
    model_switch = median([job("sdxl-single-file" if i % 2 == 0 else "sdxl-base") for i in range(4)])
    return {"warm job (no LoRA)": warm, "same LoRA set again": same_set,
            "LoRA set switch (adapters already loaded)": lora_switch,
            "model switch (reload, 1 model kept)": model_switch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-switches", action="store_true")
    args = parser.parse_args()

    import torch

    from imagen.generation.diffusers.engine import resolve_dtype

    dtype = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    with tempfile.TemporaryDirectory(prefix="imagen-bench-") as tmp:
        direct = direct_times(args.steps, args.repeats, dtype)
        service = service_times(args.steps, args.repeats, Path(tmp))
        switches = {} if args.skip_switches else switch_times(Path(tmp))
    d, s = statistics.median(direct), statistics.median(service)
    print(f"demo model, 1024x1024, {args.steps} steps, CFG 7.5, {dtype}, CPU threads {torch.get_num_threads()}")
    print("| path | median s/image | runs |")
    print("|---|---|---|")
    print(f"| diffusers pipeline call, direct | {d:.3f} | {', '.join(f'{t:.3f}' for t in direct)} |")
    print(f"| POST /generate -> SUCCESS through imagen | {s:.3f} | {', '.join(f'{t:.3f}' for t in service)} |")
    print(f"ratio service / direct: {s / d:.3f}  (target <= 1.05)")
    if not switches:
        return
    print()
    print("switch times, tiny fixtures (64x64, 4 steps), in the engine:")
    warm = switches["warm job (no LoRA)"]
    for name, value in switches.items():
        extra = "" if value is warm else f"  (+{(value - warm) * 1000:.0f} ms over a warm job)"
        print(f"  {name}: {value * 1000:.0f} ms{extra}")


if __name__ == "__main__":
    main()
