"""The registry a fresh install serves: the demo model shipped in the package, its LoRA, its IP-Adapter and its
ControlNet.

A tiny SDXL-architecture model trained on shapes ("a small red star on the left on a navy background").
Its files ship in ``imagen/data/demo/`` as ``make demo-model`` (``training/``) writes them: ``model/`` (a
diffusers folder, fp16, without tokenizers: both use the shared CLIP vocabulary), ``loras/blue.safetensors``
(a kohya LoRA trained with it: every shape blue), ``ip-adapter/`` (an IP-Adapter with its own tiny CLIP image
encoder, and a default reference picture), ``controlnet/`` (a ControlNet guided by the shape's silhouette) and
``training.json`` (the settings and each file's SHA-256). They
are ours, small (< 8 MB) and reproducible by that command. Where they are and how its latents are laid out:
:mod:`imagen.registry.demo_model`.
"""

from __future__ import annotations

from pathlib import Path

from imagen.registry.demo_model import DEMO_DIR
from imagen.registry.specs import (
    DEMO_BASE,
    ControlNetSpec,
    EmbeddingSpec,
    IpAdapterSpec,
    LoraSpec,
    ModelSpec,
    Registry,
)

TRAINING_RECORD = "training.json"
DEMO_MODEL_ID = "demo"
DEMO_LORA_ID = "demo-blue"
DEMO_LORA_TRIGGER = "bluify"
DEMO_LORA_PATH: Path = DEMO_DIR / "loras" / "blue.safetensors"
DEMO_IP_ADAPTER_DIR: Path = DEMO_DIR / "ip-adapter"
DEMO_IP_ADAPTER_PATH: Path = DEMO_IP_ADAPTER_DIR / "ip-adapter.safetensors"
DEMO_IP_ENCODER_DIR: Path = DEMO_IP_ADAPTER_DIR / "image_encoder"
DEMO_IP_REFERENCE: Path = DEMO_IP_ADAPTER_DIR / "reference.png"
DEMO_CONTROLNET_ID = "demo-silhouette"
DEMO_CONTROLNET_DIR: Path = DEMO_DIR / "controlnet"
DEMO_EMBEDDING_WORD = "chartreuse"  # a yellow-green between the palette's yellow and green
DEMO_EMBEDDING_PATH: Path = DEMO_DIR / "embeddings" / "chartreuse.safetensors"
DEMO_GUIDANCE_RESCALE = 0.7
DEMO_GUIDANCE_STOP = 0.6


def builtin_registry() -> Registry:
    """What a fresh install serves: the demo model shipped in the package, its LoRA, IP-Adapter and ControlNet."""
    return Registry(
        models=[
            ModelSpec(
                id=DEMO_MODEL_ID,
                name="Demo SDXL (shapes)",
                description="A tiny SDXL-architecture model trained on one language: one shape (circle, square, "
                "triangle, star) in one of 8 colours, small or large, on the left, right, top, bottom or in the "
                "center, on a white, gray, navy, beige, sky blue or dark green background. Try \"a red circle on "
                "a white background\". Configure real weights in the registry.",
                default_negative="",
                prefix="demo",
                demo=True,  # its shipped folder and its exact latent-to-RGB map (ModelSpec.latent_rgb) with it
                # zero terminal SNR and v-prediction: plain guidance at 7.5 over-saturates it (purple drawn
                # black); with 0.7, as Lin et al. recommend, the judge reads more colours, places and sizes right
                guidance_rescale=DEMO_GUIDANCE_RESCALE,
                # guidance on the last 40 % of the steps only carved outlines and over-saturated colours:
                # without it the judge reads shape colours and sizes right far more often (docs/demo-model.md)
                guidance_stop=DEMO_GUIDANCE_STOP,
            )
        ],
        loras=[
            LoraSpec(
                id=DEMO_LORA_ID,
                name="Blue shapes (demo LoRA)",
                description="Trained with the demo model by the same command: at weight 1 every shape comes out "
                "blue, whatever colour the prompt asks; at 0 the prompt's colour.",
                path=DEMO_LORA_PATH,
                default_weight=1.0,
                trigger_words=[DEMO_LORA_TRIGGER],
            )
        ],
        controlnets=[
            ControlNetSpec(
                id=DEMO_CONTROLNET_ID,
                name="Silhouette (demo ControlNet)",
                description="Trained with the demo model by the same command: the control image is a shape's "
                "silhouette (white on black); the picture draws that shape there, at that size, in the colour "
                "and on the background the prompt names.",
                path=DEMO_CONTROLNET_DIR,
                base=DEMO_BASE,
            )
        ],
        embeddings=[
            EmbeddingSpec(
                name=DEMO_EMBEDDING_WORD,
                description="Textual inversion trained on the demo model: a yellow-green no palette word says "
                "(between yellow and green), on white, beige and sky blue backgrounds.",
                path=DEMO_EMBEDDING_PATH,
                base=DEMO_BASE,
            )
        ],
        ip_adapter=IpAdapterSpec(
            path=DEMO_IP_ADAPTER_PATH, image_encoder_path=DEMO_IP_ENCODER_DIR, reference_image=DEMO_IP_REFERENCE
        ),
    )
