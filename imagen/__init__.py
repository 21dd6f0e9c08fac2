"""Imagen: a self-hosted Stable Diffusion XL service (REST API + durable job queue)."""

__version__ = "0.1.0"
