"""The demo model's files and how its latents are laid out: what its registry entry, its training and its
exact previews read.

The demo model (the built-in registry's, :mod:`imagen.registry.builtin`) speaks the language of
:mod:`training.shapes`: "a small red star on the left on a navy background". Its VAE is set by hand,
not learned (:mod:`training.demo_architecture`): a latent is the exact 32 x 32 average of the image's
RGB plus its luminance, times :data:`LATENT_SCALE`. So a latent is its own preview: :data:`DEMO_LATENT_RGB`
maps it back to RGB with no approximation, and a registry entry with ``demo: true`` carries that map as its
``latent_rgb`` (:class:`imagen.registry.specs.ModelSpec`). No torch here.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR: Path = Path(__file__).resolve().parents[1] / "data" / "demo"
"""Where ``make demo-model`` writes the shipped files (the model, its LoRA, its IP-Adapter, training.json)."""
DEMO_MODEL_DIR: Path = DEMO_DIR / "model"
"""The model itself: a diffusers folder, fp16, without tokenizers (it uses the shared CLIP vocabulary)."""

LATENT_DOWNSCALE = 32
"""Image pixels per latent cell, on each side (a 1024 px image has 32 x 32 latents)."""

LUMA = (0.299, 0.587, 0.114)
"""The fourth latent channel: Rec. 601 luminance of the cell's mean colour."""

LATENT_SCALE = 1.6
"""The VAE's ``scaling_factor``: the mean colour in [-1, 1] times this is what the UNet denoises (~unit std)."""

#                 R                  G                  B
DEMO_LATENT_RGB = (
    (1 / LATENT_SCALE, 0.0, 0.0),
    (0.0, 1 / LATENT_SCALE, 0.0),
    (0.0, 0.0, 1 / LATENT_SCALE),
    (0.0, 0.0, 0.0),
)
"""Scaled demo latents (as the step callback gets them) to RGB in [-1, 1]: exact, as the VAE is linear."""
DEMO_LATENT_RGB_BIAS = (0.0, 0.0, 0.0)
