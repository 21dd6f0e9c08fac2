"""Tiny test models in the formats users have (``imagen fixtures``): random-weight SDXL folders, single-file
checkpoints and LoRAs, for tests and for trying the service without real weights; never used to serve."""
