"""Speed options on the tiny fixture models, CPU: same images, LoRAs still right, warm-up, switches.

torch.compile is not exercised here: on a 2-core CPU inductor needs far more than the ~20 s this file may take.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0

from imagen.generation.diffusers import acceleration
from imagen.generation.diffusers.engine import DiffusersEngine
from imagen.generation.diffusers.loading import resolve_dtype
from imagen.generation.diffusers.loras import HotswapLoras
from tests.engine_fixtures import ProgressLog, engine_settings, fixtures_registry, image_bytes, pixels, task

pytestmark = pytest.mark.engine

PLAIN = {"channels_last": False, "fuse_qkv": False, "lora_hotswap": "off"}
TOLERANCE = 3  # max |pixel difference| (0-255) allowed between numerically equivalent paths


def _engine(tmp: Path, **overrides: Any) -> DiffusersEngine:
    return DiffusersEngine(fixtures_registry(), engine_settings(tmp, warm_up_steps=0, **overrides))


def _pixels(engine: DiffusersEngine, **changes: Any) -> np.ndarray:
    return pixels(engine.generate(task(**changes), ProgressLog())[0].image)


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory) -> DiffusersEngine:
    return _engine(tmp_path_factory.mktemp("fast"))  # defaults: SDPA, channels_last, fused QKV


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> DiffusersEngine:
    return _engine(tmp_path_factory.mktemp("plain"), **PLAIN)


@pytest.fixture(scope="module")
def hotswap(tmp_path_factory: pytest.TempPathFactory) -> DiffusersEngine:
    # Slots at the fixtures' LoRA rank (4): no zero padding, so the images must be bit-identical.
    return _engine(tmp_path_factory.mktemp("hotswap"), lora_hotswap="on", lora_hotswap_rank=4)


def _unet(engine: DiffusersEngine) -> Any:
    return engine._models["sdxl-base"].pipe.unet


def test_speed_options_apply_by_default_and_keep_the_image(fast: DiffusersEngine, plain: DiffusersEngine) -> None:
    image = _pixels(fast)
    assert _max_diff(image, _pixels(plain)) <= TOLERANCE
    pipe = fast._models["sdxl-base"].pipe
    assert acceleration.unet_is_fused(pipe.unet)
    assert all(isinstance(p, FusedAttnProcessor2_0) for p in pipe.vae.attn_processors.values())
    conv = pipe.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert not fast.acceleration_options.compile  # auto: no compile on CPU
    attn = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    fused = attn.to_qkv.weight
    assert attn.to_k.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()  # no copy
    assert all(isinstance(p, AttnProcessor2_0) for p in _unet(plain).attn_processors.values())


def test_fused_qkv_with_loras_stays_correct(fast: DiffusersEngine, plain: DiffusersEngine) -> None:
    before = _pixels(fast)
    with_lora = _pixels(fast, loras=[("character-detail", 0.8)])
    assert _max_diff(with_lora, before) > 10  # the LoRA acts although the UNet was fused...
    assert not acceleration.unet_is_fused(_unet(fast))  # ...because LoRA jobs run the unfused processors
    assert _max_diff(with_lora, _pixels(plain, loras=[("character-detail", 0.8)])) <= TOLERANCE
    assert _max_diff(_pixels(fast, loras=[("anime-style", 1.0), ("locon-detail", 0.5)]), before) > 10
    # Loaded but unrequested, or weight 0: bit-exact the image from before any LoRA (fused path again).
    assert image_bytes(fast.generate(task(), ProgressLog())[0].image) == before.astype(np.uint8).tobytes()
    assert acceleration.unet_is_fused(_unet(fast))
    assert np.array_equal(_pixels(fast, loras=[("character-detail", 0.0)]), before)


def test_lora_hotswap_matches_regular_adapters(hotswap: DiffusersEngine, fast: DiffusersEngine) -> None:
    # Same speed options on both sides: only the way LoRAs are switched differs.
    before = _pixels(hotswap)
    jobs: list[list[tuple[str, float]]] = [
        [("character-detail", 0.8)],
        [("anime-style", 0.6)],  # swapped into slot 0
        [("anime-style", 0.6), ("locon-detail", 0.5)],  # anime stays in slot 0, locon (convs) in slot 1
        [("locon-detail", 1.0)],  # swapped into slot 0: rebuilds it (LoCon has layers slot 0 lacks)
        [("character-detail", 0.4)],
    ]
    for loras in jobs:
        got = _pixels(hotswap, prompt="anime style, detailed, locon, a lighthouse", loras=loras)
        want = _pixels(fast, prompt="anime style, detailed, locon, a lighthouse", loras=loras)
        assert np.array_equal(got, want), loras
    assert np.array_equal(_pixels(hotswap), before)  # slots inactive: no effect at all
    assert np.array_equal(_pixels(hotswap, loras=[("anime-style", 0.0)]), before)
    slots = hotswap._models["sdxl-base"].loras
    assert isinstance(slots, HotswapLoras) and slots.swaps >= 4
    assert hotswap.stats.lora_loads == 3  # each file read once; switching reads nothing


def test_lora_hotswap_rank_padding_only_rounds(tmp_path: Path, fast: DiffusersEngine) -> None:
    padded = _engine(tmp_path, lora_hotswap="on")  # default target rank 64: zero-padded LoRA matrices
    for loras in ([("character-detail", 0.8)], [("anime-style", 0.6)]):
        assert _max_diff(_pixels(padded, loras=loras), _pixels(fast, loras=loras)) <= 2 * TOLERANCE


def test_warm_up_runs_at_start_and_the_first_job_loads_nothing(tmp_path: Path) -> None:
    engine = DiffusersEngine(fixtures_registry(), engine_settings(tmp_path, warm_up_steps=1))
    engine.warm_up()
    assert engine.stats.model_loads == 1 and engine.stats.warm_up_runs == 1
    assert engine.stats.warm_up_seconds is not None
    progress = ProgressLog()
    engine.generate(task(), progress)
    assert engine.stats.model_loads == 1
    assert "loading_model" not in progress.steps()
    idle = DiffusersEngine(fixtures_registry(), engine_settings(tmp_path, warm_up_steps=0))
    idle.warm_up()
    assert idle.stats.model_loads == 1 and idle.stats.warm_up_runs == 0


def test_settings_turn_each_option_off(tmp_path: Path) -> None:
    engine = _engine(tmp_path, sdpa=False, channels_last=False, fuse_qkv=False, compile="off")
    engine.generate(task(steps=1), ProgressLog())
    pipe = engine._models["sdxl-base"].pipe
    assert all(type(p) is AttnProcessor for p in pipe.unet.attn_processors.values())
    assert all(type(p) is AttnProcessor for p in pipe.vae.attn_processors.values())
    assert pipe.unet.conv_in.weight.is_contiguous()
    assert not hasattr(pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1, "to_qkv")
    assert engine.acceleration_summary() == ""
    forced = _engine(tmp_path, compile="on")
    assert forced.acceleration_options.compile and forced.lora_hotswap  # hotswap follows compile (auto)


def test_cpu_dtype_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    # Measured on a 2-core AVX512-BF16 EPYC (docs/performance.md): one full-size UNet step at 1024² takes
    # 84 s in fp32 and 46 s in bf16, so `auto` keeps bf16 where the CPU has native bf16, fp32 elsewhere.
    from imagen.generation.diffusers import loading

    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: True)
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: False)
    assert resolve_dtype("auto", cpu) == torch.float32


def test_on_a_cpu_the_vae_is_cast_to_float32_once_not_for_every_job(tmp_path: Path) -> None:
    # bf16: the VAE (force_upcast) decodes in float32; casting SDXL's there and back cost ~0.15 s a job
    engine = _engine(tmp_path, dtype="bfloat16")
    first = image_bytes(engine.generate(task(), ProgressLog())[0].image)
    vae = engine._models["sdxl-base"].pipe.vae
    assert {p.dtype for p in vae.parameters()} == {torch.float32}
    storages = [p.data_ptr() for p in vae.parameters()]
    assert image_bytes(engine.generate(task(), ProgressLog())[0].image) == first
    assert [p.data_ptr() for p in vae.parameters()] == storages  # not cast again: the same tensors
    assert {p.dtype for p in engine._models["sdxl-base"].pipe.unet.parameters()} == {torch.bfloat16}


_FAULTS_OF_A_FREED_BLOCK = """
import resource, sys, tempfile
import torch
from imagen.config import Settings
from imagen.generation.diffusers.engine import DiffusersEngine
from imagen.registry import builtin_registry

keep = sys.argv[1] == "on"
settings = Settings(device="cpu", data_dir=tempfile.mkdtemp(), cpu_keep_freed_memory=keep)
DiffusersEngine(builtin_registry(), settings)
block = torch.ones(16 << 20)  # 64 MiB: a 16-channel float32 activation of a 1024-pixel image
del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = torch.ones(12 << 20)  # 48 MiB, in the memory just freed (if it was kept)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc settings of glibc")
def test_a_cpu_engine_reuses_the_memory_its_tensors_free() -> None:
    # glibc maps each block of 32 MiB or more afresh and unmaps it when freed: the next job faulted every
    # 4 KiB page of it in again (~0.45 s of system time per 1024² demo job). A CPU engine's process keeps it.
    def faults(setting: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", _FAULTS_OF_A_FREED_BLOCK, setting],
            capture_output=True, text=True, timeout=120, check=True, cwd=Path(__file__).resolve().parent.parent,
        )
        return int(done.stdout.split()[-1])

    assert faults("on") < 100
    assert faults("off") > 10_000  # 48 MiB / 4 KiB = 12,288 pages
