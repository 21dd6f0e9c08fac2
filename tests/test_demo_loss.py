"""The demo training's loss weights (``imagen devtools train-demo``), on SDXL's own noise schedule."""

from __future__ import annotations

import torch
from diffusers import EulerDiscreteScheduler

from imagen.devtools.demo_architecture import demo_scheduler
from imagen.devtools.train_demo import NoiseSchedule
from imagen.generation.diffusers.components import sdxl_scheduler

SCHEDULER = sdxl_scheduler()
SCHEDULE = NoiseSchedule(SCHEDULER)
T = torch.arange(0, 1000)


def test_min_snr_counts_the_picture_error_of_the_noisiest_steps_a_thousand_times_less() -> None:
    picture_weight = SCHEDULE.loss_weight(T, 5.0, 0.0) * SCHEDULE.snr(T)  # noise error = picture error * sqrt(SNR)
    assert torch.allclose(picture_weight, SCHEDULE.snr(T).clamp(max=5.0))
    assert picture_weight[999] < 0.006 and picture_weight[0] == 5.0


def test_layout_weight_adds_its_weight_on_the_picture_error_at_every_step() -> None:
    snr = SCHEDULE.snr(T)
    assert torch.equal(SCHEDULE.loss_weight(T, 5.0, 0.0), snr.clamp(max=5.0) / snr)  # 0: plain min-SNR
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


# ---------------------------------------------------------------- the demo model's zero-terminal-SNR schedule

ZERO_SNR_SCHEDULER = demo_scheduler(zero_terminal_snr=True)
ZERO_SNR = NoiseSchedule(ZERO_SNR_SCHEDULER)


def test_the_demo_schedule_keeps_nothing_of_the_picture_at_its_noisiest_step_and_predicts_v() -> None:
    config = ZERO_SNR_SCHEDULER.config
    assert (config.prediction_type, config.timestep_spacing, config.rescale_betas_zero_snr) == (
        "v_prediction", "trailing", True,
    )
    assert ZERO_SNR.alphas_cumprod[-1].sqrt() < 1e-3 < 0.06 < SCHEDULE.alphas_cumprod[-1].sqrt()
    ZERO_SNR_SCHEDULER.set_timesteps(30)
    assert int(ZERO_SNR_SCHEDULER.timesteps[0]) == 999  # sampling starts where training had no picture


def test_the_v_target_is_diffusers_own_and_gives_back_the_picture() -> None:
    from diffusers import DDPMScheduler

    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(8, 4, 4, 4, generator=generator), torch.randn(8, 4, 4, 4, generator=generator)
    t = torch.tensor([0, 100, 300, 500, 700, 900, 990, 999])
    v = ZERO_SNR.target(x0, noise, t)
    ddpm = DDPMScheduler.from_config(ZERO_SNR_SCHEDULER.config)  # type: ignore[no-untyped-call]
    expected = ddpm.get_velocity(x0, noise, t)
    assert torch.allclose(v[:-1], expected[:-1], atol=1e-6)
    # the last step: DDPM's alpha_bar is exactly 0 there, Euler's (whose noise levels we train on) 2**-24
    assert torch.allclose(v[-1], expected[-1], atol=2**-12 * 4)
    a = ZERO_SNR.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = ZERO_SNR.add_noise(x0, noise, t)
    assert torch.allclose(a.sqrt() * noisy - (1 - a).sqrt() * v, x0, atol=1e-5)
    assert torch.allclose(v[-1], -x0[-1], atol=1e-3)  # at the last step: minus the picture, from the caption alone
    assert torch.equal(SCHEDULE.target(x0, noise, t), noise)  # an epsilon model's target is the noise


def test_v_loss_weights_the_picture_error_at_least_as_much_at_the_noisiest_steps() -> None:
    weight = ZERO_SNR.loss_weight(T, 5.0, 1.0)
    picture_weight = weight * (ZERO_SNR.snr(T) + 1)  # a v error is a picture error times sqrt(SNR + 1)
    assert torch.allclose(picture_weight, ZERO_SNR.snr(T).clamp(max=5.0) + 1.0)
    noisy = ZERO_SNR.snr(T) <= 5.0
    assert torch.allclose(weight[noisy], torch.ones_like(weight[noisy]))  # plain v loss up to SNR 5
    assert weight[0] < 1.0 and picture_weight[999] >= 1.0
