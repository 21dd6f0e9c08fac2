"""The real SDXL engine on diffusers: loading, LoRAs, acceleration, prompts. Imported in worker processes only."""
