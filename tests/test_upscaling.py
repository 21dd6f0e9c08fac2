"""Upscaler models (spandrel, tiled): loading, refusing, output sizes, seamless tiles, progress and cancel,
and importing spandrel whether torchvision imports, is broken, or is absent."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from imagen.generation import upscaling
from imagen.generation.upscaling import UpscaleCancelled, UpscalerModel, lanczos, load_upscaler, upscale
from imagen.testing.upscaler_fixtures import tiny_esrgan_state_dict, write_tiny_esrgan
from tests.conftest import REPO


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("upscalers")
    for scale in (4, 2, 1):
        write_tiny_esrgan(folder, scale=scale)
    return folder


@pytest.fixture(scope="module")
def x4(fixture_dir: Path) -> UpscalerModel:
    return load_upscaler(fixture_dir / "tiny-esrgan-x4.safetensors", "cpu", torch.float32)


@pytest.fixture(scope="module")
def x2(fixture_dir: Path) -> UpscalerModel:
    return load_upscaler(fixture_dir / "tiny-esrgan-x2.safetensors", "cpu", torch.float32)


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients and waves with some grain: content the network's neighbourhood matters for."""
    y = np.linspace(0.0, 1.0, height)[:, None]
    x = np.linspace(0.0, 1.0, width)[None, :]
    waves = np.sin(x * 12) * np.cos(y * 9) * 0.5 + 0.5
    rgb = np.stack([np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)), waves], axis=-1)
    rgb = rgb * 0.8 + np.random.default_rng(seed).random((height, width, 3)) * 0.2
    return Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


# --- the fixture and loading -----------------------------------------------------------------------------


@pytest.mark.parametrize(("scale", "multiple_of"), [(4, 1), (2, 4)])
def test_fixture_loads_through_spandrel_as_esrgan(fixture_dir: Path, scale: int, multiple_of: int) -> None:
    path = fixture_dir / f"tiny-esrgan-x{scale}.safetensors"
    assert path.stat().st_size < 600_000
    model = load_upscaler(path, "cpu", torch.float32)
    assert model.architecture == "ESRGAN"
    assert type(model.descriptor.model).__name__ == "RRDBNet"
    assert model.scale == scale
    # RealESRGAN_x2plus pixel-unshuffles its input by 2: spandrel asks for multiples of 4
    assert model.multiple_of == multiple_of
    assert model.supports_half and model.supports_bfloat16
    assert model.tiling == "supported"
    assert model.dtype == torch.float32 and model.device == torch.device("cpu")
    assert not model.descriptor.model.training
    assert not any(p.requires_grad for p in model.descriptor.model.parameters())


def test_fixture_is_deterministic_and_seeded(tmp_path: Path) -> None:
    first = write_tiny_esrgan(tmp_path / "a", seed=3).read_bytes()
    again = write_tiny_esrgan(tmp_path / "b", seed=3).read_bytes()
    other = write_tiny_esrgan(tmp_path / "c", seed=4).read_bytes()
    assert first == again
    assert first != other


def test_half_precision_is_kept_when_the_architecture_supports_it(fixture_dir: Path) -> None:
    model = load_upscaler(fixture_dir / "tiny-esrgan-x4.safetensors", "cpu", torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.descriptor.dtype == torch.bfloat16
    out = upscale(model, picture(12, 10))
    assert out.size == (48, 40)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt"])
def test_pickle_files_are_refused_by_name(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"RealESRGAN_x4plus{suffix}"
    torch.save({"params_ema": tiny_esrgan_state_dict(4)}, path)
    with pytest.raises(ValueError, match=rf"RealESRGAN_x4plus\{suffix}.*only \.safetensors"):
        load_upscaler(path, "cpu", torch.float32)


def test_a_pickle_renamed_safetensors_is_refused_unopened(tmp_path: Path) -> None:
    path = tmp_path / "renamed.safetensors"
    path.write_bytes(pickle.dumps({"conv_first.weight": [0.0]}, protocol=2))
    with pytest.raises(ValueError, match=r"renamed\.safetensors.*pickle"):
        load_upscaler(path, "cpu", torch.float32)


def test_a_model_that_is_not_super_resolution_is_refused(fixture_dir: Path) -> None:
    # The 1x variant (pixel-unshuffle by 4) is, for spandrel, an ESRGAN "Restoration" model: a denoiser.
    with pytest.raises(
        ValueError,
        match=r"tiny-esrgan-x1\.safetensors: this ESRGAN model is for image restoration.*"
        r"not a super-resolution upscaler",
    ):
        load_upscaler(fixture_dir / "tiny-esrgan-x1.safetensors", "cpu", torch.float32)


def test_an_unknown_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mystery.safetensors"
    save_file({"encoder.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(ValueError, match=r"mystery\.safetensors: not a model architecture that spandrel"):
        load_upscaler(path, "cpu", torch.float32)


def test_weights_that_do_not_fit_the_detected_architecture_are_refused(tmp_path: Path) -> None:
    state = tiny_esrgan_state_dict(4)
    state["body.0.rdb1.conv1.weight"] = state["body.0.rdb1.conv1.weight"][:4].contiguous()
    path = tmp_path / "odd.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"odd\.safetensors: its weights do not fit"):
        load_upscaler(path, "cpu", torch.float32)


# --- sizes and modes ---------------------------------------------------------------------------------------


def test_output_is_exactly_scale_times_the_input(x4: UpscalerModel, x2: UpscalerModel) -> None:
    image = picture(64, 48)
    assert upscale(x4, image).size == (256, 192)
    assert upscale(x2, image).size == (128, 96)
    # sizes that are not multiples of the x2 model's 4 (spandrel pads, the padding is cut off again)
    assert upscale(x2, picture(37, 23), tile=16, overlap=4).size == (74, 46)


def test_target_gives_exactly_the_size_asked(x4: UpscalerModel) -> None:
    image = picture(64, 48)
    out = upscale(x4, image, target=(96, 72))  # 1.5x from a 4x model
    assert out.size == (96, 72)
    assert out.mode == "RGB"
    # and it is the 4x output resized, not a plain resize of the input
    assert np.array_equal(pixels(out), pixels(lanczos(upscale(x4, image), (96, 72))))


def test_non_rgb_inputs_come_out_rgb(x4: UpscalerModel) -> None:
    rgb = picture(20, 16)
    rgba = rgb.copy()
    rgba.putalpha(128)
    for image in (rgba, rgb.convert("L"), rgb.convert("P")):
        out = upscale(x4, image)
        assert out.mode == "RGB" and out.size == (80, 64)
    assert np.array_equal(pixels(upscale(x4, rgba)), pixels(upscale(x4, rgb)))


def test_the_output_is_a_picture_of_the_input(x4: UpscalerModel) -> None:
    image = picture(40, 32)
    out = pixels(upscale(x4, image))
    nearest = pixels(image.resize((160, 128), Image.Resampling.NEAREST))
    assert np.isfinite(out).all()
    assert out.std() > 30  # not constant
    assert np.abs(out - nearest).mean() < 40  # close to the input, upscaled...
    assert np.abs(out - nearest).mean() > 1  # ...but the network did something


def test_lanczos_resizes_to_the_target_in_rgb() -> None:
    image = picture(30, 20).convert("RGBA")
    out = lanczos(image, (45, 31))
    assert out.size == (45, 31) and out.mode == "RGB"
    with pytest.raises(ValueError, match="positive"):
        lanczos(image, (0, 10))


def test_bad_tile_settings_are_refused(x4: UpscalerModel) -> None:
    with pytest.raises(ValueError, match="overlap"):
        upscale(x4, picture(8, 8), tile=16, overlap=8)
    with pytest.raises(ValueError, match="tile"):
        upscale(x4, picture(8, 8), tile=0, overlap=0)
    with pytest.raises(ValueError, match="target"):
        upscale(x4, picture(8, 8), target=(0, 5))


# --- tiles ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "tile", "overlap", "multiple"),
    [(80, 32, 8, 1), (56, 32, 8, 1), (37, 16, 4, 4), (500, 128, 32, 8), (33, 32, 8, 1), (32, 32, 8, 1)],
)
def test_tile_spans_cover_the_axis_and_overlap(size: int, tile: int, overlap: int, multiple: int) -> None:
    spans = upscaling._spans(size, tile, overlap, multiple)
    assert spans[0][0] == 0 and spans[-1][1] == size
    for start, end in spans:
        assert 0 < end - start <= tile
        assert start % multiple == 0
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end - start >= overlap


@pytest.mark.parametrize(("model_name", "max_bound"), [("x4", 12), ("x2", 32)])
def test_tiled_equals_untiled_without_seams(model_name: str, max_bound: int, request: pytest.FixtureRequest) -> None:
    model: UpscalerModel = request.getfixturevalue(model_name)
    image = picture(80, 56)
    whole = pixels(upscale(model, image, tile=512))  # one tile covers everything
    tiled = pixels(upscale(model, image, tile=32, overlap=8))  # 3 x 2 tiles
    difference = np.abs(whole - tiled)
    assert difference.mean() < 2.0, difference.mean()
    assert difference.max() <= max_bound, difference.max()
    # The blending is what makes it so: the same tiles butted together without overlap show their edges.
    butted = np.abs(whole - pixels(upscale(model, image, tile=32, overlap=0)))
    assert butted.mean() > 2 * difference.mean()
    assert butted.max() > difference.max()


def _recorder() -> tuple[list[tuple[int, int]], Callable[[int, int], None]]:
    calls: list[tuple[int, int]] = []
    return calls, lambda done, total: calls.append((done, total))


def test_on_tile_counts_every_tile(x4: UpscalerModel) -> None:
    calls, on_tile = _recorder()
    upscale(x4, picture(80, 56), tile=32, overlap=8, on_tile=on_tile)
    assert calls == [(done, 6) for done in range(1, 7)]
    calls, on_tile = _recorder()
    upscale(x4, picture(20, 20), on_tile=on_tile)
    assert calls == [(1, 1)]


def test_stop_cancels_between_tiles(x4: UpscalerModel) -> None:
    calls, on_tile = _recorder()
    with pytest.raises(UpscaleCancelled, match="after 1 of 6 tiles"):
        upscale(x4, picture(80, 56), tile=32, overlap=8, stop=lambda: len(calls) >= 1, on_tile=on_tile)
    assert calls == [(1, 6)]


# --- torchvision: absent, broken or working -------------------------------------------------------------------

_SUBPROCESS = """
import json, logging, sys
from pathlib import Path
{prelude}
logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s", stream=sys.stderr)
import torch
from PIL import Image
from imagen.generation import upscaling
from imagen.testing.upscaler_fixtures import write_tiny_esrgan

upscaling.import_spandrel()
upscaling.import_spandrel()  # logs once
model = upscaling.load_upscaler(write_tiny_esrgan(Path(sys.argv[1])), "cpu", torch.float32)
out = upscaling.upscale(model, Image.new("RGB", (24, 16), (200, 100, 50)), tile=16, overlap=4)
lama = sys.modules["spandrel.architectures.LaMa.__arch.LaMa"]
try:
    lama.rotate(torch.zeros(1, 1, 4, 4), 0.0)
    rotate = "ran"
except Exception as error:
    rotate = f"{{type(error).__name__}}: {{error}}"
try:
    import torchvision
    after = "imports"
except Exception as error:
    after = type(error).__name__
print(json.dumps({{"size": out.size, "arch": model.architecture, "rotate": rotate, "torchvision_after": after,
                  "blocked_after": "torchvision" in sys.modules and sys.modules["torchvision"] is None}}))
"""


def _run_in_subprocess(tmp_path: Path, prelude: str) -> tuple[dict[str, object], str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS.format(prelude=prelude), str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_spandrel_loads_and_upscales_without_torchvision(tmp_path: Path) -> None:
    # sys.modules[name] = None makes ``import torchvision`` raise ImportError, as if it were not installed.
    result, log = _run_in_subprocess(tmp_path, 'sys.modules["torchvision"] = None')
    assert result["size"] == [96, 64] and result["arch"] == "ESRGAN"
    assert log.count("spandrel is imported with a stand-in") == 1
    # LaMa's torchvision names are stand-ins that say why, when (never) used
    assert str(result["rotate"]).startswith("RuntimeError: torchvision is unavailable: needed only by spandrel's LaMa")
    # the stand-in is gone again: torchvision is as absent as before, for every other library
    assert result["torchvision_after"] == "ModuleNotFoundError"
    assert result["blocked_after"] is True


def test_spandrel_loads_and_upscales_with_torchvision_as_installed(tmp_path: Path) -> None:
    """Here pip's torchvision fails on import next to the CPU torch (``torchvision::nms does not exist``);
    with a matching torchvision (a CUDA box) it imports and spandrel uses it. Both must work."""
    probe = subprocess.run(
        [sys.executable, "-c", "import torchvision"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    result, log = _run_in_subprocess(tmp_path, "")
    assert result["size"] == [96, 64] and result["arch"] == "ESRGAN"
    if probe.returncode == 0:
        assert "stand-in" not in log
        assert result["torchvision_after"] == "imports"
    else:
        assert log.count("spandrel is imported with a stand-in") == 1
        assert str(result["rotate"]).startswith("RuntimeError: torchvision is unavailable")
        assert result["torchvision_after"] != "imports"  # as broken as before: the stand-in was taken out
        assert result["blocked_after"] is False
