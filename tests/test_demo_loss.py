"""The demo training's loss weights (``imagen devtools train-demo``), on SDXL's own noise schedule."""

from __future__ import annotations

import torch
from diffusers import EulerDiscreteScheduler

from imagen.devtools.train_demo import NoiseSchedule
from imagen.generation.diffusers.components import SDXL_CONFIG_DIR

SCHEDULER = EulerDiscreteScheduler.from_pretrained(str(SDXL_CONFIG_DIR), subfolder="scheduler")  # type: ignore[no-untyped-call]
SCHEDULE = NoiseSchedule(SCHEDULER)
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


def test_training_noises_with_the_schedule_the_sampler_uses_and_the_shipped_model_was_trained_on() -> None:
    assert torch.equal(SCHEDULE.alphas_cumprod, SCHEDULER.alphas_cumprod)
    # what train-demo computed itself when the shipped weights were trained: the same numbers, bit for bit
    config = SCHEDULER.config
    betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps) ** 2
    assert torch.equal(SCHEDULE.alphas_cumprod, torch.cumprod(1.0 - betas, dim=0))
    # a zero-terminal-SNR config (v-prediction models) is followed too: nothing of the picture at the last step
    zero_snr = EulerDiscreteScheduler.from_config(config, rescale_betas_zero_snr=True)  # type: ignore[no-untyped-call]
    assert NoiseSchedule(zero_snr).alphas_cumprod[-1] < 1e-6 < SCHEDULE.alphas_cumprod[-1]
