"""The real generation engine: SDXL with diffusers. This module orchestrates one job; the parts live beside it.

One instance lives in each worker process and keeps its pipelines between jobs:

* pipelines stay loaded within a memory budget, on the device and optionally in a host-RAM tier, least
  recently used leaving first (:mod:`.model_cache`); components byte-identical across checkpoints are held
  once (:mod:`.shared_components`); pipelines are read from the registry's files by :mod:`.loading` and sped
  up by :mod:`.acceleration` (SDPA, channels_last, fused QKV, torch.compile) when loaded; ``warm_up`` runs
  one short image at worker start so the first job neither loads nor compiles anything;
* each pipeline has one :class:`~.loras.LoraSwitcher` (PEFT adapters, or hotswap slots when compiled) that
  puts a job's LoRAs in effect, each file read once;
* the IP-Adapter (:mod:`.ip_adapter`) is attached only while a job asks ``ip_strength`` > 0;
* prompts go through Compel (:mod:`.prompts`: any length, weighting syntax), LoRA trigger words added;
* noise comes from a CPU ``torch.Generator`` seeded with the task's seed: same task, same bytes; a job of
  ``num_images`` runs as one batch with one generator per image (seed + i), so each image is, within
  batched arithmetic's last bits, the same request alone with its seed;
* a job's sampler (``scheduler``, an A1111 name, or the registry's default) is built from the loaded
  pipeline's own scheduler config for that job only, and the pipeline's scheduler restored after it;
* img2img and inpainting use ``StableDiffusionXLImg2ImgPipeline`` / ``StableDiffusionXLInpaintPipeline``
  made with ``from_pipe`` from the loaded pipeline, once per model: the same component objects, no second
  copy of any weight; a job with ControlNets likewise runs diffusers' ControlNet pipeline of its mode
  (:mod:`.controlnets`), its ControlNets read once and held with the model (counted in its budget, moved and
  freed with it, one copy for all the models of their base);
* on a CPU, the process keeps the memory that tensors free for the next job (:mod:`.host_memory`), and a VAE
  upcast to float32 for decoding stays float32 (:func:`_decode`): no page faults, no casts, job after job.
"""

from __future__ import annotations

import copy
import gc
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cache, partial
from typing import Any

import diffusers
import numpy as np
import torch
from PIL import Image

from imagen.config import Settings
from imagen.errors import FatalGenerationError, JobCancelled, RetryableGenerationError, is_out_of_memory
from imagen.generation.base import (
    DEFAULT_STRENGTH,
    NO_INPUTS,
    STEP_DECODING,
    STEP_ENCODING_PROMPT,
    STEP_GENERATION,
    STEP_LOADING_LORAS,
    STEP_LOADING_MODEL,
    TIER_DEVICE,
    TIER_RAM,
    ControlNetChoice,
    DeviceInfo,
    Engine,
    GeneratedImage,
    GenerationTask,
    HiresChoice,
    InputImages,
    ProgressCallback,
    RefinerChoice,
    UpscaleChoice,
    denoising_steps,
)
from imagen.generation.diffusers import acceleration, controlnets, host_memory
from imagen.generation.diffusers import embeddings as embeddings_module
from imagen.generation.diffusers.guidance import callback_inputs, guidance_stop, guided_steps, stop_guidance
from imagen.generation.diffusers.ip_adapter import (
    IpAdapterWeights,
    attach_ip_adapter,
    detach_ip_adapter,
    load_ip_adapter_weights,
)
from imagen.generation.diffusers.loading import load_pipeline, place_pipeline, resolve_device, resolve_dtype
from imagen.generation.diffusers.loras import LoraSwitcher, lora_switcher
from imagen.generation.diffusers.model_cache import Budget, ModelCache, storage_bytes
from imagen.generation.diffusers.preview import decoder_preview, latents_preview, load_preview_decoder
from imagen.generation.diffusers.prompts import PromptEmbeddings, PromptEncoder, add_trigger_words, trigger_words_for
from imagen.generation.diffusers.schedulers import build_scheduler
from imagen.generation.diffusers.shared_components import LORA_TARGETS, ComponentHashes, SharedComponents
from imagen.generation.preview import wants_preview
from imagen.generation.samplers import sampler_available, scheduler_for
from imagen.generation.upscaling import UpscalerModel, lanczos, load_upscaler, upscale
from imagen.registry import ControlNetSpec, LoraSpec, ModelSpec, Registry

log = logging.getLogger(__name__)

_SAMPLER_NAMES = {
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "DDIMScheduler": "ddim",
}


@dataclass
class EngineStats:
    """What the engine read from disk (tests use it to check that warm jobs load nothing)."""

    model_loads: int = 0  # read from disk
    ram_switches: int = 0  # brought back from the host-RAM tier
    models_to_ram: int = 0
    models_freed: int = 0
    shared_components: int = 0  # components taken from a model already held instead of read again
    shared_bytes: int = 0  # their bytes, held once instead of twice
    last_switch: tuple[str, float] | None = None  # (where the model came from: "disk" / "ram", seconds)
    lora_loads: int = 0
    controlnet_loads: int = 0
    ip_adapter_loads: int = 0
    warm_up_runs: int = 0
    warm_up_seconds: float | None = None


@dataclass
class LoadedModel:
    spec: ModelSpec
    pipe: Any  # StableDiffusionXLPipeline (diffusers ships no usable type hints)
    encoder: PromptEncoder | None  # None for a refiner: its pipeline encodes with its one text encoder
    acceleration: acceleration.AccelerationState
    loras: LoraSwitcher
    default_scheduler: Any  # the pipeline's own scheduler, put back after a job that chose another
    preview_decoder: Any | None = None  # the registry's TAESDXL (AutoencoderTiny), if it names one
    ip_adapter_attached: bool = False
    # "img2img" / "inpaint": made from ``pipe`` with from_pipe on first use (same component objects)
    derived: dict[str, Any] = field(default_factory=dict)
    # True once the text encoders are this model's own (no longer shared), as LoRAs need them
    private_text_encoders: bool = False
    # the ControlNets its jobs used, by id (the same object for every model of their base that holds them)
    controlnets: dict[str, torch.nn.Module] = field(default_factory=dict)
    # the registry's embeddings (textual inversions) loaded into its tokenizers and text encoders, by name
    embeddings: set[str] = field(default_factory=set)

    def weight_modules(self) -> list[torch.nn.Module]:
        """What holds this model's weights, for the cache's budget (the IP-Adapter's encoder is the
        engine's, not the model's)."""
        pipe = self.pipe
        names = ("unet", "vae", "text_encoder", "text_encoder_2")
        modules = [module for name in names if (module := getattr(pipe, name, None)) is not None]
        extra = [self.preview_decoder] if self.preview_decoder is not None else []
        return modules + extra + list(self.controlnets.values())


@dataclass(frozen=True)
class _Job:
    """A task checked against the registry and its input images, the registry's defaults filled in: what
    each step of ``_make_images`` reads."""

    task: GenerationTask
    spec: ModelSpec
    mode: str  # "txt2img", "img2img" or "inpaint"
    loras: list[tuple[LoraSpec, float]]
    width: int
    height: int
    sampler: str | None  # the task's, else the registry's; None: the pipeline's own scheduler
    clip_skip: int | None
    # the ControlNet units that guide, each with its control image (scale > 0: a unit at 0 adds nothing, so its
    # pipeline is not run)
    controlnets: tuple[tuple[ControlNetChoice, ControlNetSpec, Image.Image], ...] = ()


@dataclass(frozen=True)
class _Prompt:
    text: str  # the task's prompt with its LoRAs' trigger words
    negative: str
    embeddings: Any  # PromptEmbeddings, for the pipeline call
    embeddings_used: tuple[str, ...] = ()  # the textual inversions the prompt or negative prompt writes


@dataclass
class _PipelineCall:
    """The pipeline that runs a job and the arguments of its call that depend on the mode and the model."""

    run: Any
    kwargs: dict[str, Any]
    strength: float | None = None  # img2img and inpainting only


class DiffusersEngine(Engine):
    def __init__(self, registry: Registry, settings: Settings) -> None:
        super().__init__(registry, settings)
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.stats = EngineStats()
        if self.device.type == "cpu" and settings.cpu_keep_freed_memory:
            host_memory.keep_freed_memory()  # before the model loads: its blocks come from the heap too
        self.acceleration_options = acceleration.AccelerationOptions.from_settings(settings, self.device)
        self.lora_hotswap = settings.lora_hotswap == "on" or (
            settings.lora_hotswap == "auto" and self.acceleration_options.compile
        )
        # How a registry entry becomes a CPU pipeline (the benchmark swaps in a random full-size one; only
        # the default loader is handed shared components).
        self.pipeline_loader: Callable[..., Any] = load_pipeline
        self._cache: ModelCache[LoadedModel] = ModelCache(
            Budget.from_settings(settings, self.device), demote=self._demote, free=self._freed
        )
        self._hashes = ComponentHashes()
        self._shared = SharedComponents()
        self._unique_bytes: dict[str, int] = {}  # what each model added when it last loaded from disk
        # One job, load or unload at a time: an admin's unload waits for the model's running job.
        self._lock = threading.RLock()
        self._ip_weights: IpAdapterWeights | None = None
        self._upscalers: dict[str, UpscalerModel] = {}

    @property
    def _models(self) -> Mapping[str, LoadedModel]:
        """The models held, every tier, least recently used first."""
        return self._cache.entries

    # --- Engine interface -------------------------------------------------------------------
    def device_info(self) -> DeviceInfo:
        return DeviceInfo(
            gpu_available=self.device.type == "cuda",
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
        )

    def acceleration_summary(self) -> str:
        summary = self.acceleration_options.summary()
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
        with self._lock, torch.inference_mode():
            self._model(spec, lambda step, pct: None)
        if self.settings.warm_up_steps > 0:
            warm_task = GenerationTask(
                prompt="warm-up", negative_prompt=None, model=spec.id, steps=self.settings.warm_up_steps,
                guidance_scale=5.0, seed=0,
            )
            self.generate(warm_task, lambda step, pct: None, NO_INPUTS)
            self.stats.warm_up_runs += 1
            options = self.acceleration_options
            if options.compile and options.cache_dir is not None:
                acceleration.save_compile_cache(options.cache_dir)
        self.stats.warm_up_seconds = time.perf_counter() - started
        log.info(
            "warm-up of %s took %.1f s (%s; %d CPU threads)",
            spec.id, self.stats.warm_up_seconds, self.acceleration_summary(), torch.get_num_threads(),
        )

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
            self._ip_weights = None
            self._free_memory()

    def held_models(self) -> dict[str, str]:
        return self._cache.held()

    def model_loads(self) -> int:
        return self.stats.model_loads

    def load_model(self, model_id: str) -> None:
        spec = self.registry.model(model_id)
        if spec is None:
            raise FatalGenerationError(f"unknown model {model_id!r}")
        with self._lock, torch.inference_mode():
            self._model(spec, lambda step, pct: None)

    def unload_model(self, model_id: str) -> None:
        with self._lock:
            self._cache.remove(model_id)

    def generate(
        self, task: GenerationTask, progress: ProgressCallback, inputs: InputImages = NO_INPUTS
    ) -> list[GeneratedImage]:
        try:
            with self._lock, torch.inference_mode():
                return self._make_images(task, progress, inputs)
        except RuntimeError as exc:  # torch.OutOfMemoryError, and the CUDA libraries' own allocation failures
            if is_out_of_memory(exc):
                self._free_memory()
                raise RetryableGenerationError("CUDA out of memory") from exc
            raise

    # --- one job ----------------------------------------------------------------------------
    def _make_images(
        self, task: GenerationTask, progress: ProgressCallback, inputs: InputImages
    ) -> list[GeneratedImage]:
        """The job as the pipeline runs it: check it against the registry, load the model, put its LoRAs and
        IP-Adapter in effect, encode the prompt, choose the pipeline and its sampler, denoise, decode and (for
        inpainting) paste the unmasked pixels back."""
        if task.upscale is not None:
            return [self._upscale_only(task.upscale, inputs, progress)]
        job = self._resolve(task, inputs)
        loaded = self._model(job.spec, progress)
        ip_kwargs = self._apply_adapters(loaded, job, inputs.ip, progress)
        prompt = self._encode_prompt(loaded, job, progress)
        call = self._pipeline_call(loaded, job, inputs)
        if job.mode != "txt2img" and denoising_steps(task) == 0:
            # Strength 0 (or too little to make one step): nothing is denoised; diffusers would fail on an
            # empty schedule. The init image comes back unchanged, as A1111 returns it.
            return self._unchanged(job, prompt, call)
        stop = guidance_stop(job.spec, task, ip_kwargs, call.run)
        first_pass, split = progress, 100
        if task.hires is not None:
            split = _hires_split(task, task.hires)
        refiner = task.refiner if task.refiner is not None and task.refiner.switch_at < 1 else None
        if refiner is not None:
            # the model denoises to switch_at and hands its latents (noisy, undecoded) to the refiner
            split = round(100 * refiner.switch_at)
            call.kwargs["denoising_end"] = refiner.switch_at
        if split < 100:
            first_pass = _progress_share(progress, 0, split)
        with self._job_sampler(loaded, call.run, job.sampler) as scheduler_class:
            latents = self._denoise(loaded, call, task, prompt.embeddings, ip_kwargs, stop, first_pass)
        if task.hires is not None:
            latents = self._hires_pass(
                loaded, job, task.hires, prompt, latents, ip_kwargs, _progress_share(progress, split, 100)
            )
        decoder = loaded.pipe
        if refiner is not None:
            decoder, latents = self._refine(job, refiner, prompt, latents, _progress_share(progress, split, 100))
        decoded = self._decode_all(decoder, latents, progress)
        if job.mode == "inpaint":
            # As A1111 does: the original pixels outside the mask, pasted back over the decoded image (the
            # VAE round trip would otherwise shift them slightly); the mask's grey levels blend the edge.
            decoded = [_overlay(pixels, call.kwargs["image"], call.kwargs["mask_image"]) for _, pixels in decoded]
        metadata = self._metadata(job, prompt, call, scheduler_class, stop)
        return [
            GeneratedImage(image=image, pixels=pixels, extra_metadata=dict(metadata)) for image, pixels in decoded
        ]

    def _hires_pass(
        self,
        loaded: LoadedModel,
        job: _Job,
        hires: HiresChoice,
        prompt: _Prompt,
        latents: torch.Tensor,
        ip_kwargs: dict[str, Any],
        progress: ProgressCallback,
    ) -> torch.Tensor:
        """A1111's hires fix: the first pass upscaled to the final size (its latents resized, ``latent``; or
        decoded, resized with Lanczos or an upscaler model, and encoded again by the img2img pipeline), then
        denoised again at ``hires.denoise`` by the loaded model's img2img pipeline, with the job's prompt,
        sampler, seeds, LoRAs and IP-Adapter. Returns the final latents."""
        task = job.task
        if job.mode != "txt2img" or job.controlnets:
            raise FatalGenerationError("the hires fix is for text-to-image jobs without ControlNets")
        if hires.upscaler == "latent":
            # bilinear, as A1111's "Latent": the latents as the loop holds them (scaled; img2img takes 4-channel
            # input as latents, unencoded)
            cell = int(loaded.pipe.vae_scale_factor)  # pixels per latent cell: SDXL's 8, the demo model's 32
            image: Any = torch.nn.functional.interpolate(
                latents, size=(hires.height // cell, hires.width // cell), mode="bilinear", align_corners=False
            )
        else:
            keep_upcast = self.device.type == "cpu"
            pictures = [_decode(loaded.pipe, latents[i : i + 1], keep_upcast)[0] for i in range(latents.shape[0])]
            image = [self._upscaled(picture, hires, progress) for picture in pictures]
            image = image[0] if len(image) == 1 else image
        second = replace(task, steps=hires.steps or task.steps, strength=hires.denoise, init_image=True)
        run = self._derived(loaded, "img2img")
        call = _PipelineCall(run=run, kwargs={"image": image, "strength": hires.denoise}, strength=hires.denoise)
        if job.spec.guidance_rescale and _takes(run, "guidance_rescale"):
            call.kwargs["guidance_rescale"] = job.spec.guidance_rescale
        stop = guidance_stop(job.spec, second, ip_kwargs, run)
        with self._job_sampler(loaded, run, job.sampler):
            return self._denoise(loaded, call, second, prompt.embeddings, ip_kwargs, stop, progress)

    def _refine(
        self, job: _Job, refiner: RefinerChoice, prompt: _Prompt, latents: torch.Tensor, progress: ProgressCallback
    ) -> tuple[Any, torch.Tensor]:
        """The SDXL refiner's part of an ensemble of experts: its img2img pipeline takes the model's latents at
        ``switch_at`` (``denoising_start``) and finishes them with the job's prompt (read by its one text
        encoder), steps, CFG, sampler and seeds. Returns the pipeline whose VAE decodes them, and the latents."""
        spec = self.registry.model(refiner.model)
        if spec is None or not spec.refiner:
            raise FatalGenerationError(f"{refiner.model!r} is not a refiner of this registry")
        loaded = self._model(spec, lambda step, percent: None)
        run = loaded.pipe
        negative = prompt.negative if prompt.negative.strip() else None
        embeds, negative_embeds, pooled, negative_pooled = run.encode_prompt(
            prompt=prompt.text, negative_prompt=negative, device=_execution_device(run), num_images_per_prompt=1,
            do_classifier_free_guidance=True,  # the pipeline leaves the negative out itself at CFG <= 1
        )
        embeddings = PromptEmbeddings(
            prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative_embeds,
            negative_pooled_prompt_embeds=negative_pooled,
        )
        call = _PipelineCall(run=run, kwargs={"image": latents, "denoising_start": refiner.switch_at})
        with self._job_sampler(loaded, run, job.sampler):
            refined = self._denoise(loaded, call, job.task, embeddings, {}, None, progress)
        return run, refined

    def _upscale_only(self, choice: UpscaleChoice, inputs: InputImages, progress: ProgressCallback) -> GeneratedImage:
        """POST /upscale's job: the input picture upscaled (Lanczos, or the upscaler model tiled, progress and
        cancel between tiles), no model loaded."""
        if inputs.init is None:
            raise FatalGenerationError("an upscale job needs its picture (input role init)")
        target = (choice.width, choice.height)
        progress(STEP_GENERATION, 0)
        if choice.upscaler == "lanczos":
            image = lanczos(inputs.init, target)
        else:
            image = upscale(self._upscaler(choice.upscaler), inputs.init, target,
                            on_tile=lambda done, total: progress(STEP_GENERATION, 100 * done // total))
        progress(STEP_GENERATION, 100)
        pixels = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
        metadata = {"width": choice.width, "height": choice.height, **self._device_metadata()}
        return GeneratedImage(image=image, pixels=pixels, extra_metadata=metadata)

    def _upscaled(self, picture: Image.Image, hires: HiresChoice, progress: ProgressCallback) -> Image.Image:
        """``picture`` at the hires fix's size: resized with Lanczos, or through the registry's upscaler model
        (tiled; a cancel is heard between tiles), then Lanczos to the exact size."""
        target = (hires.width, hires.height)
        if hires.upscaler == "lanczos":
            return lanczos(picture, target)
        # between tiles, the progress callback raises JobCancelled for a cancelled job
        return upscale(self._upscaler(hires.upscaler), picture, target, on_tile=lambda done, total: progress(
            STEP_GENERATION, 0
        ))

    def _upscaler(self, upscaler_id: str) -> UpscalerModel:
        """A registry upscaler model, read once per worker and kept (tens of MB: not counted in the budget)."""
        held = self._upscalers.get(upscaler_id)
        if held is not None:
            return held
        spec = self.registry.upscaler(upscaler_id)
        if spec is None:
            raise FatalGenerationError(f"unknown upscaler {upscaler_id!r}")
        try:
            model = load_upscaler(spec.path, self.device, self.dtype)
        except (OSError, ValueError) as exc:
            raise FatalGenerationError(f"upscaler {upscaler_id!r} could not be loaded: {exc}") from exc
        self._upscalers[upscaler_id] = model
        return model

    def _resolve(self, task: GenerationTask, inputs: InputImages) -> _Job:
        """The task checked against the registry and its input images, with the registry's defaults filled in;
        nothing is loaded yet."""
        spec = self.registry.model(task.model)
        if spec is None:
            raise FatalGenerationError(f"unknown model {task.model!r}")
        if task.num_images < 1:
            raise FatalGenerationError("num_images must be at least 1")
        mode = _mode(task, inputs)
        loras = self._lora_specs(task)
        width, height = _output_size(task, spec, inputs)
        units = self._controlnet_specs(task, spec, inputs)
        return _Job(
            task=task,
            spec=spec,
            mode=mode,
            loras=loras,
            width=width,
            height=height,
            sampler=task.scheduler if task.scheduler is not None else spec.scheduler,
            clip_skip=task.clip_skip if task.clip_skip is not None else spec.clip_skip,
            controlnets=tuple(unit for unit in units if unit[0].scale > 0),
        )

    def _controlnet_specs(
        self, task: GenerationTask, spec: ModelSpec, inputs: InputImages
    ) -> list[tuple[ControlNetChoice, ControlNetSpec, Image.Image]]:
        if len(inputs.controls) != len(task.controlnets):
            raise FatalGenerationError("the job's input images do not match its task (controlnets)")
        units = []
        for choice, image in zip(task.controlnets, inputs.controls, strict=True):
            controlnet = self.registry.controlnet(choice.model)
            if controlnet is None:
                raise FatalGenerationError(f"unknown ControlNet {choice.model!r}")
            if controlnet.base != spec.base:
                raise FatalGenerationError(f"ControlNet {controlnet.id!r} does not fit model {spec.id!r}")
            units.append((choice, controlnet, image))
        if len({controlnet.is_union for _, controlnet, _ in units}) > 1:
            raise FatalGenerationError("ControlNet Union models and plain ControlNets cannot guide one job together")
        return units

    def _embeddings_used(self, loaded: LoadedModel, text: str) -> list[str]:
        """The registry's embeddings of the model's base that ``text`` writes, loaded into the model first
        (once; an embedding added to the registry later is loaded by the first job that writes it)."""
        specs = self.registry.embeddings_for(loaded.spec)
        used = embeddings_module.used_in(text, [spec.name for spec in specs])
        for spec in specs:
            if spec.name in used and spec.name not in loaded.embeddings:
                if not loaded.private_text_encoders:
                    self._private_text_encoders(loaded)  # its rows are this model's, not a sharing model's
                embeddings_module.load_embedding(loaded.pipe, spec)
                loaded.embeddings.add(spec.name)
                loaded.encoder = PromptEncoder(loaded.pipe, _execution_device(loaded.pipe), self.dtype)
        return used

    def _apply_adapters(
        self, loaded: LoadedModel, job: _Job, ip_image: Image.Image | None, progress: ProgressCallback
    ) -> dict[str, Any]:
        """The job's LoRAs and IP-Adapter in effect on the loaded pipeline, and the UNet's attention made to
        suit them; returns the pipeline call's IP-Adapter arguments."""
        progress(STEP_LOADING_LORAS, 0)
        active = [(lora, weight) for lora, weight in job.loras if weight != 0]
        if active and not loaded.private_text_encoders:
            self._private_text_encoders(loaded)
        self.stats.lora_loads += loaded.loras.activate(active)
        ip_kwargs = self._sync_ip_adapter(loaded, job.task.ip_strength, ip_image)
        acceleration.sync_unet_attention(
            loaded.pipe, loaded.acceleration, loaded.loras.any_active, loaded.ip_adapter_attached
        )
        progress(STEP_LOADING_LORAS, 100)
        return ip_kwargs

    def _encode_prompt(self, loaded: LoadedModel, job: _Job, progress: ProgressCallback) -> _Prompt:
        """The prompt with its LoRAs' trigger words, the negative prompt (the registry's when the task has
        none), and their embeddings."""
        progress(STEP_ENCODING_PROMPT, 0)
        task = job.task
        words = {lora.id: lora.trigger_words for lora, _ in job.loras}
        text = add_trigger_words(
            task.prompt, trigger_words_for([(lora.id, weight) for lora, weight in job.loras], words)
        )
        negative = task.negative_prompt if task.negative_prompt is not None else job.spec.default_negative
        if loaded.encoder is None:
            raise FatalGenerationError(f"model {job.spec.id!r} is a refiner: it only finishes other models' jobs")
        used = self._embeddings_used(loaded, text + "\n" + negative)
        encoded_text, encoded_negative = (
            (embeddings_module.expanded(loaded.pipe, text), embeddings_module.expanded(loaded.pipe, negative))
            if used else (text, negative)
        )
        embeddings = loaded.encoder.encode(encoded_text, encoded_negative, job.clip_skip or 1)
        progress(STEP_ENCODING_PROMPT, 100)
        return _Prompt(text=text, negative=negative, embeddings=embeddings, embeddings_used=tuple(used))

    def _pipeline_call(self, loaded: LoadedModel, job: _Job, inputs: InputImages) -> _PipelineCall:
        """The pipeline that runs the job's mode (txt2img: the loaded one; img2img and inpainting: made from
        it; with ControlNets: the ControlNet pipeline of the mode) and the arguments of its call that depend on
        the mode and the model."""
        if job.mode == "txt2img":
            call = _PipelineCall(run=loaded.pipe, kwargs={"width": job.width, "height": job.height})
        else:
            assert inputs.init is not None
            strength = job.task.strength if job.task.strength is not None else DEFAULT_STRENGTH
            kwargs: dict[str, Any] = {"image": _resized(inputs.init, job.width, job.height), "strength": strength}
            if job.mode == "inpaint":
                assert inputs.mask is not None
                mask = _resized(inputs.mask, job.width, job.height)
                kwargs.update(mask_image=mask, width=job.width, height=job.height)
            call = _PipelineCall(run=self._derived(loaded, job.mode), kwargs=kwargs, strength=strength)
        if job.controlnets:
            self._controlled(loaded, job, call)
        if job.spec.guidance_rescale and _takes(call.run, "guidance_rescale"):
            # the SDXL pipelines take it (of the ControlNet ones, inpainting's only); 0 is left out, so that a
            # model without it gets exactly the call it got before the field existed
            call.kwargs["guidance_rescale"] = job.spec.guidance_rescale
        return call

    def _controlled(self, loaded: LoadedModel, job: _Job, call: _PipelineCall) -> None:
        """Turn ``call`` into the ControlNet pipeline's: the job's ControlNets on the device, its control maps
        made and fitted, the pipeline of its mode made from the loaded one (once, then kept)."""
        units = [
            controlnets.Unit(
                choice=choice, spec=spec, control_map=controlnets.control_map(choice, image, job.width, job.height)
            )
            for choice, spec, image in job.controlnets
        ]
        union = units[0].spec.is_union
        modules = [self._controlnet(loaded, unit.spec) for unit in units]
        run = self._derived(loaded, job.mode, controlnet=modules[0], union=union)
        run.controlnet = controlnets.combined(modules, union)
        if job.mode == "img2img":  # txt2img's and inpainting's calls have the size already
            call.kwargs.update(width=job.width, height=job.height)
        call.kwargs.update(controlnets.call_arguments(job.mode, units))
        call.run = run

    @contextmanager
    def _job_sampler(self, loaded: LoadedModel, run: Any, sampler: str | None) -> Iterator[str]:
        """The job's sampler on ``run`` while the block denoises (yields its scheduler class's name); the
        model's own scheduler back after it, whatever happened."""
        scheduler_class = type(loaded.default_scheduler).__name__
        if sampler is not None:
            choice = scheduler_for(sampler)
            scheduler_class = choice.class_name
            if not sampler_available(sampler):
                raise FatalGenerationError(f"the {sampler} sampler needs scipy, which is not installed")
            run.scheduler = build_scheduler(loaded.default_scheduler, choice)
        try:
            yield scheduler_class
        finally:
            run.scheduler = loaded.default_scheduler  # the next job starts from the model's own scheduler
            if run is not loaded.pipe and getattr(loaded.pipe, "_all_hooks", None):
                loaded.pipe.maybe_free_model_hooks()  # CPU offload: the hooks live on the loaded pipeline

    def _decode_all(
        self, pipe: Any, latents: torch.Tensor, progress: ProgressCallback
    ) -> list[tuple[Image.Image, np.ndarray[Any, Any]]]:
        """Each image of the batch through the VAE, one at a time, to a picture and its uint8 pixels."""
        progress(STEP_DECODING, 0)
        keep_upcast = self.device.type == "cpu"
        decoded = [_decode(pipe, latents[index : index + 1], keep_upcast) for index in range(latents.shape[0])]
        progress(STEP_DECODING, 100)
        return decoded

    def _metadata(
        self, job: _Job, prompt: _Prompt, call: _PipelineCall, scheduler_class: str, stop: float | None
    ) -> dict[str, Any]:
        """What each image's PNG records about how it was made (in this order: the bytes depend on it)."""
        sampler = job.sampler
        return {
            **self._prompt_metadata(job, prompt),
            "sampler": sampler if sampler is not None else _SAMPLER_NAMES.get(scheduler_class, scheduler_class),
            "scheduler": sampler if sampler is not None else scheduler_class,
            **({"scheduler_class": scheduler_class} if sampler is not None else {}),
            **({"clip_skip": job.clip_skip} if job.clip_skip is not None else {}),
            **({"guidance_rescale": job.spec.guidance_rescale} if "guidance_rescale" in call.kwargs else {}),
            **({"guidance_stop": stop} if stop is not None else {}),
            **({"strength": call.strength} if call.strength is not None else {}),
            **({"controlnets": [unit.as_dict() for unit in job.task.controlnets]} if job.task.controlnets else {}),
            **self._device_metadata(),
            # no timings here: the same request and seed must give the same file, byte for byte
        }

    @staticmethod
    def _prompt_metadata(job: _Job, prompt: _Prompt) -> dict[str, Any]:
        return {
            "final_prompt": prompt.text,
            "final_negative_prompt": prompt.negative,
            "width": job.width,
            "height": job.height,
            **({"embeddings": list(prompt.embeddings_used)} if prompt.embeddings_used else {}),
        }

    def _device_metadata(self) -> dict[str, Any]:
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}

    def _denoise(
        self,
        loaded: LoadedModel,
        call: _PipelineCall,
        task: GenerationTask,
        embeddings: Any,
        ip_kwargs: dict[str, Any],
        stop: float | None,
        progress: ProgressCallback,
    ) -> torch.Tensor:
        """The pipeline call: ``output_type="latent"``, one generator per image (seed + i); guidance ends
        after ``stop`` of the steps (:func:`guidance_stop`); a preview every ``preview_every_steps`` while a
        job's events ask for one."""
        run = call.run
        cancelled: list[JobCancelled] = []
        preview, every = self.preview, self.settings.preview_every_steps
        make_preview = _preview_maker(loaded)
        fallback_total = denoising_steps(task) or task.steps

        def on_step_end(pipe: Any, step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if preview is not None and wants_preview(step + 1, every):
                preview(step + 1, make_preview(kwargs["latents"]))
            # percent of the denoising loop's real length (img2img: strength x steps; second-order
            # samplers such as Heun run two UNet evaluations per step)
            total = getattr(pipe, "_num_timesteps", None) or fallback_total
            if stop is not None and step + 1 == guided_steps(stop, total) < total:
                kwargs = stop_guidance(pipe, kwargs)
            try:
                progress(STEP_GENERATION, min(100, int(100 * (step + 1) / total)))
            except JobCancelled as exc:
                # diffusers' own way out: the loop skips the remaining steps and the pipeline returns
                # normally, so nothing is left half-done in it for the next job.
                pipe._interrupt = True
                cancelled.append(exc)
            return kwargs

        count = task.num_images
        generator: torch.Generator | list[torch.Generator] = (
            torch.Generator(device="cpu").manual_seed(task.seed)
            if count == 1
            else [torch.Generator(device="cpu").manual_seed(task.seed + index) for index in range(count)]
        )
        progress(STEP_GENERATION, 0)
        output = run(
            prompt_embeds=embeddings.prompt_embeds,
            pooled_prompt_embeds=embeddings.pooled_prompt_embeds,
            negative_prompt_embeds=embeddings.negative_prompt_embeds,
            negative_pooled_prompt_embeds=embeddings.negative_pooled_prompt_embeds,
            num_inference_steps=task.steps,
            guidance_scale=task.guidance_scale,
            generator=generator,
            callback_on_step_end=on_step_end,
            **({"callback_on_step_end_tensor_inputs": callback_inputs(run)} if stop is not None else {}),
            output_type="latent",
            **({"num_images_per_prompt": count} if count > 1 else {}),
            **call.kwargs,
            **ip_kwargs,
        )
        if cancelled:
            raise cancelled[0]  # before decoding: a cancelled job makes no image
        latents: torch.Tensor = output.images
        return latents

    def _unchanged(self, job: _Job, prompt: _Prompt, call: _PipelineCall) -> list[GeneratedImage]:
        """The init image as it came (strength too low for one step), once per image asked for."""
        pixels = np.ascontiguousarray(np.asarray(call.kwargs["image"].convert("RGB"), dtype=np.uint8))
        sampler = job.sampler
        metadata = {
            **self._prompt_metadata(job, prompt),
            **({"sampler": sampler, "scheduler": sampler} if sampler is not None else {}),
            "strength": call.strength,
            "denoising_steps": 0,
            **self._device_metadata(),
        }
        return [
            GeneratedImage(image=Image.fromarray(pixels, "RGB"), pixels=pixels, extra_metadata=dict(metadata))
            for _ in range(job.task.num_images)
        ]

    def _derived(
        self, loaded: LoadedModel, mode: str, controlnet: torch.nn.Module | None = None, union: bool = False
    ) -> Any:
        """The loaded model's img2img or inpaint pipeline, or (``controlnet`` given) its ControlNet pipeline of
        ``mode``: built with ``from_pipe`` once, then kept; its components are re-pointed at the loaded
        pipeline's before each use (the IP-Adapter's image encoder comes and goes there)."""
        key = mode if controlnet is None else f"controlnet-{'union-' if union else ''}{mode}"
        derived = loaded.derived.get(key)
        if derived is None:
            extra: dict[str, Any] = {}
            if controlnet is not None:
                pipeline_class = controlnets.pipeline_class(union, mode)
                extra["controlnet"] = controlnet
            elif mode == "img2img":
                pipeline_class = diffusers.StableDiffusionXLImg2ImgPipeline
            else:
                pipeline_class = diffusers.StableDiffusionXLInpaintPipeline
            # dtype: from_pipe casts every shared component to it, float32 unless told (which would
            # turn the loaded fp16/bf16 weights into a second, float32 copy)
            derived = pipeline_class.from_pipe(loaded.pipe, dtype=self.dtype, **extra)
            derived.set_progress_bar_config(disable=True)
            loaded.derived[key] = derived
        for name, component in loaded.pipe.components.items():
            if name in derived.components and derived.components[name] is not component:
                setattr(derived, name, component)
        return derived

    # --- models -----------------------------------------------------------------------------
    def _model(self, spec: ModelSpec, progress: ProgressCallback) -> LoadedModel:
        """The model ready on the device: as it is, copied back from the RAM tier, or read from disk; least
        recently used models pushed off first as the budget needs (:mod:`.model_cache`), never this one."""
        cache = self._cache
        tier = cache.tier(spec.id)
        if tier == TIER_DEVICE:
            cache.touch(spec.id)
            return cache.entries[spec.id]
        progress(STEP_LOADING_MODEL, 0)
        started = time.perf_counter()
        if tier == TIER_RAM:
            loaded = cache.entries[spec.id]
            cache.make_room(spec.id, cache.incoming_bytes(loaded.weight_modules(), keep=spec.id))
            self._promote(loaded)
            self.stats.ram_switches += 1
            source = TIER_RAM
        else:
            loaded = self._load(spec)
            source = "disk"
        cache.add(spec.id, loaded)
        seconds = time.perf_counter() - started
        self.stats.last_switch = (source, seconds)
        log.info("model %s ready from %s in %.3f s%s", spec.id, source, seconds, _cuda_memory())
        progress(STEP_LOADING_MODEL, 100)
        return loaded

    def _load(self, spec: ModelSpec) -> LoadedModel:
        """Read a model from disk (on CPU), taking the components already held from the models that hold
        them; room made on the device before it goes there."""
        reuse: dict[str, Any] = {}
        hashes: dict[str, str] = {}
        if self.pipeline_loader is load_pipeline:
            hashes = self._hashes.of(spec)
            reuse = self._shared.reusable(hashes)  # held here: pushing their model off keeps them alive
        # Room first for what this model added last time, so that memory peaks at the budget, not above.
        self._cache.make_room(spec.id, self._unique_bytes.get(spec.id, 0))
        pipe = self.pipeline_loader(spec, self.dtype, reuse=reuse) if reuse else self.pipeline_loader(spec, self.dtype)
        self.stats.model_loads += 1
        if reuse:
            self.stats.shared_components += len(reuse)
            self.stats.shared_bytes += storage_bytes(reuse.values())
            log.info("model %s shares %s with a model already held", spec.id, ", ".join(sorted(reuse)))
        self._shared.register(pipe, hashes)
        if spec.timestep_spacing is not None:
            # its own scheduler, and every sampler built from its config (build_scheduler), space timesteps so
            spacing = spec.timestep_spacing
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, timestep_spacing=spacing)
        state = acceleration.prepare(pipe, self.acceleration_options)
        preview_decoder = (
            None
            if spec.preview_decoder is None
            else load_preview_decoder(spec.preview_decoder, torch.device("cpu"), self.dtype)
        )
        parts = (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, preview_decoder)
        modules = [module for module in parts if module is not None]
        incoming = self._cache.incoming_bytes(modules)
        self._unique_bytes[spec.id] = incoming
        self._cache.make_room(spec.id, incoming)
        place_pipeline(pipe, self.device, self.settings)
        acceleration.finish_on_device(pipe, state)
        if preview_decoder is not None:
            preview_decoder = preview_decoder.to(_execution_device(pipe))
        settings = self.settings
        return LoadedModel(
            spec=spec,
            pipe=pipe,
            default_scheduler=pipe.scheduler,
            encoder=None if spec.refiner else PromptEncoder(pipe, _execution_device(pipe), self.dtype),
            acceleration=state,
            loras=lora_switcher(
                pipe, spec.id, self.lora_hotswap, settings.max_loras, settings.lora_hotswap_rank
            ),
            preview_decoder=preview_decoder,
        )

    def _moves_between_tiers(self) -> bool:
        """Whether the RAM tier is another place: on CUDA, without CPU offload (whose hooks place the
        modules themselves). On a CPU both tiers are the same RAM."""
        return self.device.type == "cuda" and self.settings.cpu_offload == "none"

    def _demote(self, loaded: LoadedModel, staying: set[int]) -> None:
        """Into the RAM tier: every module that no model on the device still uses goes to host RAM."""
        if loaded.ip_adapter_attached:
            detach_ip_adapter(loaded.pipe)
            loaded.ip_adapter_attached = False
        if self._moves_between_tiers():
            for module in loaded.weight_modules():
                if id(module) not in staying:
                    module.to("cpu")
            self._reshare_fused(loaded)
            self._free_memory()
        self.stats.models_to_ram += 1

    def _promote(self, loaded: LoadedModel) -> None:
        """Back from the RAM tier: a copy to the device, nothing read from disk."""
        if self._moves_between_tiers():
            for module in loaded.weight_modules():
                module.to(self.device)
            self._reshare_fused(loaded)

    @staticmethod
    def _reshare_fused(loaded: LoadedModel) -> None:
        # a move copies each fused-QKV view on its own: make them views again, or the weights exist twice
        if loaded.acceleration.unet_fusable:
            acceleration.share_fused_weights(loaded.pipe.unet)
            acceleration.share_fused_weights(loaded.pipe.vae)

    def _freed(self, model_id: str) -> None:
        """The cache dropped a model: its memory back to the system (unless a shared module still serves
        another model)."""
        self.stats.models_freed += 1
        log.info("freed model %s", model_id)
        self._free_memory()

    def _free_memory(self) -> None:
        if not self.settings.release_freed_models:
            return
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        host_memory.give_back_freed_memory()

    def _private_text_encoders(self, loaded: LoadedModel) -> None:
        """Before a model's first LoRA: its text encoders leave the shared pool (a LoRA's adapters go into
        them); one that another held model also uses is copied first, so that model never sees the LoRA."""
        pipe = loaded.pipe
        copied = False
        for name in LORA_TARGETS:
            module = getattr(pipe, name, None)
            if module is None or not self._shared.pooled(module):
                continue
            self._shared.forget(module)
            others = [
                other for model_id, other in self._cache.entries.items()
                if model_id != loaded.spec.id and any(m is module for m in other.weight_modules())
            ]
            if others:
                setattr(pipe, name, copy.deepcopy(module))
                copied = True
        if copied:
            loaded.encoder = PromptEncoder(pipe, _execution_device(pipe), self.dtype)
        loaded.private_text_encoders = True

    # --- ControlNets, LoRAs and IP-Adapter -------------------------------------------------------
    def _controlnet(self, loaded: LoadedModel, spec: ControlNetSpec) -> torch.nn.Module:
        """The ControlNet on the device, held with ``loaded``: as it is, taken from another held model of the
        same base (one copy), or read from disk once (room made for it under the model cache's budget)."""
        held = loaded.controlnets.get(spec.id)
        if held is not None:
            return held
        module = next((e.controlnets[spec.id] for e in self._models.values() if spec.id in e.controlnets), None)
        if module is None:
            module = controlnets.load_controlnet(spec, self.dtype)
            if self.acceleration_options.channels_last:
                # as the UNet's: its convolutions (the conditioning embedding runs at the picture's full size on
                # every step) are several times faster in NHWC on a CPU, and on tensor cores
                module.to(memory_format=torch.channels_last)
            self.stats.controlnet_loads += 1
            self._cache.make_room(loaded.spec.id, self._cache.incoming_bytes([module], keep=loaded.spec.id))
        module.to(_execution_device(loaded.pipe))
        loaded.controlnets[spec.id] = module
        log.info("ControlNet %s ready for model %s%s", spec.id, loaded.spec.id, _cuda_memory())
        return module

    # --- LoRAs and IP-Adapter ---------------------------------------------------------------
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

    def _sync_ip_adapter(
        self, loaded: LoadedModel, strength: float, reference: Image.Image | None = None
    ) -> dict[str, Any]:
        """Attached iff this job asks for it; returns the pipeline call's extra arguments. ``reference``:
        the job's own reference image (``ip_image``), used instead of the registry's."""
        pipe = loaded.pipe
        if reference is not None and strength <= 0:
            raise FatalGenerationError("ip_image needs ip_strength > 0")
        if strength <= 0:
            if loaded.ip_adapter_attached:
                detach_ip_adapter(pipe)
                loaded.ip_adapter_attached = False
            return {}
        if self._ip_weights is None:
            self._ip_weights = load_ip_adapter_weights(self.registry.ip_adapter)
            self.stats.ip_adapter_loads += 1
        if not loaded.ip_adapter_attached:
            attach_ip_adapter(pipe, self._ip_weights, _execution_device(pipe), self.dtype)
            loaded.ip_adapter_attached = True
        pipe.set_ip_adapter_scale(strength)
        return {"ip_adapter_image": reference if reference is not None else self._ip_weights.reference}


def _takes(pipe: Any, argument: str) -> bool:
    """Whether the pipeline's call has this argument."""
    return argument in _call_parameters(pipe.__class__)


@cache
def _call_parameters(pipeline_class: Any) -> frozenset[str]:
    # read once per pipeline class: a signature is rebuilt on every inspect call, and this runs for every job
    return frozenset(inspect.signature(pipeline_class.__call__).parameters)


def _preview_maker(loaded: LoadedModel) -> Callable[[torch.Tensor], bytes]:
    """A step's latents to a preview JPEG: by the registry's TAESDXL when it names one, else by the model's
    linear latent-to-RGB map (its registry entry's ``latent_rgb``)."""
    if loaded.preview_decoder is not None:
        return partial(decoder_preview, loaded.preview_decoder)
    return partial(latents_preview, latent_rgb=loaded.spec.latent_rgb)


def _mode(task: GenerationTask, inputs: InputImages) -> str:
    """"txt2img", "img2img" or "inpaint", from the images the job really has."""
    if task.init_image != (inputs.init is not None) or task.mask_image != (inputs.mask is not None):
        raise FatalGenerationError("the job's input images do not match its task (init_image / mask_image)")
    if task.ip_image != (inputs.ip is not None):
        raise FatalGenerationError("the job's input images do not match its task (ip_image)")
    if inputs.mask is not None and inputs.init is None:
        raise FatalGenerationError("mask_image needs an init_image")
    if inputs.init is None:
        return "txt2img"
    return "inpaint" if inputs.mask is not None else "img2img"


def _output_size(task: GenerationTask, spec: ModelSpec, inputs: InputImages) -> tuple[int, int]:
    """(width, height): the task's, else the init image's (rounded down to multiples of 8, as diffusers
    does), else the model's native square."""
    if task.width is not None and task.height is not None:
        return task.width, task.height
    if inputs.init is not None:
        width, height = inputs.init.size
        return max(8, width - width % 8), max(8, height - height % 8)
    return spec.size, spec.size


def _resized(image: Image.Image, width: int, height: int) -> Image.Image:
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.NEAREST if image.mode == "L" else Image.Resampling.LANCZOS)


def _overlay(
    generated: np.ndarray[Any, Any], init: Image.Image, mask: Image.Image
) -> tuple[Image.Image, np.ndarray[Any, Any]]:
    alpha = np.asarray(mask.convert("L"), dtype=np.float32)[..., None] / 255.0
    original = np.asarray(init.convert("RGB"), dtype=np.float32)
    blended = original * (1.0 - alpha) + generated.astype(np.float32) * alpha
    pixels = np.ascontiguousarray(np.clip(blended.round(), 0, 255).astype(np.uint8))
    return Image.fromarray(pixels, "RGB"), pixels


def _cuda_memory() -> str:
    """CUDA's allocated and reserved memory, for the log line of each model switch ("" without CUDA)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return ""
    mib = 1 << 20
    return (
        f" (CUDA allocated {torch.cuda.memory_allocated() // mib} MiB,"
        f" reserved {torch.cuda.memory_reserved() // mib} MiB)"
    )


def _execution_device(pipe: Any) -> torch.device:
    device: torch.device = pipe._execution_device
    return device


def _hires_split(task: GenerationTask, hires: HiresChoice) -> int:
    """Where the first pass ends on a hires job's progress bar (0-100): the two passes' denoising steps."""
    first = task.steps
    second = max(1, int((hires.steps or task.steps) * hires.denoise))
    return round(100 * first / (first + second))


def _progress_share(progress: ProgressCallback, start: int, end: int) -> ProgressCallback:
    """``progress`` with the generation step's 0-100 mapped onto ``start``-``end`` (one pass of several); the
    other steps as they come."""

    def report(step: str, percent: int) -> None:
        if step == STEP_GENERATION:
            percent = start + (end - start) * percent // 100
        progress(step, percent)

    return report


def _decode(
    pipe: Any, latents: torch.Tensor, keep_upcast: bool = False
) -> tuple[Image.Image, np.ndarray[Any, Any]]:
    """Latents to RGB, as the pipeline's own ``output_type="pil"`` does, keeping the uint8 array for the
    PNG writer.

    ``keep_upcast``: a VAE cast to float32 for the decode stays in float32 (on a CPU, where memory is
    plentiful: casting SDXL's VAE there and back took ~0.15 s per job); otherwise it is cast back, as on a
    GPU, whose memory is scarce."""
    vae = pipe.vae
    # SDXL's original VAE overflows in fp16 (black images): decode it in fp32 unless it is fp16-safe
    # (the fp16-fix VAE's config says force_upcast: false). The same for bf16 (CPUs): the demo model's VAE
    # (set by hand, exact colours) needs fp32's precision, and SDXL's loses detail in bf16. diffusers' own
    # img2img encoder already upcasts for any dtype when force_upcast is set (and casts it back after).
    original_dtype = vae.dtype
    upcast = original_dtype in (torch.float16, torch.bfloat16) and bool(vae.config.force_upcast)
    try:
        if upcast:  # inside: an out-of-memory half way through the cast still puts the whole VAE back
            vae.to(dtype=torch.float32)
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
    except BaseException:
        if upcast:
            vae.to(dtype=original_dtype)
        raise
    if upcast and not keep_upcast:
        vae.to(dtype=original_dtype)
    floats = pipe.image_processor.postprocess(decoded, output_type="np")
    pixels = np.ascontiguousarray((floats[0] * 255).round().astype(np.uint8))
    return Image.fromarray(pixels, "RGB"), pixels
