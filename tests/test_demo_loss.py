"""The demo training's loss weights (``imagen devtools train-demo``), on SDXL's own noise schedule."""

from __future__ import annotations

import torch
from diffusers import EulerDiscreteScheduler

from imagen.devtools.train_demo import NoiseSchedule
from imagen.generation.diffusers.components import SDXL_CONFIG_DIR

SCHEDULE = NoiseSchedule(
    EulerDiscreteScheduler.from_pretrained(str(SDXL_CONFIG_DIR), subfolder="scheduler")  # type: ignore[no-untyped-call]
)
T = torch.arange(0, 1000)


def test_min_snr_counts_the_picture_error_of_the_noisiest_steps_a_thousand_times_less() -> None:
    picture_weight = SCHEDULE.min_snr_weight(T, 5.0) * SCHEDULE.snr(T)  # noise error = picture error * sqrt(SNR)
    assert torch.allclose(picture_weight, SCHEDULE.snr(T).clamp(max=5.0))
    assert picture_weight[999] < 0.006 and picture_weight[0] == 5.0


def test_layout_weight_adds_its_weight_on_the_picture_error_at_every_step() -> None:
    assert torch.equal(SCHEDULE.loss_weight(T, 5.0, 0.0), SCHEDULE.min_snr_weight(T, 5.0))  # 0: unchanged
    picture_weight = SCHEDULE.loss_weight(T, 5.0, 1.0) * SCHEDULE.snr(T)
    assert torch.allclose(picture_weight, SCHEDULE.snr(T).clamp(max=5.0) + 1.0)
    assert picture_weight[999] > 1.0
