"""On a CUDA GPU: the paths that only a GPU runs, on the shipped demo model (real SDXL architecture).

Skipped without a CUDA device, so CI (no GPU) passes them by. On a GPU box: ``make test-gpu``.

* fp16 generation through the real service (API + its worker process), a 1024² PNG that the judge reads;
* the same seed twice gives the same bytes on the same GPU;
* LoRA hotswap with torch.compile on: four LoRA switches compile no new graph;
* VAE tiling / slicing and model / sequential CPU offload each give the image;
* a forced out-of-memory (most of the card taken first) ends in the retry path, then the worker goes on.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from imagen.errors import RetryableGenerationError
from imagen.generation.base import GenerationTask, LoraChoice
from imagen.generation.diffusers.engine import DiffusersEngine
from imagen.generation.runner import classify_failure
from imagen.registry import Registry
from imagen.registry.builtin import DEMO_LORA_ID, DEMO_MODEL_ID, builtin_registry
from imagen.testing.fixtures import write_attention_loras
from tests.conftest import wait_status
from tests.engine_fixtures import engine_settings
from training.judge import Verdict, judge

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPT = "a large red circle in the center on a white background"


def _settings(tmp: Path, **overrides: Any) -> Any:
    values: dict[str, Any] = {"device": "cuda", "dtype": "float16", "compile": "off", "warm_up_steps": 0}
    values.update(overrides)
    return engine_settings(tmp, **values)


def _task(**changes: Any) -> GenerationTask:
    base = GenerationTask(prompt=PROMPT, negative_prompt=None, model=DEMO_MODEL_ID, steps=30, guidance_scale=7.5,
                          seed=3)
    return dataclasses.replace(base, **changes)


def _draw(engine: DiffusersEngine, **changes: Any) -> Image.Image:
    image: Image.Image = engine.generate(_task(**changes), lambda step, pct: None)[0].image
    return image


def _red_on_white(image: Image.Image) -> Verdict:
    verdict = judge(image)
    assert image.size == (1024, 1024)
    assert (verdict.colour, verdict.background) == ("red", "white"), verdict
    return verdict


@pytest.fixture(scope="module")
def fp16_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DiffusersEngine]:
    engine = DiffusersEngine(builtin_registry(), _settings(tmp_path_factory.mktemp("gpu-fp16")))
    yield engine
    engine.close()


def _wait_ready_on_the_gpu(client: TestClient, timeout: float = 120.0) -> None:
    """/health counts ready workers only: wait until the worker has loaded the model on the GPU."""
    deadline = time.monotonic() + timeout
    while (health := client.get("/health").json())["gpu_available"] is not True:
        assert time.monotonic() < deadline, health
        time.sleep(0.2)


def test_fp16_generation_through_the_service_gives_a_1024_png(make_client: Callable[..., TestClient]) -> None:
    client = make_client(engine="diffusers", registry_path=None, device="cuda", dtype="float16", compile="off")
    _wait_ready_on_the_gpu(client)
    job_id = client.post("/generate", json={"prompt": PROMPT, "seed": 3}).json()["job_id"]
    done = wait_status(client, job_id, {"SUCCESS", "FAILURE"}, timeout=180)
    assert done["status"] == "SUCCESS", done
    png = client.get(f"/image/{job_id}").content
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    _red_on_white(Image.open(io.BytesIO(png)))


def _digest(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()  # not the bytes: pytest's diff of 3 MB takes minutes


def test_the_same_seed_gives_the_same_bytes_twice_on_the_gpu(fp16_engine: DiffusersEngine) -> None:
    first, second = _draw(fp16_engine, seed=11), _draw(fp16_engine, seed=11)
    assert _digest(first) == _digest(second)
    assert _digest(_draw(fp16_engine, seed=12)) != _digest(first)


@pytest.mark.parametrize(
    "mode",
    [{"vae_tiling": True}, {"vae_slicing": True}, {"cpu_offload": "model"}, {"cpu_offload": "sequential"}],
    ids=["vae-tiling", "vae-slicing", "model-offload", "sequential-offload"],
)
def test_memory_saving_modes_give_the_image(tmp_path: Path, mode: dict[str, Any]) -> None:
    engine = DiffusersEngine(builtin_registry(), _settings(tmp_path, **mode))
    try:
        _red_on_white(_draw(engine))
    finally:
        engine.close()


def _take_most_of_the_card() -> torch.Tensor:
    """All free GPU memory but a sliver, as one tensor of this process (drop it to give the memory back)."""
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info()
    return torch.empty(max(0, free - 24 * 2**20), dtype=torch.uint8, device="cuda")


def test_a_forced_out_of_memory_ends_in_the_retry_path_not_a_crash(fp16_engine: DiffusersEngine) -> None:
    _red_on_white(_draw(fp16_engine, seed=5))
    held_before = torch.cuda.memory_allocated()
    hog = _take_most_of_the_card()
    try:
        with pytest.raises(RetryableGenerationError) as caught:
            _draw(fp16_engine, seed=5, num_images=4)
    finally:
        del hog
        torch.cuda.empty_cache()
    assert classify_failure(caught.value) == (True, "CUDA out of memory")
    del caught  # its traceback holds the failed job's tensors; the worker drops it the same way
    gc.collect()
    # Nothing of the failed job stays allocated, and the next job runs. Not the same bytes as before the
    # failure: cuDNN remembers the convolution algorithm it fell back to for lack of workspace while the
    # card was full (PyTorch's algorithm cache), so the arithmetic, not the picture, can differ after it.
    assert torch.cuda.memory_allocated() <= held_before + 2**20
    _red_on_white(_draw(fp16_engine, seed=5))


def test_out_of_memory_in_the_worker_process_fails_the_job_with_the_reason_then_the_worker_goes_on(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(engine="diffusers", registry_path=None, device="cuda", dtype="float16", compile="off",
                         warm_up_steps=2, max_attempts=2)
    _wait_ready_on_the_gpu(client)
    # The worker is another process, and its allocator keeps what the warm-up (one 1024² image) reserved:
    # a job that fits in that pool does not see a full card. Four 2048² images need more than it holds.
    hog = _take_most_of_the_card()
    big = {"prompt": PROMPT, "seed": 3, "num_images": 4, "width": 2048, "height": 2048}
    job_id = client.post("/generate", json=big).json()["job_id"]
    failed = wait_status(client, job_id, {"SUCCESS", "FAILURE"}, timeout=180)
    del hog
    torch.cuda.empty_cache()
    assert failed["status"] == "FAILURE" and "out of memory" in str(failed).lower(), failed
    job_id = client.post("/generate", json={"prompt": PROMPT, "seed": 3}).json()["job_id"]
    done = wait_status(client, job_id, {"SUCCESS", "FAILURE"}, timeout=180)
    assert done["status"] == "SUCCESS", done
    _red_on_white(Image.open(io.BytesIO(client.get(f"/image/{job_id}").content)))


# Last: torch.compile takes minutes on a cold cache (the session script runs it apart, `-k compile`).
def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_lora_hotswap_with_compile_compiles_nothing_new_across_four_switches(tmp_path: Path) -> None:
    torch._dynamo.reset()
    builtin = builtin_registry()
    probe = DiffusersEngine(builtin, _settings(tmp_path / "probe"))
    randoms = write_attention_loras(probe._model(builtin.models[0], lambda s, p: None).pipe, tmp_path, 8, seed=7)
    probe.close()
    registry = Registry(models=builtin.models, loras=[*builtin.loras, *randoms])
    engine = DiffusersEngine(
        registry,
        _settings(tmp_path / "compiled", compile="on", compile_mode="default", compile_vae=False,
                  lora_hotswap="on", lora_hotswap_rank=16),
    )
    try:
        # First use of each LoRA (read from disk, the LoRA graph compiled once).
        without = judge(_draw(engine))
        for lora in ("lora-0", "lora-1", DEMO_LORA_ID):
            _draw(engine, loras=(LoraChoice(lora, 1.0),))
        assert engine.acceleration_options.compile
        graphs = _unique_graphs()
        # Four switches, each job another LoRA than the one before.
        _draw(engine, loras=(LoraChoice("lora-0", 0.8),))
        blue = judge(_draw(engine, loras=(LoraChoice(DEMO_LORA_ID, 1.0),)))
        _draw(engine, loras=(LoraChoice("lora-1", 0.5),))
        back = judge(_draw(engine, loras=(LoraChoice(DEMO_LORA_ID, 1.0),)))
        assert _unique_graphs() == graphs, "a LoRA switch recompiled the UNet"
    finally:
        engine.close()
    assert without.colour == "red", without
    assert blue.colour_rgb is not None and back.colour_rgb == blue.colour_rgb, (blue, back)
    red, _, bl = blue.colour_rgb
    assert bl > red, blue  # the demo LoRA really is in the slots: red asked, blue-violet drawn
