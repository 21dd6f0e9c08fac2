"""A job's sampler, built from the loaded model's own scheduler config.

A model's scheduler config says how it was trained: its betas, its ``prediction_type`` (epsilon or v) and,
for a zero-terminal-SNR model such as the demo model, ``rescale_betas_zero_snr``. Every sampler must sample
with the same noise levels. Most diffusers schedulers read that flag; Heun, LMS, DPM2, DPM2 a and
DPM++ SDE do not, and would quietly fall back to SDXL's unrescaled betas: those get the model's noise levels
as ``trained_betas`` instead, taken from the model's own scheduler.
"""

from __future__ import annotations

import inspect
from typing import Any

import diffusers
import torch

from imagen.generation.samplers import SchedulerChoice


def betas_of(scheduler: Any) -> list[float]:
    """The betas whose cumulative product is ``scheduler.alphas_cumprod`` (for a zero-terminal-SNR schedule:
    its last value, which diffusers sets to 2**-24 rather than 0 so that sigmas stay finite)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return (1.0 - alphas_cumprod / previous).tolist()  # type: ignore[no-any-return]


def build_scheduler(default_scheduler: Any, choice: SchedulerChoice) -> Any:
    """``choice``'s scheduler from ``default_scheduler``'s config, on the same noise levels."""
    scheduler_type = getattr(diffusers, choice.class_name)
    overrides = dict(choice.overrides)
    config = default_scheduler.config
    reads_rescale = "rescale_betas_zero_snr" in inspect.signature(scheduler_type.__init__).parameters
    if config.get("rescale_betas_zero_snr", False) and not reads_rescale:
        overrides["trained_betas"] = betas_of(default_scheduler)
    return scheduler_type.from_config(config, **overrides)
