"""The registry: which models, LoRAs, ControlNets and IP-Adapter this server offers (specs), the one a fresh install
serves (builtin) and its demo model's files and latent layout (demo_model), reading the YAML file (load), and
the checks that their files are safe to load (safe_files)."""

from imagen.registry.builtin import builtin_registry
from imagen.registry.load import load_registry
from imagen.registry.specs import ControlNetSpec, IpAdapterSpec, LatentRgb, LoraSpec, ModelSpec, Registry

__all__ = [
    "ControlNetSpec", "IpAdapterSpec", "LatentRgb", "LoraSpec", "ModelSpec", "Registry", "builtin_registry",
    "load_registry",
]
