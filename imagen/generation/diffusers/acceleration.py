"""Speed options for a loaded SDXL pipeline: the engine applies them at load, the benchmarks time them.

A pipeline goes through :func:`prepare` (on CPU, right after loading) and :func:`finish_on_device` (once it
sits on its device); before each job :func:`sync_unet_attention` picks fused or plain attention.

* **SDPA**: every UNet/VAE attention layer uses PyTorch's ``scaled_dot_product_attention``
  (``AttnProcessor2_0``, diffusers' default with torch 2); anything else found is replaced.
* **channels_last**: UNet and VAE weights in NHWC layout (faster convolutions on tensor cores); not for a
  VAE as narrow as the demo model's (:data:`NHWC_MIN_VAE_CHANNELS`), whose decode it slows down.
* **fused QKV**: one ``to_qkv`` (self-attention) / ``to_kv`` (cross-attention) matmul instead of three/two.
  LoRA layers sit on ``to_q``/``to_k``/``to_v``, which the fused processor bypasses, so the UNet runs the
  fused processors only for jobs with no LoRA active and no IP-Adapter attached
  (:func:`sync_unet_attention`, called before every job); otherwise the plain SDPA processors, which go
  through the LoRA layers. The base weights never change (LoRAs are never merged), so both paths compute
  the same thing. The VAE (never touched by LoRAs) stays fused.
* **torch.compile** of the UNet and of the VAE decoder, with inductor's on-disk caches under
  ``<data_dir>/compile-cache`` (a restart reuses compiled kernels and autotuning results) and, when torch has
  it, the portable "mega-cache" (``torch.compiler.save_cache_artifacts``) saved after the warm-up.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.models.attention_processor import (  # untyped
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
)

from imagen.config import Settings

log = logging.getLogger(__name__)

MEGA_CACHE_FILE = "mega-cache.bin"
# NHWC convolutions pay off on wide layers only. Measured on CPU, bf16, 2 threads: SDXL's VAE (128-512
# channels) decodes 15 % faster in channels_last (512²), the demo model's (8-16 channels) 19 % slower (1024²).
NHWC_MIN_VAE_CHANNELS = 64


@dataclass(frozen=True)
class AccelerationOptions:
    sdpa: bool = True
    channels_last: bool = True
    fuse_qkv: bool = True
    compile: bool = False
    compile_vae: bool = True
    compile_mode: str = "max-autotune-no-cudagraphs"
    cache_dir: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings, device: torch.device) -> AccelerationOptions:
        compile_on = settings.compile == "on" or (settings.compile == "auto" and device.type == "cuda")
        if compile_on and device.type == "cuda" and settings.cpu_offload != "none":
            log.warning(
                "torch.compile skipped with IMAGEN_CPU_OFFLOAD=%s (offload hooks)", settings.cpu_offload
            )
            compile_on = False
        return cls(
            sdpa=settings.sdpa,
            channels_last=settings.channels_last,
            # With CPU offload the modules move between devices, which would unshare the fused weights.
            fuse_qkv=settings.fuse_qkv and (device.type != "cuda" or settings.cpu_offload == "none"),
            compile=compile_on,
            compile_vae=settings.compile_vae,
            compile_mode=settings.compile_mode,
            cache_dir=settings.compile_cache_dir or settings.data_dir / "compile-cache",
        )

    def summary(self) -> str:
        parts = []
        if self.sdpa:
            parts.append("SDPA")
        if self.channels_last:
            parts.append("channels_last")
        if self.fuse_qkv:
            parts.append("fused QKV")
        if self.compile:
            parts.append(f"compile[{self.compile_mode}]" + ("" if self.compile_vae else " UNet only"))
        return " + ".join(parts)


@dataclass
class AccelerationState:
    """What was applied to one pipeline; the processor instances are reused so that switching between
    fused and plain attention does not look like new code to torch.compile (no recompile after the first)."""

    options: AccelerationOptions
    plain_processor: Any = field(default_factory=AttnProcessor2_0)
    fused_processor: Any = field(default_factory=lambda: FusedAttnProcessor2_0())  # type: ignore[no-untyped-call]
    unet_fusable: bool = False


# --- attention ----------------------------------------------------------------------------------------
def _attention_modules(model: Any) -> list[Any]:
    return [module for module in model.modules() if isinstance(module, Attention)]


def ensure_sdpa(pipe: Any, enabled: bool = True) -> None:
    """UNet and VAE attention on SDPA (or, ``enabled=False``, diffusers' classic ``AttnProcessor``); a VAE
    another model already prepared (shared) is left as it is."""
    for model in (pipe.unet, pipe.vae):
        if model is pipe.vae and _prepared(model):
            continue
        wanted = AttnProcessor2_0 if enabled else AttnProcessor
        processors = model.attn_processors
        if any(type(proc) is not wanted for proc in processors.values()):
            model.set_attn_processor(wanted())


def _fuse_projections(model: Any) -> None:
    for module in _attention_modules(model):
        if not getattr(module, "fused_projections", False):
            module.fuse_projections(fuse=True)


def share_fused_weights(model: Any) -> int:
    """Make ``to_q``/``to_k``/``to_v`` weights views into the fused ``to_qkv``/``to_kv`` weight (same values),
    so fusing costs no memory (SDXL's UNet: 648 M parameters, 1.2 GiB in fp16, would exist twice). Call it
    once the model sits on its device: moving it later would copy each view on its own."""
    shared = 0
    for module in _attention_modules(model):
        fused = getattr(module, "to_qkv", None)
        parts = [module.to_q, module.to_k, module.to_v]
        if fused is None:
            fused = getattr(module, "to_kv", None)
            parts = [module.to_k, module.to_v]
        if fused is None:
            continue
        start = 0
        for part in parts:
            rows = part.weight.shape[0]
            part.weight.data = fused.weight.data[start : start + rows]
            if part.bias is not None and fused.bias is not None:
                part.bias.data = fused.bias.data[start : start + rows]
            start += rows
            shared += rows * part.weight.shape[1]
    return shared


def unet_is_fused(unet: Any) -> bool:
    processors = list(unet.attn_processors.values())
    return bool(processors) and all(isinstance(proc, FusedAttnProcessor2_0) for proc in processors)


def sync_unet_attention(pipe: Any, state: AccelerationState, lora_active: bool, ip_adapter: bool) -> None:
    """Before a job: fused processors iff allowed, no LoRA active and no IP-Adapter attached (those
    work through ``to_q``/``to_k``/``to_v``); the IP-Adapter's own processors are left alone."""
    if ip_adapter or not state.unet_fusable:
        return
    want_fused = not lora_active
    fused = unet_is_fused(pipe.unet)
    if want_fused and not fused:
        pipe.unet.set_attn_processor(state.fused_processor)
    elif not want_fused and (fused or not _all_are(pipe.unet, state.plain_processor)):
        pipe.unet.set_attn_processor(state.plain_processor)


def _all_are(model: Any, processor: Any) -> bool:
    return all(proc is processor for proc in model.attn_processors.values())


# --- applying everything ------------------------------------------------------------------------------
def prepare(pipe: Any, options: AccelerationOptions) -> AccelerationState:
    """SDPA, channels_last and fused QKV, on CPU before any LoRA / IP-Adapter."""
    state = AccelerationState(options=options)
    ensure_sdpa(pipe, options.sdpa)
    if options.sdpa:
        pipe.unet.set_attn_processor(state.plain_processor)
    vae_done = _prepared(pipe.vae)  # a VAE shared with a model loaded before (.shared_components)
    if options.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        if not vae_done and min(pipe.vae.config.block_out_channels) >= NHWC_MIN_VAE_CHANNELS:
            pipe.vae.to(memory_format=torch.channels_last)
    if options.fuse_qkv and options.sdpa:
        _fuse_projections(pipe.unet)
        share_fused_weights(pipe.unet)  # no duplicate weights in RAM meanwhile
        pipe.unet.set_attn_processor(state.fused_processor)
        state.unet_fusable = True
        if not vae_done:
            _fuse_projections(pipe.vae)
            pipe.vae.set_attn_processor(FusedAttnProcessor2_0())  # type: ignore[no-untyped-call]
    pipe.vae._imagen_prepared = True
    return state


def _prepared(vae: Any) -> bool:
    return bool(getattr(vae, "_imagen_prepared", False))


def finish_on_device(pipe: Any, state: AccelerationState) -> None:
    """Once the pipeline sits on its device: fused weights shared again (a move copies each view on its
    own), then torch.compile when it is on."""
    if state.unet_fusable:
        share_fused_weights(pipe.unet)
        share_fused_weights(pipe.vae)
    if state.options.compile:
        compile_pipeline(pipe, state.options)


def configure_compile_cache(cache_dir: Path) -> None:
    """Inductor's FX-graph and autotune caches on disk under ``cache_dir`` (set before the first compile),
    and the mega-cache artifacts saved by a previous run loaded into them."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Not setdefault: importing diffusers already asked inductor for its cache folder, and inductor writes
    # its default (/tmp/torchinductor_<user>) into this variable when it does.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir / "inductor")
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    mega = cache_dir / MEGA_CACHE_FILE
    loader = getattr(torch.compiler, "load_cache_artifacts", None)
    if loader is not None and mega.is_file():
        try:
            loader(mega.read_bytes())
            log.info("loaded compile cache artifacts from %s", mega)
        except Exception as exc:  # a cache from another torch/GPU: recompile, never fail the worker
            log.warning("ignoring compile cache %s: %s", mega, exc)


def save_compile_cache(cache_dir: Path) -> Path | None:
    """After the warm-up compiled everything: the portable artifacts, for the next start (or another box)."""
    saver = getattr(torch.compiler, "save_cache_artifacts", None)
    if saver is None:
        return None
    try:
        result = saver()
    except Exception as exc:
        log.warning("could not save compile cache artifacts: %s", exc)
        return None
    if result is None:
        return None
    artifacts = result[0]
    path = cache_dir / MEGA_CACHE_FILE
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(artifacts)
    tmp.replace(path)
    return path


def inductor_settings(compile_mode: str) -> dict[str, bool]:
    """diffusers' recommended inductor settings for SDXL's UNet. Coordinate-descent tuning (a search over
    each Triton kernel's block sizes) only with the ``max-autotune`` modes, which ask for long tuning. With it
    on, a cold compile in ``default`` mode outlasted 450 s on an H200 (torch 2.11), and a block size that
    only this search tries (an 8192-wide reduction; inductor's own reductions stop at 2048) made Triton's
    compiler fail on SDXL's group norm."""
    tuned = compile_mode.startswith("max-autotune")
    return {
        "conv_1x1_as_mm": True,
        "epilogue_fusion": False,
        "coordinate_descent_tuning": tuned,
        "coordinate_descent_check_all_directions": tuned,
    }


def compile_pipeline(pipe: Any, options: AccelerationOptions) -> None:
    """Compile in place (``nn.Module.compile``): the modules keep their type, so diffusers and PEFT still see
    a ``UNet2DConditionModel`` (LoRA loading, hotswap, attention processors). The shapes are static for a
    model (its native size, batch 2 with CFG), so ``dynamic=False``."""
    import torch._inductor.config as inductor_config

    if options.cache_dir is not None:
        configure_compile_cache(options.cache_dir)
    for name, value in inductor_settings(options.compile_mode).items():
        setattr(inductor_config, name, value)
    pipe.unet.compile(mode=options.compile_mode, fullgraph=False, dynamic=False)
    if options.compile_vae and getattr(pipe.vae.decoder, "_compiled_call_impl", None) is None:  # not if shared
        pipe.vae.decoder.compile(mode=options.compile_mode, fullgraph=False, dynamic=False)
        pipe.vae.post_quant_conv.compile(mode=options.compile_mode, fullgraph=False, dynamic=False)
