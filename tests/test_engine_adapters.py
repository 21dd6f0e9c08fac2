"""LoRA / LoCon adapters, trigger words, IP-Adapter and memory over many switches (tiny fixtures, CPU)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

from imagen.errors import FatalGenerationError
from imagen.generation.diffusers.engine import DiffusersEngine
from imagen.registry import Registry
from tests.engine_fixtures import ProgressLog, engine_settings, fixtures_registry, image_bytes, task

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> DiffusersEngine:
    return DiffusersEngine(fixtures_registry(), engine_settings(tmp_path_factory.mktemp("adapters")))


def _image(engine: DiffusersEngine, **changes: object) -> bytes:
    return image_bytes(engine.generate(task(**changes), ProgressLog())[0].image)


@pytest.mark.parametrize("lora", ["anime-style", "character-detail", "locon-detail"])
def test_each_lora_format_changes_the_image_and_weight_zero_does_not(
    engine: DiffusersEngine, lora: str
) -> None:
    plain = _image(engine)
    prompt = "anime style, detailed, locon, a lighthouse"  # trigger words already present: same prompt
    with_trigger_words = _image(engine, prompt=prompt)
    assert _image(engine, prompt=prompt, loras=[(lora, 0.8)]) != with_trigger_words
    assert _image(engine, loras=[(lora, 0.0)]) == plain
    assert _image(engine, prompt=prompt, loras=[(lora, 0.4)]) != _image(
        engine, prompt=prompt, loras=[(lora, 0.8)]
    )


def test_loaded_but_unrequested_loras_have_no_effect_bit_exact(tmp_path: Path) -> None:
    engine = DiffusersEngine(fixtures_registry(), engine_settings(tmp_path))
    before = _image(engine)
    _image(engine, loras=[("anime-style", 1.0), ("character-detail", 0.6), ("locon-detail", 0.5)])
    assert _image(engine) == before
    reads = engine.stats.lora_loads
    _image(engine, loras=[("character-detail", 0.6)])
    _image(engine, loras=[("anime-style", 0.3), ("locon-detail", 1.0)])
    assert engine.stats.lora_loads == reads == 3  # switching reads nothing from disk


def test_multiple_loras_combine(engine: DiffusersEngine) -> None:
    one = _image(engine, loras=[("character-detail", 0.6)])
    two = _image(engine, loras=[("character-detail", 0.6), ("locon-detail", 0.5)])
    assert one != two


def test_trigger_words_are_added_once(engine: DiffusersEngine) -> None:
    result = engine.generate(
        task(prompt="a portrait, Detailed eyes", loras=[("anime-style", 0.75)]), ProgressLog()
    )[0]
    assert result.extra_metadata["final_prompt"] == "anime style, a portrait, Detailed eyes"
    (result,) = engine.generate(task(loras=[("character-detail", 0.6)]), ProgressLog())
    assert result.extra_metadata["final_prompt"] == task().prompt


def test_too_many_or_unknown_loras_are_fatal(engine: DiffusersEngine, tmp_path: Path) -> None:
    with pytest.raises(FatalGenerationError, match="unknown LoRA"):
        engine.generate(task(loras=[("nope", 1.0)]), ProgressLog())
    small = DiffusersEngine(fixtures_registry(), engine_settings(tmp_path, max_loras=1))
    with pytest.raises(FatalGenerationError, match="at most 1"):
        small.generate(task(loras=[("anime-style", 1.0), ("locon-detail", 1.0)]), ProgressLog())


def test_ip_adapter_strength(tmp_path: Path) -> None:
    engine = DiffusersEngine(fixtures_registry(), engine_settings(tmp_path))
    plain = _image(engine)
    assert engine.stats.ip_adapter_loads == 0  # strength 0: never loaded
    styled = _image(engine, ip_strength=0.8)
    assert styled != plain and _image(engine, ip_strength=0.3) != styled
    assert _image(engine, ip_strength=0.0) == plain  # detached again: exactly as without an adapter
    assert _image(engine, ip_strength=0.8) == styled
    assert engine.stats.ip_adapter_loads == 1


def test_ip_adapter_missing_files_are_fatal(tmp_path: Path) -> None:
    registry = fixtures_registry()
    assert registry.ip_adapter is not None
    no_reference = registry.model_copy(
        update={
            "ip_adapter": registry.ip_adapter.model_copy(update={"reference_image": tmp_path / "gone.png"})
        }
    )
    with pytest.raises(FatalGenerationError, match="reference image not found"):
        DiffusersEngine(no_reference, engine_settings(tmp_path)).generate(
            task(ip_strength=0.5), ProgressLog()
        )
    no_adapter = Registry(models=registry.models)
    with pytest.raises(FatalGenerationError, match="no ip_adapter"):
        DiffusersEngine(no_adapter, engine_settings(tmp_path)).generate(task(ip_strength=0.5), ProgressLog())


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc (Linux)")
def test_memory_stays_flat_over_many_lora_switches(tmp_path: Path) -> None:
    engine = DiffusersEngine(fixtures_registry(), engine_settings(tmp_path, max_loaded_models=2))
    sets = [
        [("anime-style", 0.75)],
        [("character-detail", 0.6), ("locon-detail", 0.5)],
        [],
        [("anime-style", 0.4), ("character-detail", 1.0), ("locon-detail", 0.8)],
    ]
    models = ["sdxl-base", "sdxl-single-file"]
    baseline = 0
    # Two rounds of the eight combinations settle the allocator; eight more rounds must not grow it.
    for job in range(80):
        engine.generate(
            task(model=models[job % 2], loras=sets[(job // 2) % len(sets)], steps=1, seed=job),
            lambda s, p: None,
        )
        if job == 15:
            gc.collect()
            baseline = _rss_bytes()
    gc.collect()
    assert _rss_bytes() <= baseline * 1.05, (baseline, _rss_bytes())
    assert engine.stats.model_loads == 2 and engine.stats.lora_loads == 6
