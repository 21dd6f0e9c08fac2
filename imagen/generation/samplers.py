"""The diffusers scheduler each A1111 sampler name (:mod:`imagen.sampler_names`) maps to.

The mapping is the one diffusers' scheduler overview documents ("A1111/k-diffusion → 🤗 Diffusers"):
the scheduler class, plus the config overrides it lists ("init with use_karras_sigmas=True", ...).
DDIM and UniPC are A1111 samplers of the same names. This module imports neither torch nor diffusers:
the API imports it to list what this installation runs (``GET /schedulers``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

from imagen.sampler_names import SAMPLER_NAMES


@dataclass(frozen=True)
class SchedulerChoice:
    """A diffusers scheduler class (by name) and the config values that make it the A1111 sampler."""

    class_name: str
    overrides: dict[str, Any] = field(default_factory=dict)


_KARRAS: dict[str, Any] = {"use_karras_sigmas": True}
_SDE: dict[str, Any] = {"algorithm_type": "sde-dpmsolver++"}

_CHOICES: dict[str, SchedulerChoice] = {
    "Euler": SchedulerChoice("EulerDiscreteScheduler"),
    "Euler a": SchedulerChoice("EulerAncestralDiscreteScheduler"),
    "DPM++ 2M": SchedulerChoice("DPMSolverMultistepScheduler"),
    "DPM++ 2M Karras": SchedulerChoice("DPMSolverMultistepScheduler", _KARRAS),
    "DPM++ 2M SDE": SchedulerChoice("DPMSolverMultistepScheduler", _SDE),
    "DPM++ 2M SDE Karras": SchedulerChoice("DPMSolverMultistepScheduler", {**_SDE, **_KARRAS}),
    "DPM++ SDE Karras": SchedulerChoice("DPMSolverSinglestepScheduler", _KARRAS),
    "DDIM": SchedulerChoice("DDIMScheduler"),
    "UniPC": SchedulerChoice("UniPCMultistepScheduler"),
    "Heun": SchedulerChoice("HeunDiscreteScheduler"),
    "LMS": SchedulerChoice("LMSDiscreteScheduler"),
    "DPM2": SchedulerChoice("KDPM2DiscreteScheduler"),
    "DPM2 a": SchedulerChoice("KDPM2AncestralDiscreteScheduler"),
    # few-step models and LoRAs (docs/sdxl-fields.md): as diffusers' pages for them run them
    "Euler SGM Uniform": SchedulerChoice("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "LCM": SchedulerChoice("LCMScheduler"),
    "TCD": SchedulerChoice("TCDScheduler"),
}
assert tuple(_CHOICES) == SAMPLER_NAMES


# diffusers' LMSDiscreteScheduler computes its coefficients with scipy, an optional dependency of diffusers
_NEEDS_SCIPY = frozenset({"LMS"})


def sampler_available(name: str) -> bool:
    """Whether this installation can run the sampler (LMS needs scipy). Imports nothing."""
    return name not in _NEEDS_SCIPY or importlib.util.find_spec("scipy") is not None


def scheduler_for(name: str) -> SchedulerChoice:
    """The diffusers scheduler for an A1111 sampler name; ``ValueError`` naming the valid ones otherwise."""
    choice = _CHOICES.get(name)
    if choice is None:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SAMPLER_NAMES)}")
    return SchedulerChoice(choice.class_name, dict(choice.overrides))


def available_samplers() -> list[str]:
    """The sampler names this installation runs, in ``SAMPLER_NAMES`` order (``GET /schedulers``)."""
    return [name for name in SAMPLER_NAMES if sampler_available(name)]
