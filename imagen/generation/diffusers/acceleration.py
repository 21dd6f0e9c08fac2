"""Speed options for a loaded SDXL pipeline (issue #5): the engine applies them, the benchmark times them.

* **SDPA**: every UNet/VAE attention layer uses PyTorch's ``scaled_dot_product_attention``
  (``AttnProcessor2_0``, diffusers' default with torch 2); anything else found is replaced.
* **channels_last**: UNet and VAE weights in NHWC layout (faster convolutions on tensor cores).
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


@dataclass(frozen=True)
class SpeedOptions:
    sdpa: bool = True
    channels_last: bool = True
    fuse_qkv: bool = True
    compile: bool = False
    compile_vae: bool = True
    compile_mode: str = "max-autotune-no-cudagraphs"
    cache_dir: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings, device: torch.device) -> SpeedOptions:
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
class SpeedState:
    """What was applied to one pipeline; the processor instances are reused so that switching between
    fused and plain attention does not look like new code to torch.compile (no recompile after the first)."""

    options: SpeedOptions
    plain_processor: Any = field(default_factory=AttnProcessor2_0)
    fused_processor: Any = field(default_factory=lambda: FusedAttnProcessor2_0())  # type: ignore[no-untyped-call]
    unet_fusable: bool = False
    compiled: bool = False


# --- attention ----------------------------------------------------------------------------------------
def _attention_modules(model: Any) -> list[Any]:
    return [module for module in model.modules() if isinstance(module, Attention)]


def ensure_sdpa(pipe: Any, enabled: bool = True) -> None:
    """UNet and VAE attention on SDPA (or, ``enabled=False``, diffusers' classic ``AttnProcessor``)."""
    for model in (pipe.unet, pipe.vae):
        wanted = AttnProcessor2_0 if enabled else AttnProcessor
        processors = model.attn_processors
        if any(type(proc) is not wanted for proc in processors.values()):
            model.set_attn_processor(wanted())


def uses_sdpa(model: Any) -> bool:
    sdpa_types = (AttnProcessor2_0, FusedAttnProcessor2_0)
    return all(isinstance(proc, sdpa_types) for proc in model.attn_processors.values())


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


def sync_unet_attention(pipe: Any, state: SpeedState, lora_active: bool, ip_adapter: bool) -> None:
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
def apply_speed_options(pipe: Any, options: SpeedOptions) -> SpeedState:
    """SDPA, channels_last and fused QKV, before any LoRA / IP-Adapter (compile: :func:`compile_pipeline`,
    once the pipeline is on its device)."""
    state = SpeedState(options=options)
    ensure_sdpa(pipe, options.sdpa)
    if options.sdpa:
        pipe.unet.set_attn_processor(state.plain_processor)
    if options.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if options.fuse_qkv and options.sdpa:
        _fuse_projections(pipe.unet)
        share_fused_weights(pipe.unet)  # again after placing: a move copies views one by one
        pipe.unet.set_attn_processor(state.fused_processor)
        state.unet_fusable = True
        _fuse_projections(pipe.vae)
        pipe.vae.set_attn_processor(FusedAttnProcessor2_0())  # type: ignore[no-untyped-call]
    return state


def configure_compile_cache(cache_dir: Path) -> None:
    """Inductor's FX-graph and autotune caches on disk under ``cache_dir`` (set before the first compile),
    and the mega-cache artifacts saved by a previous run loaded into them."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))
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


def compile_pipeline(pipe: Any, options: SpeedOptions) -> None:
    """Compile in place (``nn.Module.compile``): the modules keep their type, so diffusers and PEFT still see
    a ``UNet2DConditionModel`` (LoRA loading, hotswap, attention processors). The shapes are static for a
    model (its native size, batch 2 with CFG), so ``dynamic=False``."""
    import torch._inductor.config as inductor_config

    if options.cache_dir is not None:
        configure_compile_cache(options.cache_dir)
    # diffusers' recommended inductor settings for SDXL's UNet.
    inductor_config.conv_1x1_as_mm = True
    inductor_config.coordinate_descent_tuning = True
    inductor_config.epilogue_fusion = False
    inductor_config.coordinate_descent_check_all_directions = True
    pipe.unet.compile(mode=options.compile_mode, fullgraph=False, dynamic=False)
    if options.compile_vae:
        pipe.vae.decoder.compile(mode=options.compile_mode, fullgraph=False, dynamic=False)
        pipe.vae.post_quant_conv.compile(mode=options.compile_mode, fullgraph=False, dynamic=False)


# --- LoRA hotswap -------------------------------------------------------------------------------------
@dataclass
class _UnetLora:
    diffusers_state: dict[str, torch.Tensor]  # "unet.*" keys, as lora_state_dict converted them
    network_alphas: dict[str, float] | None
    peft_state: dict[str, torch.Tensor]  # PEFT layout, no adapter name (for hotswap)
    config: Any  # peft LoraConfig
    rank: int


@dataclass
class _Slot:
    name: str
    resident: str | None = None
    base_scaling: list[tuple[Any, Any]] = field(default_factory=list)  # (LoRA layer, its scale for weight 1)


class LoraSlots:
    """UNet LoRAs switched by hotswapping weights into fixed PEFT adapters ("slots"), for a compiled UNet.

    A job with k LoRAs always runs slots ``0..k-1``; a slot is created (LoRA layers injected, ranks padded to
    ``target_rank``, scalings turned into tensors: ``peft.utils.hotswap.prepare_model_for_compiled_hotswap``)
    the first time it is needed, and afterwards receives another LoRA by copying its weights in place
    (``hotswap_adapter_from_state_dict``) and filling its scaling tensors. Nothing about the module structure,
    shapes or Python constants changes, so the compiled graphs (one without LoRA, one per number of LoRAs)
    are reused. A LoRA that cannot be swapped into a slot (it targets layers the slot lacks, or has a higher
    rank than ``target_rank``) replaces the slot instead: correct, but the UNet recompiles.
    Text-encoder parts (never compiled) stay ordinary named adapters, switched with ``set_adapters``.
    """

    def __init__(self, pipe: Any, count: int, target_rank: int) -> None:
        self.pipe = pipe
        self.target_rank = target_rank
        self.slots = [_Slot(name=f"imagen_slot_{i}") for i in range(max(count, 1))]
        self.created = 0
        self.unet_loras: dict[str, _UnetLora] = {}
        self.text_adapters: dict[str, str] = {}  # LoRA id -> adapter name in the text encoders
        self.known: set[str] = set()
        self.swaps = 0
        self.slot_rebuilds = 0

    def knows(self, lora_id: str) -> bool:
        return lora_id in self.known

    def add(self, lora_id: str, name: str, raw: dict[str, torch.Tensor]) -> None:
        """Convert a LoRA file once: text-encoder parts become adapters, the UNet part stays in RAM."""
        from diffusers.utils.peft_utils import _create_lora_config  # untyped, internal but stable since 0.28
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

        pipe = self.pipe
        state, alphas = pipe.lora_state_dict(dict(raw), unet_config=pipe.unet.config)
        if not all("lora" in key for key in state):
            raise ValueError("not a LoRA state dict")
        for encoder, prefix in ((pipe.text_encoder, "text_encoder"), (pipe.text_encoder_2, "text_encoder_2")):
            if any(key.startswith(prefix + ".") for key in state):
                pipe.load_lora_into_text_encoder(
                    state,
                    network_alphas=alphas,
                    text_encoder=encoder,
                    prefix=prefix,
                    adapter_name=name,
                    _pipeline=pipe,
                )
                self.text_adapters[lora_id] = name
        unet_state = {k: v for k, v in state.items() if k.startswith("unet.")}
        if unet_state:
            peft_state = {k.removeprefix("unet."): v for k, v in unet_state.items()}
            if "lora_A" not in next(iter(peft_state)):
                peft_state = convert_unet_state_dict_to_peft(peft_state)  # type: ignore[no-untyped-call]
            ranks = {f"^{k}": v.shape[1] for k, v in peft_state.items() if "lora_B" in k and v.ndim > 1}
            unet_alphas = None
            if alphas:
                unet_alphas = {k.removeprefix("unet."): v for k, v in alphas.items() if k.startswith("unet.")}
            config = _create_lora_config(  # type: ignore[no-untyped-call]
                peft_state,
                unet_alphas,
                None,
                ranks,
                model_state_dict=pipe.unet.state_dict(),
                adapter_name=name,
            )
            self.unet_loras[lora_id] = _UnetLora(
                diffusers_state=unet_state,
                network_alphas=alphas,
                peft_state=peft_state,
                config=config,
                rank=max(ranks.values(), default=0),
            )
        self.known.add(lora_id)

    # --- per job ---
    def activate(self, active: list[tuple[str, float]]) -> None:
        from diffusers.loaders.lora_base import (
            disable_lora_for_text_encoder,
            enable_lora_for_text_encoder,
            set_adapters_for_text_encoder,
        )

        pipe = self.pipe
        unet_active = [(lora_id, weight) for lora_id, weight in active if lora_id in self.unet_loras]
        if len(unet_active) > len(self.slots):
            raise ValueError(f"at most {len(self.slots)} LoRAs at once")
        wanted = [lora_id for lora_id, _ in unet_active]
        count = len(wanted)
        # Slots 0..k-1: keep a LoRA where it already is, put the others in the remaining ones.
        placed: dict[int, str] = {}
        for index in range(count):
            resident = self.slots[index].resident
            if resident is not None and resident in wanted:
                placed[index] = resident
        missing = [lora_id for lora_id in wanted if lora_id not in placed.values()]
        for index in range(count):
            if index not in placed:
                placed[index] = missing.pop(0)
                self._put(index, placed[index])
        weights = dict(unet_active)
        for index in range(count):
            slot = self.slots[index]
            weight = weights[placed[index]]
            for layer, base in slot.base_scaling:
                current = layer.scaling[slot.name]
                if isinstance(current, torch.Tensor):
                    torch.mul(base, weight, out=current)
                else:
                    layer.scaling[slot.name] = base * weight
        if self.created:
            unet = pipe.unet
            if count == 0:
                unet.disable_lora()
            else:
                unet.enable_lora()
                names = [self.slots[i].name for i in range(count)]
                for layer in self._lora_layers():
                    layer.set_adapter(names)
        for encoder in (pipe.text_encoder, pipe.text_encoder_2):
            loaded = getattr(encoder, "peft_config", {})
            if not loaded:
                continue
            pairs = [(self.text_adapters[i], w) for i, w in active if self.text_adapters.get(i) in loaded]
            if pairs:
                enable_lora_for_text_encoder(encoder)
                set_adapters_for_text_encoder([n for n, _ in pairs], encoder, [w for _, w in pairs])
            else:
                disable_lora_for_text_encoder(encoder)

    def _lora_layers(self) -> list[Any]:
        from peft.tuners.lora import LoraLayer

        return [module for module in self.pipe.unet.modules() if isinstance(module, LoraLayer)]

    def _put(self, index: int, lora_id: str) -> None:
        slot = self.slots[index]
        lora = self.unet_loras[lora_id]
        unet = self.pipe.unet
        if index < self.created and lora.rank <= self.target_rank:
            try:
                self._hotswap(slot, lora)
            except (RuntimeError, ValueError) as exc:  # targets layers this slot lacks: rebuild the slot
                log.info("LoRA %s cannot go into %s by hotswap (%s): rebuilding it", lora_id, slot.name, exc)
                unet.delete_adapters(slot.name)
                self._create(slot, lora)
                self.slot_rebuilds += 1
        else:
            if index < self.created:
                unet.delete_adapters(slot.name)
                self.slot_rebuilds += 1
            self._create(slot, lora)
            self.created = max(self.created, index + 1)
        slot.resident = lora_id
        slot.base_scaling = [
            (layer, value.clone() if isinstance(value, torch.Tensor) else float(value))
            for layer in self._lora_layers()
            if (value := layer.scaling.get(slot.name)) is not None
        ]
        self.swaps += 1

    def _create(self, slot: _Slot, lora: _UnetLora) -> None:
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        unet = self.pipe.unet
        unet.load_lora_adapter(
            lora.diffusers_state,
            prefix="unet",
            network_alphas=lora.network_alphas,
            adapter_name=slot.name,
            _pipeline=self.pipe,
        )
        prepare_model_for_compiled_hotswap(
            unet,
            target_rank=max(self.target_rank, lora.rank),
            config=unet.peft_config[slot.name],
            check_compiled="ignore",
        )

    def _hotswap(self, slot: _Slot, lora: _UnetLora) -> None:
        from peft.utils.hotswap import hotswap_adapter_from_state_dict

        existing = self.pipe.unet.peft_config[slot.name]
        for key in ("use_rslora", "use_dora", "lora_bias"):
            if getattr(existing, key, None) != getattr(lora.config, key, None):
                raise ValueError(f"{key} differs")
        state = {}
        for key, value in lora.peft_state.items():
            if key.endswith(("lora_A.weight", "lora_B.weight")):
                key = key[: -len(".weight")] + f".{slot.name}.weight"
            elif key.endswith("lora_B.bias"):
                key = key[: -len(".bias")] + f".{slot.name}.bias"
            state[key] = value
        # The alphas/ranks come from this LoRA's own config: per-layer scalings are set from it (peft's
        # config-compatibility check only guards against keeping the previous adapter's alphas).
        hotswap_adapter_from_state_dict(
            model=self.pipe.unet, state_dict=state, adapter_name=slot.name, config=lora.config
        )
