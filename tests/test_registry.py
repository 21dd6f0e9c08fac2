"""The registry file: the documented example parses, mistakes are named, paths resolve from the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagen.errors import RegistryError
from imagen.registry import builtin_registry, load_registry
from tests.conftest import REPO


def test_documented_example_parses() -> None:
    registry = load_registry(REPO / "registry.example.yaml")
    assert registry.model_ids == ["sdxl-base", "pony-xl-v6"]
    assert registry.lora_ids == ["anime-style", "character-detail"]
    assert registry.resolve_default_model() == "sdxl-base"
    model = registry.model("sdxl-base")
    assert model is not None and model.file_prefix == "sdxl_base"
    assert model.path == (REPO / "models" / "sd_xl_base_1.0.safetensors").resolve()
    pony = registry.model("pony-xl-v6")
    assert pony is not None and pony.file_prefix == "pony_xl_v6" and pony.size == 1024
    assert (pony.scheduler, pony.clip_skip, pony.guidance_rescale, pony.guidance_stop) == ("Euler a", 2, 0.0, 1.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: []\n", "at least one model"),
        ("models:\n  - {id: a, name: A, path: a.safetensors}\n  - {id: a, name: B, path: b.safetensors}\n",
         "duplicate model ids: a"),
        ("models:\n  - {id: a, name: A}\n", "`path` is required"),
        ("models:\n  - {id: A B, name: A, path: a.safetensors}\n", "id"),
        ("default_model: nope\nmodels:\n  - {id: a, name: A, path: a.safetensors}\n", "default_model 'nope'"),
        ("models:\n  - {id: a, name: A, path: a.safetensors}\nloras:\n  - {id: l, name: L, path: l.safetensors, "
         "default_weight: 3}\n", "less than or equal to 2"),
        ("models:\n  - {id: a, name: A, path: a.safetensors, colour: red}\n", "colour"),
        ("models:\n  - {id: a, name: A, path: a.safetensors, guidance_rescale: 1.5}\n", "less than or equal to 1"),
        ("models:\n  - {id: a, name: A, path: a.safetensors, guidance_stop: 0}\n", "greater than 0"),
        ("models:\n  - {id: a, name: A, path: a.safetensors, guidance_stop: 1.2}\n", "less than or equal to 1"),
        ("models:\n  - {id: a, name: A, path: a.safetensors, latent_rgb: {factors: [[1, 0, 0]]}}\n",
         "latent_rgb.factors"),
        ("models:\n  - {id: a, name: A, path: a.safetensors, latent_rgb: {factors: [[1, 0, 0], [0, 1, 0], "
         "[0, 0, 1], [0, 0, 0]], bias: [.nan, 0, 0]}}\n", "latent_rgb.bias"),
        ("models:\n  - {id: a, name: A, demo: 'on'}\n", "demo"),
        ("- just a list\n", "must be a mapping"),
        ("models: [\n", "not valid YAML"),
    ],
)
def test_mistakes_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(text)
    with pytest.raises(RegistryError, match=message):
        load_registry(path)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="registry file not found"):
        load_registry(tmp_path / "nope.yaml")


def test_builtin_registry_is_the_demo_model() -> None:
    registry = builtin_registry()
    assert registry.model_ids == ["demo"] and registry.resolve_default_model() == "demo"
    demo = registry.model("demo")
    assert demo is not None and demo.guidance_rescale == 0.7  # zero terminal SNR: Lin et al.'s value
    assert demo.guidance_stop == 0.6  # the last 40 % of the steps unguided (docs/demo-model.md)
    with pytest.raises(RegistryError, match="not declared"):
        registry.resolve_default_model("sdxl-base")


def test_a_demo_entry_brings_the_shipped_folder_and_its_exact_latent_map(tmp_path: Path) -> None:
    """``demo: true`` is data, not a branch in the engine: the entry gets the shipped folder as its ``path``
    and its latents' exact map as its ``latent_rgb``, unless it gives its own; other models get SDXL's map."""
    from imagen.registry.demo_model import DEMO_MODEL_DIR, LATENT_SCALE
    from imagen.registry.specs import SDXL_LATENT_RGB

    path = tmp_path / "registry.yaml"
    path.write_text(
        "models:\n"
        "  - {id: shapes, name: Shapes, demo: true}\n"
        "  - {id: own, name: Own, demo: true, path: own, latent_rgb: {factors: [[1, 0, 0], [0, 1, 0], [0, 0, 1], "
        "[0, 0, 0]]}}\n"
        "  - {id: sdxl, name: SDXL, path: sdxl.safetensors}\n"
    )
    shapes, own, sdxl = load_registry(path).models
    exact = 1 / LATENT_SCALE
    assert shapes.path == DEMO_MODEL_DIR
    assert shapes.latent_rgb.factors == ((exact, 0, 0), (0, exact, 0), (0, 0, exact), (0, 0, 0))
    assert shapes.latent_rgb.bias == (0, 0, 0)
    builtin_demo = builtin_registry().model("demo")
    assert builtin_demo is not None and builtin_demo.latent_rgb == shapes.latent_rgb
    assert builtin_demo.path == DEMO_MODEL_DIR
    assert own.path == (tmp_path / "own").resolve() and own.latent_rgb.factors[0] == (1, 0, 0)
    assert sdxl.latent_rgb == SDXL_LATENT_RGB and sdxl.latent_rgb.factors[0] == (0.3651, 0.4232, 0.4341)


def test_vae_path_is_resolved_for_loading_and_kept_as_written_for_display(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(
        "models:\n"
        "  - {id: a, name: A, path: a.safetensors, vae_path: vae/fp16-fix}\n"
        f"  - {{id: b, name: B, path: b.safetensors, vae_path: {tmp_path}/abs-vae}}\n"
        "  - {id: c, name: C, path: c.safetensors}\n"
    )
    a, b, c = load_registry(path).models
    assert a.vae_path == str(tmp_path.resolve() / "vae" / "fp16-fix") and a.declared_vae_path == "vae/fp16-fix"
    assert b.vae_path == b.declared_vae_path == f"{tmp_path}/abs-vae"
    assert c.vae_path is None and c.declared_vae_path is None
