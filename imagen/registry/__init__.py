"""The registry: which models, LoRAs, ControlNets and IP-Adapter this server offers (specs), the one a fresh install
serves (builtin) and its demo model's files and latent layout (demo_model), reading the YAML file (load), and
the checks that their files are safe to load (safe_files)."""

from imagen.registry.builtin import builtin_registry
from imagen.registry.load import load_registry
from imagen.registry.specs import (
    REFERENCE_GUIDANCE,
    REFERENCE_STEPS,
    ControlNetSpec,
    EmbeddingSpec,
    GuidanceRange,
    IpAdapterSpec,
    LatentRgb,
    LoraNeeds,
    LoraSpec,
    ModelSpec,
    Registry,
    StepRange,
    UpscalerSpec,
)

__all__ = [
    "REFERENCE_GUIDANCE", "REFERENCE_STEPS", "ControlNetSpec", "EmbeddingSpec", "GuidanceRange", "IpAdapterSpec",
    "LatentRgb", "LoraNeeds", "LoraSpec", "ModelSpec", "Registry", "StepRange", "UpscalerSpec", "builtin_registry",
    "load_registry",
]
