"""The AUTOMATIC1111 sampler names: what a request's ``scheduler``, a registry entry's and a PNG's ``Sampler``
field may say.

Only names here, so that the registry, the outputs and the API can all read them; which diffusers scheduler
runs each one is the engines' business (:mod:`imagen.generation.samplers`).
"""

from __future__ import annotations

# In the order GET /schedulers lists them.
SAMPLER_NAMES: tuple[str, ...] = (
    "Euler",
    "Euler a",
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Karras",
    "DPM++ SDE Karras",
    "DDIM",
    "UniPC",
    "Heun",
    "LMS",
    "DPM2",
    "DPM2 a",
    "Euler SGM Uniform",
    "LCM",
    "TCD",
)

KARRAS_SUFFIX = " Karras"
# A1111's "SGM Uniform" schedule type: timesteps spaced from the last one down ("trailing"), as few-step models
# (SDXL-Lightning, Turbo, Hyper-SD) are sampled
SGM_UNIFORM_SUFFIX = " SGM Uniform"
SCHEDULE_SUFFIXES = {KARRAS_SUFFIX: "Karras", SGM_UNIFORM_SUFFIX: "SGM Uniform"}

_NAMES = frozenset(SAMPLER_NAMES)


def is_sampler_name(name: str) -> bool:
    return name in _NAMES


def a1111_sampler_fields(name: str) -> tuple[str, str | None]:
    """(Sampler, Schedule type) as A1111 ≥ 1.9 writes them: "DPM++ 2M Karras" → ("DPM++ 2M", "Karras"),
    "Euler SGM Uniform" → ("Euler", "SGM Uniform")."""
    for suffix, schedule in SCHEDULE_SUFFIXES.items():
        if name.endswith(suffix):
            return name.removesuffix(suffix), schedule
    return name, None
