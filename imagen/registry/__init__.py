"""The registry: which models, LoRAs and IP-Adapter this server offers (specs), and the checks that their
files are safe to load (safe_files)."""

from imagen.registry.specs import IpAdapterSpec, LoraSpec, ModelSpec, Registry, builtin_registry, load_registry

__all__ = ["IpAdapterSpec", "LoraSpec", "ModelSpec", "Registry", "builtin_registry", "load_registry"]
