"""``python -m training.train_controlnet``: the demo model's silhouette ControlNet, its hand-set embedding and
its training (a few steps, twice: the same file), and the shipped one's record."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from imagen.registry.builtin import DEMO_CONTROLNET_DIR, TRAINING_RECORD
from imagen.registry.demo_model import DEMO_DIR, DEMO_MODEL_DIR
from training import shapes
from training.train_demo import TrainingSettings

pytestmark = pytest.mark.engine

TINY = dataclasses.replace(TrainingSettings(), controlnet_steps=3, controlnet_batch=4, controlnet_warmup_steps=2,
                           controlnet_scenes=40, controlnet_two_shapes=0.5)


def test_the_hand_set_embedding_reads_each_cells_coverage_of_the_silhouette() -> None:
    """The whole conditioning embedding on a 1024 px silhouette gives what training computes from the 32 x 32
    cell coverage alone (:class:`CellEmbedding`), whatever its trained last convolution holds."""
    import torch
    from diffusers import UNet2DConditionModel

    from training.train_controlnet import GREY, CellEmbedding, build_controlnet, silhouette

    unet = UNet2DConditionModel.from_pretrained(  # type: ignore[no-untyped-call]
        str(DEMO_MODEL_DIR / "unet"), dtype=torch.float32
    )
    embedding = build_controlnet(unet, seed=0).controlnet_cond_embedding
    torch.manual_seed(0)
    torch.nn.init.normal_(embedding.conv_out.weight)
    scene = shapes.Scene("star", "red", "white", "on the left", "large")
    picture = silhouette(scene, 1024, np.random.default_rng(3))
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        full = embedding(pixels)
        grey = (pixels * torch.tensor(GREY).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        cells = CellEmbedding(embedding.conv_out)(torch.nn.functional.avg_pool2d(grey, 32))
    assert full.shape == (1, 32, 32, 32)  # the UNet's first width, at the latent's size
    assert torch.allclose(full, cells, atol=1e-5)


def test_the_coverage_of_a_picture_is_its_silhouette() -> None:
    from training.train_controlnet import cell_coverage, silhouette
    from training.train_demo import cell_means

    scene = shapes.Scene("triangle", "purple", "beige", "at the top", "small")
    picture = shapes.render(scene, 256, np.random.default_rng(5))
    grey = np.asarray(silhouette(scene, 256, np.random.default_rng(5)).convert("L"), dtype=np.float32) / 255
    cover = cell_coverage(cell_means(picture), scene)
    assert np.abs(cover - grey.reshape(32, 8, 32, 8).mean(axis=(1, 3))).max() < 0.01


@pytest.mark.timeout(600)
def test_training_is_deterministic_and_the_pipeline_draws_with_it(tmp_path: Path) -> None:
    import torch
    from diffusers import StableDiffusionXLControlNetPipeline

    from training.train_controlnet import WEIGHTS_FILE, load_controlnet, silhouette, train_controlnet, update_record
    from training.train_demo import load_trained_pipeline

    lines: list[str] = []
    threads = torch.get_num_threads()
    first = train_controlnet(DEMO_MODEL_DIR, tmp_path / "one", TINY, report=lines.append)
    second = train_controlnet(DEMO_MODEL_DIR, tmp_path / "two", TINY, report=lambda line: None)
    assert first["sha256"] == second["sha256"]
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["config.json", WEIGHTS_FILE]
    assert (tmp_path / "one" / WEIGHTS_FILE).stat().st_size < 3 * 1024 * 1024
    assert any("ControlNet: 3/3" in line for line in lines)
    assert torch.get_num_threads() == threads  # one while it trained (controlnet_threads), put back after

    pipe = StableDiffusionXLControlNetPipeline.from_pipe(
        load_trained_pipeline(DEMO_MODEL_DIR), controlnet=load_controlnet(tmp_path / "one")
    )
    control = silhouette(shapes.Scene("circle", "red", "white", "on the left", "large"), 256)
    for size in (256, 320):  # any multiple of 32: the embedding brings the control image to the latent's size
        image = pipe("a red shape on a white background", image=control, num_inference_steps=2, height=size,
                     width=size).images[0]
        assert image.size == (size, size)

    record = tmp_path / TRAINING_RECORD
    (tmp_path / "controlnet").mkdir()
    (tmp_path / "controlnet" / WEIGHTS_FILE).write_bytes((tmp_path / "one" / WEIGHTS_FILE).read_bytes())
    record.write_text(json.dumps({"settings": dataclasses.asdict(TrainingSettings()), "weights": {}}))
    written = update_record(record, TINY)
    assert written["weights"] == {f"controlnet/{WEIGHTS_FILE}": first["sha256"]}
    assert written["settings"] == dataclasses.asdict(TINY)


def test_the_shipped_controlnet_is_the_one_the_training_command_recorded() -> None:
    from training.train_controlnet import WEIGHTS_FILE
    from training.train_demo import weight_hashes

    record = json.loads((DEMO_DIR / TRAINING_RECORD).read_text())
    hashes = weight_hashes(DEMO_DIR, (DEMO_CONTROLNET_DIR.name,))
    assert list(hashes) == [f"controlnet/{WEIGHTS_FILE}"]
    assert record["weights"][f"controlnet/{WEIGHTS_FILE}"] == hashes[f"controlnet/{WEIGHTS_FILE}"]
    assert record["settings"] == dataclasses.asdict(TrainingSettings())
    assert (DEMO_CONTROLNET_DIR / WEIGHTS_FILE).stat().st_size < 3 * 1024 * 1024
