"""``python -m training.train_demo``: a few steps of every phase, twice, give the same files (slow: ~1 min)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.train_demo import TrainingSettings, train_demo

pytestmark = pytest.mark.engine

TINY = TrainingSettings(scenes=64, steps=3, batch=4, warmup_steps=2, lora_steps=2, ip_steps=3, ip_batch=4,
                        checkpoint_every=2, contact_prompts=2, threads=1, controlnet_steps=2, controlnet_batch=4,
                        controlnet_warmup_steps=2, controlnet_scenes=40)


@pytest.mark.timeout(900)  # 2 tiny runs of every phase: 2.5 min on a fast 2-core CPU, 4.7 on a slower one
def test_training_is_deterministic_and_writes_a_loadable_model(tmp_path: Path) -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline

    lines: list[str] = []
    first = train_demo(tmp_path / "one", TINY, report=lines.append)
    second = train_demo(tmp_path / "two", TINY, report=lambda line: None)
    assert first["weights"] == second["weights"] and first["lora"] == second["lora"]
    assert len(first["weights"]) == 8  # the model's four, the LoRA, the IP-Adapter, its image encoder, the ControlNet
    assert json.loads((tmp_path / "one" / "training.json").read_text())["weights"] == first["weights"]
    assert any("base model: 3/3" in line and "ETA" in line for line in lines)
    assert (tmp_path / "one" / "checkpoint" / "model_index.json").is_file()  # the averaged weights at step 2
    assert (tmp_path / "one" / "contact-sheet.png").is_file()
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "one" / "model"), dtype=torch.float32)
    pipe.load_lora_weights(str(tmp_path / "one" / "loras" / "blue.safetensors"))
    image = pipe("a red circle", num_inference_steps=2, height=256, width=256).images[0]
    assert image.size == (256, 256)
