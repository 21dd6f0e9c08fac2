"""The demo model a fresh install serves: a tiny SDXL-architecture pipeline trained on shapes.

Its weights ship in the package, in ``imagen/data/demo/`` as ``imagen devtools train-demo OUT``
(:mod:`imagen.devtools.train_demo`) writes them: ``model/`` (a diffusers folder, fp16, without tokenizers:
both use the shared CLIP vocabulary), ``loras/blue.safetensors`` (a kohya LoRA trained with it: every shape
blue), ``ip-adapter/`` (an IP-Adapter with its own tiny CLIP image encoder, and a default reference picture)
and ``training.json`` (the settings and each file's SHA-256). They are ours, small (< 8 MB) and
reproducible by that command. No torch here: the registry reads these paths.

The model speaks the language of :mod:`imagen.devtools.shapes`: "a small red star on the left on a navy
background". Its VAE is set by hand, not learned (:mod:`imagen.devtools.demo_architecture`): a latent is
the exact 32 x 32 average of the image's RGB plus its luminance, times :data:`LATENT_SCALE`. So a latent is
its own preview: :data:`DEMO_LATENT_RGB` maps it back to RGB with no approximation.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR: Path = Path(__file__).resolve().parents[2] / "data" / "demo"
DEMO_MODEL_DIR: Path = DEMO_DIR / "model"
TRAINING_RECORD = "training.json"
DEMO_LORA_ID = "demo-blue"
DEMO_LORA_TRIGGER = "bluify"
DEMO_LORA_PATH: Path = DEMO_DIR / "loras" / "blue.safetensors"
DEMO_IP_ADAPTER_DIR: Path = DEMO_DIR / "ip-adapter"
DEMO_IP_ADAPTER_PATH: Path = DEMO_IP_ADAPTER_DIR / "ip-adapter.safetensors"
DEMO_IP_ENCODER_DIR: Path = DEMO_IP_ADAPTER_DIR / "image_encoder"
DEMO_IP_REFERENCE: Path = DEMO_IP_ADAPTER_DIR / "reference.png"

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
