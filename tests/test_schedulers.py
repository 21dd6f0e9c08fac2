"""A job's sampler samples on the model's own noise levels (``imagen.generation.diffusers.schedulers``), also for
a zero-terminal-SNR model whose sampler cannot read ``rescale_betas_zero_snr``."""

from __future__ import annotations

import diffusers
import pytest
import torch

from imagen.generation.diffusers.schedulers import betas_of, build_scheduler
from imagen.generation.samplers import scheduler_for
from imagen.sampler_names import SAMPLER_NAMES
from training.demo_architecture import demo_scheduler

SDXL = demo_scheduler(zero_terminal_snr=False)
ZERO_SNR = demo_scheduler(zero_terminal_snr=True)


def test_betas_of_a_scheduler_give_back_its_noise_levels() -> None:
    for scheduler in (SDXL, ZERO_SNR):
        betas = torch.tensor(betas_of(scheduler), dtype=torch.float64)
        assert torch.allclose(torch.cumprod(1 - betas, 0), scheduler.alphas_cumprod.to(torch.float64), rtol=1e-5)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_of_a_zero_terminal_snr_model_keeps_its_noise_levels(name: str) -> None:
    choice = scheduler_for(name)
    sampler = build_scheduler(ZERO_SNR, choice)
    assert type(sampler).__name__ == choice.class_name
    assert sampler.config.prediction_type == "v_prediction"
    assert torch.allclose(sampler.alphas_cumprod[:-1], ZERO_SNR.alphas_cumprod[:-1], rtol=1e-4)
    # the last: 2**-24 (0 for DDIM and UniPC, which need no finite sigma); what a plain from_config would
    # lose for five of them
    assert sampler.alphas_cumprod[-1] < 1e-6


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_for_an_sdxl_model_a_sampler_is_plain_from_config(name: str) -> None:
    choice = scheduler_for(name)
    sampler = build_scheduler(SDXL, choice)
    plain = getattr(diffusers, choice.class_name).from_config(SDXL.config, **choice.overrides)
    assert dict(sampler.config) == dict(plain.config) and sampler.config.trained_betas is None
    assert torch.equal(sampler.alphas_cumprod, SDXL.alphas_cumprod)


def test_without_the_rescale_five_samplers_would_sample_a_zero_snr_model_on_sdxl_noise_levels() -> None:
    """Why build_scheduler passes trained_betas: these classes ignore ``rescale_betas_zero_snr``."""
    ignored = []
    for name in SAMPLER_NAMES:
        choice = scheduler_for(name)
        plain = getattr(diffusers, choice.class_name).from_config(ZERO_SNR.config, **choice.overrides)
        if plain.alphas_cumprod[-1] > 1e-3:
            ignored.append(name)
    assert ignored == ["DPM++ SDE Karras", "Heun", "LMS", "DPM2", "DPM2 a"]
