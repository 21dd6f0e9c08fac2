"""The real generation engine: SDXL with diffusers, LoRA/LoCon adapters, Compel prompts and IP-Adapter.

One instance lives in each worker process and keeps its pipelines between jobs:

* pipelines stay loaded (``IMAGEN_MAX_LOADED_MODELS``, least recently used freed first);
* each LoRA is read from disk once per pipeline and kept as a named PEFT adapter, then switched per job
  with ``set_adapters`` / ``disable_lora`` (an adapter not requested has no effect at all);
* the IP-Adapter is attached only while a job asks ``ip_strength`` > 0 (its weights stay cached in RAM);
* noise comes from a CPU ``torch.Generator`` seeded with the task's seed: same task, same bytes;
* speed options (:mod:`imagen.generation.diffusers.acceleration`: SDPA, channels_last, fused QKV, torch.compile with an
  on-disk cache, LoRA hotswap into fixed slots when compiled) are applied when a pipeline is loaded, and
  ``warm_up`` runs one short image at worker start so the first job neither loads nor compiles anything.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPVisionModelWithProjection

from imagen.config import Settings
from imagen.errors import FatalGenerationError, ImagenError, RetryableGenerationError
from imagen.generation.base import (
    STEP_DECODING,
    STEP_ENCODING_PROMPT,
    STEP_GENERATION,
    STEP_LOADING_LORAS,
    STEP_LOADING_MODEL,
    DeviceInfo,
    Engine,
    GeneratedImage,
    GenerationTask,
    ProgressCallback,
)
from imagen.generation.diffusers import acceleration
from imagen.generation.diffusers.loading import load_pipeline
from imagen.generation.diffusers.prompts import PromptEncoder, add_trigger_words, trigger_words_for
from imagen.registry import LoraSpec, ModelSpec, Registry, safe_files

log = logging.getLogger(__name__)

_SAMPLER_NAMES = {
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "DDIMScheduler": "ddim",
}


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ImagenError("IMAGEN_DEVICE=cuda but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """Native bf16 arithmetic (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="ignore")
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice != "auto":
        return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[choice]
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


@contextlib.contextmanager
def _lora_errors(message: str) -> Iterator[None]:
    """A LoRA that does not match the model fails the job for good; out of memory stays retryable."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except (ValueError, KeyError, RuntimeError) as exc:
        raise FatalGenerationError(f"{message}: {exc}") from exc


def adapter_name(lora_id: str) -> str:
    """PEFT adapter names end up in module dict keys: no dots."""
    return "lora_" + re.sub(r"[^A-Za-z0-9_]", "_", lora_id) + f"_{zlib.crc32(lora_id.encode()) % 10_000:04d}"


@dataclass
class EngineStats:
    """What the engine read from disk (tests use it to check that warm jobs load nothing)."""

    model_loads: int = 0
    lora_loads: int = 0
    ip_adapter_loads: int = 0
    warm_up_runs: int = 0
    warm_up_seconds: float | None = None


@dataclass
class LoadedModel:
    spec: ModelSpec
    pipe: Any  # StableDiffusionXLPipeline (diffusers ships no usable type hints)
    encoder: PromptEncoder
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA id -> adapter name
    lora_enabled: bool = False
    ip_adapter_attached: bool = False
    speed: acceleration.SpeedState | None = None
    slots: acceleration.LoraSlots | None = None  # LoRA hotswap (compiled UNet)


@dataclass
class IpAdapterWeights:
    state_dict: dict[str, dict[str, torch.Tensor]]
    image_encoder: CLIPVisionModelWithProjection
    reference: Image.Image


class DiffusersEngine(Engine):
    def __init__(self, registry: Registry, settings: Settings) -> None:
        super().__init__(registry, settings)
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.stats = EngineStats()
        self.speed = acceleration.SpeedOptions.from_settings(settings, self.device)
        self.lora_hotswap = settings.lora_hotswap == "on" or (
            settings.lora_hotswap == "auto" and self.speed.compile
        )
        # How a registry entry becomes a CPU pipeline (the benchmark swaps in a random full-size one).
        self.pipeline_loader: Callable[[ModelSpec, torch.dtype], Any] = load_pipeline
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._ip_weights: IpAdapterWeights | None = None

    # --- Engine interface -------------------------------------------------------------------
    def device_info(self) -> DeviceInfo:
        return DeviceInfo(
            gpu_available=self.device.type == "cuda",
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
        )

    def speed_summary(self) -> str:
        summary = self.speed.summary()
        return summary + (" + LoRA hotswap" if self.lora_hotswap else "")

    def warm_up(self) -> None:
        """Load the default model and (``warm_up_steps`` > 0) make one image with it at its native size, CFG
        on: kernels are selected, memory pools grow and, with compile on, the UNet and VAE decoder compile
        here rather than in the first user's job."""
        model_id = self.registry.resolve_default_model(self.settings.default_model)
        spec = self.registry.model(model_id)
        if spec is None:
            return
        started = time.perf_counter()
        self._model(spec, lambda step, pct: None)
        if self.settings.warm_up_steps > 0:
            warm_task = GenerationTask(
                prompt="warm-up", negative_prompt=None, model=spec.id, steps=self.settings.warm_up_steps,
                guidance_scale=5.0, seed=0,
            )
            self.generate(warm_task, lambda step, pct: None)
            self.stats.warm_up_runs += 1
            if self.speed.compile and self.speed.cache_dir is not None:
                acceleration.save_compile_cache(self.speed.cache_dir)
        self.stats.warm_up_seconds = time.perf_counter() - started
        log.info("warm-up of %s took %.1f s (%s)", spec.id, self.stats.warm_up_seconds, self.speed_summary())

    def close(self) -> None:
        self._models.clear()
        self._ip_weights = None
        self._free_memory()

    def generate(self, task: GenerationTask, progress: ProgressCallback) -> GeneratedImage:
        try:
            with torch.inference_mode():
                return self._generate(task, progress)
        except torch.OutOfMemoryError as exc:
            self._free_memory()
            raise RetryableGenerationError("CUDA out of memory") from exc
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                self._free_memory()
                raise RetryableGenerationError("CUDA out of memory") from exc
            raise

    # --- one job ----------------------------------------------------------------------------
    def _generate(self, task: GenerationTask, progress: ProgressCallback) -> GeneratedImage:
        spec = self.registry.model(task.model)
        if spec is None:
            raise FatalGenerationError(f"unknown model {task.model!r}")
        loras = self._lora_specs(task)
        loaded = self._model(spec, progress)
        pipe = loaded.pipe

        progress(STEP_LOADING_LORAS, 0)
        active = [(lora, weight) for lora, weight in loras if weight != 0]
        self._apply_loras(loaded, active)
        ip_kwargs = self._apply_ip_adapter(loaded, task.ip_strength)
        if loaded.speed is not None:
            acceleration.sync_unet_attention(pipe, loaded.speed, bool(active), loaded.ip_adapter_attached)
        progress(STEP_LOADING_LORAS, 100)

        progress(STEP_ENCODING_PROMPT, 0)
        words = {lora.id: lora.trigger_words for lora, _ in loras}
        final_prompt = add_trigger_words(
            task.prompt, trigger_words_for([(lora.id, weight) for lora, weight in loras], words)
        )
        final_negative = task.negative_prompt if task.negative_prompt is not None else spec.default_negative
        embeddings = loaded.encoder.encode(final_prompt, final_negative)
        progress(STEP_ENCODING_PROMPT, 100)

        steps = task.steps

        def on_step_end(_pipe: Any, step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            progress(STEP_GENERATION, min(100, int(100 * (step + 1) / steps)))
            return kwargs

        progress(STEP_GENERATION, 0)
        started = time.perf_counter()
        output = pipe(
            prompt_embeds=embeddings.prompt_embeds,
            pooled_prompt_embeds=embeddings.pooled_prompt_embeds,
            negative_prompt_embeds=embeddings.negative_prompt_embeds,
            negative_pooled_prompt_embeds=embeddings.negative_pooled_prompt_embeds,
            num_inference_steps=steps,
            guidance_scale=task.guidance_scale,
            width=spec.size,
            height=spec.size,
            generator=torch.Generator(device="cpu").manual_seed(task.seed),
            callback_on_step_end=on_step_end,
            output_type="latent",
            **ip_kwargs,
        )
        log.debug("denoised in %.3f s", time.perf_counter() - started)
        progress(STEP_DECODING, 0)
        image, pixels = self._decode(pipe, output.images)
        progress(STEP_DECODING, 100)
        scheduler = type(pipe.scheduler).__name__
        return GeneratedImage(
            image=image,
            pixels=pixels,
            extra_metadata={
                "final_prompt": final_prompt,
                "final_negative_prompt": final_negative,
                "width": image.width,
                "height": image.height,
                "sampler": _SAMPLER_NAMES.get(scheduler, scheduler),
                "scheduler": scheduler,
                "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."),
                # no timings here: the same request and seed must give the same file, byte for byte
            },
        )

    def _decode(self, pipe: Any, latents: torch.Tensor) -> tuple[Image.Image, np.ndarray[Any, Any]]:
        vae = pipe.vae
        # SDXL's original VAE overflows in fp16 (black images): decode it in fp32 unless it is fp16-safe
        # (the fp16-fix VAE's config says force_upcast: false).
        upcast = vae.dtype == torch.float16 and bool(vae.config.force_upcast)
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            latents = latents.to(dtype=vae.dtype)
            mean = getattr(vae.config, "latents_mean", None)
            std = getattr(vae.config, "latents_std", None)
            if mean is not None and std is not None:
                mean_t = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
                std_t = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
                latents = latents * std_t / vae.config.scaling_factor + mean_t
            else:
                latents = latents / vae.config.scaling_factor
            decoded = vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        # As postprocess(output_type="pil") does, keeping the uint8 array for the PNG writer.
        floats = pipe.image_processor.postprocess(decoded, output_type="np")
        pixels = np.ascontiguousarray((floats[0] * 255).round().astype(np.uint8))
        return Image.fromarray(pixels, "RGB"), pixels

    # --- models -----------------------------------------------------------------------------
    def _model(self, spec: ModelSpec, progress: ProgressCallback) -> LoadedModel:
        loaded = self._models.get(spec.id)
        if loaded is not None:
            self._models.move_to_end(spec.id)
            return loaded
        progress(STEP_LOADING_MODEL, 0)
        while len(self._models) >= self.settings.max_loaded_models:
            old_id, _old = self._models.popitem(last=False)
            del _old
            log.info("freed model %s", old_id)
            self._free_memory()
        pipe = self.pipeline_loader(spec, self.dtype)
        self.stats.model_loads += 1
        state = acceleration.apply_speed_options(pipe, self.speed)  # on CPU, before placing (compile comes after)
        self._place(pipe)
        if state.unet_fusable and self.settings.cpu_offload == "none":
            acceleration.share_fused_weights(pipe.unet)  # on the device now: no duplicate QKV weights
            acceleration.share_fused_weights(pipe.vae)
        if self.speed.compile:
            acceleration.compile_pipeline(pipe, self.speed)
            state.compiled = True
        encoder = PromptEncoder(pipe, self._exec_device(pipe), self.dtype)
        loaded = LoadedModel(spec=spec, pipe=pipe, encoder=encoder, speed=state)
        if self.lora_hotswap:
            loaded.slots = acceleration.LoraSlots(pipe, self.settings.max_loras, self.settings.lora_hotswap_rank)
        self._models[spec.id] = loaded
        progress(STEP_LOADING_MODEL, 100)
        return loaded

    def _place(self, pipe: Any) -> None:
        if self.device.type == "cuda" and self.settings.cpu_offload == "model":
            pipe.enable_model_cpu_offload()
        elif self.device.type == "cuda" and self.settings.cpu_offload == "sequential":
            pipe.enable_sequential_cpu_offload()
        else:
            pipe.to(self.device)
        if self.settings.vae_tiling:
            pipe.vae.enable_tiling()
            # SDXL's VAE config tiles above its sample_size (1024 px), i.e. never at SDXL's own 1024²:
            # 512 px tiles (64 latents) so that tiling actually lowers the decode's peak memory there.
            if getattr(pipe.vae, "tile_sample_min_size", 0) >= 1024:
                pipe.vae.tile_sample_min_size = 512
                pipe.vae.tile_latent_min_size = 64
        if self.settings.vae_slicing:
            pipe.vae.enable_slicing()

    def _exec_device(self, pipe: Any) -> torch.device:
        device: torch.device = pipe._execution_device
        return device

    def _free_memory(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- LoRAs ------------------------------------------------------------------------------
    def _lora_specs(self, task: GenerationTask) -> list[tuple[LoraSpec, float]]:
        if len(task.loras) > self.settings.max_loras:
            raise FatalGenerationError(f"at most {self.settings.max_loras} LoRAs per request")
        seen: set[str] = set()
        out: list[tuple[LoraSpec, float]] = []
        for choice in task.loras:
            lora = self.registry.lora(choice.name)
            if lora is None:
                raise FatalGenerationError(f"unknown LoRA {choice.name!r}")
            if choice.name in seen:
                raise FatalGenerationError(f"LoRA {choice.name!r} is listed twice")
            seen.add(choice.name)
            out.append((lora, choice.weight))
        return out

    def _apply_loras(self, loaded: LoadedModel, active: list[tuple[LoraSpec, float]]) -> None:
        if loaded.slots is not None:
            self._apply_loras_hotswap(loaded, loaded.slots, active)
            return
        pipe = loaded.pipe
        for lora, _weight in active:
            if lora.id not in loaded.adapters:
                self._load_lora(loaded, lora)
        if not active:
            if loaded.lora_enabled:
                pipe.disable_lora()
                loaded.lora_enabled = False
            return
        if not loaded.lora_enabled:
            pipe.enable_lora()
            loaded.lora_enabled = True
        pipe.set_adapters([loaded.adapters[lora.id] for lora, _ in active], [weight for _, weight in active])

    def _apply_loras_hotswap(
        self, loaded: LoadedModel, slots: acceleration.LoraSlots, active: list[tuple[LoraSpec, float]]
    ) -> None:
        for lora, _weight in active:
            if not slots.knows(lora.id):
                state = self._read_lora(lora)
                with _lora_errors(f"LoRA {lora.id!r} does not fit model {loaded.spec.id!r}"):
                    slots.add(lora.id, adapter_name(lora.id), state)
                self.stats.lora_loads += 1
        with _lora_errors(f"LoRA hotswap failed on model {loaded.spec.id!r}"):
            slots.activate([(lora.id, weight) for lora, weight in active])
        loaded.lora_enabled = bool(active)

    def _read_lora(self, lora: LoraSpec) -> dict[str, torch.Tensor]:
        try:
            safe_files.lora_format(lora.path)
        except safe_files.UnsafeFileError as exc:
            raise FatalGenerationError(f"LoRA {lora.id!r}: {exc}") from exc
        return load_file(str(lora.path))

    def _load_lora(self, loaded: LoadedModel, lora: LoraSpec) -> None:
        name = adapter_name(lora.id)
        state = self._read_lora(lora)
        with _lora_errors(f"LoRA {lora.id!r} does not fit model {loaded.spec.id!r}"):
            loaded.pipe.load_lora_weights(state, adapter_name=name)
        loaded.adapters[lora.id] = name
        loaded.lora_enabled = True
        self.stats.lora_loads += 1

    # --- IP-Adapter -------------------------------------------------------------------------
    def _apply_ip_adapter(self, loaded: LoadedModel, strength: float) -> dict[str, Any]:
        pipe = loaded.pipe
        if strength <= 0:
            if loaded.ip_adapter_attached:
                pipe.unload_ip_adapter()
                loaded.ip_adapter_attached = False
            return {}
        weights = self._ip_adapter_weights()
        if not loaded.ip_adapter_attached:
            encoder = weights.image_encoder.to(device=self._exec_device(pipe), dtype=self.dtype)  # type: ignore[call-arg]
            pipe.register_modules(image_encoder=encoder)
            pipe.load_ip_adapter(
                weights.state_dict,
                subfolder="",
                weight_name="ip_adapter.safetensors",
                image_encoder_folder=None,
            )
            loaded.ip_adapter_attached = True
        pipe.set_ip_adapter_scale(strength)
        return {"ip_adapter_image": weights.reference}

    def _ip_adapter_weights(self) -> IpAdapterWeights:
        if self._ip_weights is not None:
            return self._ip_weights
        spec = self.registry.ip_adapter
        if spec is None:
            raise FatalGenerationError("ip_strength > 0 but no ip_adapter is configured in the registry")
        try:
            safe_files.read_safetensors_header(spec.path)
            safe_files.check_weights_folder(spec.image_encoder_path)
            safe_files.check_image(spec.reference_image)
        except safe_files.UnsafeFileError as exc:
            raise FatalGenerationError(f"IP-Adapter: {exc}") from exc
        raw = load_file(str(spec.path))
        state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        for key, value in raw.items():
            group, _, rest = key.partition(".")
            if group in state:
                state[group][rest] = value
        if not state["image_proj"] or not state["ip_adapter"]:
            raise FatalGenerationError(
                f"IP-Adapter {spec.path}: expected image_proj.* and ip_adapter.* tensors"
            )
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            str(spec.image_encoder_path), use_safetensors=True, local_files_only=True
        )
        with Image.open(spec.reference_image) as opened:
            reference = opened.convert("RGB")
        encoder.eval()  # type: ignore[no-untyped-call]
        self._ip_weights = IpAdapterWeights(state_dict=state, image_encoder=encoder, reference=reference)
        self.stats.ip_adapter_loads += 1
        return self._ip_weights
