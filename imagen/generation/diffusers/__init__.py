"""The real SDXL engine on diffusers. Imported in worker processes only.

engine (one job, start to end) · loading (files → pipeline on its device) · components (shipped configs,
tokenizers, tiny models) · acceleration (SDPA, channels_last, fused QKV, compile) · host_memory (a CPU
engine keeps freed memory for its next job) · loras (one switcher, two implementations) · ip_adapter ·
prompts (Compel, trigger words).
"""
