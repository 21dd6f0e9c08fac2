"""PNG writing and the file names the reference defines."""

from __future__ import annotations

import io
import json
import re
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagen.outputs.names import make_output_name
from imagen.outputs.png import a1111_parameters, encode_png, save_png
from imagen.outputs.serving import resolve_servable


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (64, 64), (700, 1100)])
def test_encoded_png_decodes_to_the_same_pixels(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(size))
    pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    data = encode_png(pixels, {"parameters": "a cat, (fluffy)1.2\nSteps: 30", "imagen": '{"prompt": "été"}'})
    image = Image.open(io.BytesIO(data))
    image.load()
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (size[1], size[0]))
    assert np.array_equal(np.asarray(image), pixels)
    assert image.text == {"parameters": "a cat, (fluffy)1.2\nSteps: 30", "imagen": '{"prompt": "été"}'}


def test_save_png_writes_atomically_with_metadata(tmp_path: Path) -> None:
    metadata = {
        "prompt": "a dragon",
        "negative_prompt": "blurry",
        "model": "sdxl-base",
        "steps": 30,
        "guidance_scale": 7.5,
        "seed": 42,
        "ip_strength": 0.0,
        "loras": [{"name": "anime-style", "weight": 0.75}],
        "width": 8,
        "height": 8,
        "final_prompt": "anime style, detailed, a dragon",
    }
    path = save_png(Image.new("RGB", (8, 8), "red"), metadata, tmp_path, "sdxl_base_x.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sdxl_base_x.png"]  # no temporary left behind
    image = Image.open(path)
    assert json.loads(image.text["imagen"]) == metadata
    assert image.text["parameters"] == a1111_parameters(metadata)
    assert image.text["parameters"].splitlines() == [
        "anime style, detailed, a dragon",
        "Negative prompt: blurry",
        "Steps: 30, Sampler: Euler, CFG scale: 7.5, Seed: 42, Size: 8x8, Model: sdxl-base, "
        'Lora weights: "anime-style: 0.75", Version: imagen',
    ]


def test_output_names_follow_the_reference() -> None:
    name = make_output_name("sdxl_base", datetime(2026, 1, 30, 12, 34, 56))
    assert re.fullmatch(r"sdxl_base_20260130_123456_[0-9a-f]{8}\.png", name)
    assert name != make_output_name("sdxl_base", datetime(2026, 1, 30, 12, 34, 56))


def test_resolve_servable_refuses_names_that_leave_the_folder(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(b"png")
    assert resolve_servable(tmp_path, "ok.png") == (tmp_path / "ok.png").resolve()
    for bad in ("../ok.png", "/etc/passwd", "a/../ok.png", "ok.png/", "..", ".hidden.png", "ok.txt", "ok.png\x00"):
        assert resolve_servable(tmp_path, bad) is None, bad
