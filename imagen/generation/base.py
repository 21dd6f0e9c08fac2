"""The generator interface between the job system and an engine.

The job system hands an engine a :class:`GenerationTask` (validated request, ids resolved against the
registry, seed fixed) and a progress callback; the engine returns a :class:`GeneratedImage`. Engines run
in worker processes only. This module imports neither torch nor diffusers.
"""

from __future__ import annotations

import io
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from imagen.config import CONTROLNETS_PER_REQUEST_CAP, Settings
from imagen.inputs.control_maps import DEFAULT_HIGH_THRESHOLD, DEFAULT_LOW_THRESHOLD
from imagen.registry import Registry

# Step names reported in ``meta.step`` (the reference shows ``generation_gpu`` for denoising).
STEP_LOADING_MODEL = "loading_model"
STEP_LOADING_LORAS = "loading_loras"
STEP_ENCODING_PROMPT = "encoding_prompt"
STEP_GENERATION = "generation_gpu"
STEP_DECODING = "decoding"
STEP_SAVING = "saving"

# Where a worker holds a model: "device" is ready to run (on the GPU, or in RAM on a CPU-only worker); "ram" was
# pushed off the GPU into host RAM, so bringing it back is a copy, not a read from disk.
TIER_DEVICE = "device"
TIER_RAM = "ram"
MODEL_TIERS = (TIER_DEVICE, TIER_RAM)

# Where each step lies on the whole job's 0-100 scale (``meta.progress``), in the order engines go through
# them; a report's own percent (of that step's work) moves the job across the step's band. Denoising is
# nearly all of a job's time.
PROGRESS_BANDS: dict[str, tuple[int, int]] = {
    STEP_LOADING_MODEL: (0, 5),
    STEP_LOADING_LORAS: (5, 8),
    STEP_ENCODING_PROMPT: (8, 10),
    STEP_GENERATION: (10, 90),
    STEP_DECODING: (90, 98),
    STEP_SAVING: (98, 100),
}


@dataclass(frozen=True)
class LoraChoice:
    name: str
    weight: float

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weight": self.weight}


@dataclass(frozen=True)
class ControlNetChoice:
    """One ControlNet unit of a job; its control image travels beside the task (role ``control<i>``)."""

    model: str
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocessor: str = "none"
    resize_mode: str = "crop"
    control_type: str | None = None
    low_threshold: int = DEFAULT_LOW_THRESHOLD
    high_threshold: int = DEFAULT_HIGH_THRESHOLD
    processor_res: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "scale": self.scale, "start": self.start, "end": self.end,
            "preprocessor": self.preprocessor, "resize_mode": self.resize_mode, "control_type": self.control_type,
            "low_threshold": self.low_threshold, "high_threshold": self.high_threshold,
            "processor_res": self.processor_res,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ControlNetChoice:
        return cls(
            model=str(data["model"]),
            scale=float(data.get("scale", 1.0)),
            start=float(data.get("start", 0.0)),
            end=float(data.get("end", 1.0)),
            preprocessor=str(data.get("preprocessor", "none")),
            resize_mode=str(data.get("resize_mode", "crop")),
            control_type=data.get("control_type"),
            low_threshold=int(data.get("low_threshold", DEFAULT_LOW_THRESHOLD)),
            high_threshold=int(data.get("high_threshold", DEFAULT_HIGH_THRESHOLD)),
            processor_res=_optional_int(data.get("processor_res")),
        )


@dataclass(frozen=True)
class UpscaleChoice:
    """A job that only upscales its input picture (role ``init``) to ``width`` x ``height`` with ``upscaler``
    (``lanczos`` or a registry upscaler's id): no model runs. ``scale``: what was asked, for the metadata."""

    width: int
    height: int
    upscaler: str = "lanczos"
    scale: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height, "upscaler": self.upscaler, "scale": self.scale}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UpscaleChoice:
        scale = data.get("scale")
        return cls(width=int(data["width"]), height=int(data["height"]), upscaler=str(data.get("upscaler", "lanczos")),
                   scale=None if scale is None else float(scale))


@dataclass(frozen=True)
class RefinerChoice:
    """A job's SDXL refiner (ensemble of experts): the model denoises to ``switch_at`` of the schedule and the
    refiner ``model`` finishes from there, on the same latents."""

    model: str
    switch_at: float = 0.8

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "switch_at": self.switch_at}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RefinerChoice:
        return cls(model=str(data["model"]), switch_at=float(data.get("switch_at", 0.8)))


@dataclass(frozen=True)
class HiresChoice:
    """A job's hires fix, as the submission resolved it: after the first pass, upscale to ``width`` x ``height``
    with ``upscaler`` (``latent``, ``lanczos`` or a registry upscaler's id), then ``steps`` of img2img at
    ``denoise``. ``scale`` is what was asked (for the metadata); None when a target size was."""

    width: int
    height: int
    upscaler: str = "latent"
    steps: int = 0  # 0: the job's own steps
    denoise: float = 0.5
    scale: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "width": self.width, "height": self.height, "upscaler": self.upscaler, "steps": self.steps,
            "denoise": self.denoise, "scale": self.scale,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HiresChoice:
        scale = data.get("scale")
        return cls(
            width=int(data["width"]),
            height=int(data["height"]),
            upscaler=str(data.get("upscaler", "latent")),
            steps=int(data.get("steps", 0)),
            denoise=float(data.get("denoise", 0.5)),
            scale=None if scale is None else float(scale),
        )


@dataclass(frozen=True)
class GenerationTask:
    """Everything an engine needs for one image; plain data, JSON-serialisable via ``as_dict``."""

    prompt: str
    negative_prompt: str | None
    model: str
    loras: tuple[LoraChoice, ...] = ()
    steps: int = 30
    guidance_scale: float = 7.5
    seed: int = 0
    ip_strength: float = 0.0
    # Optional fields, added after the first ones; each is left out of ``as_dict`` while it has its default,
    # so a request that uses none of them gives the same task dict, metadata and PNG bytes as before.
    width: int | None = None  # None: the model's native square (``spec.size``), or the init image's size
    height: int | None = None
    num_images: int = 1  # image i uses seed + i
    scheduler: str | None = None  # an A1111 sampler name (imagen.generation.samplers); None: registry default
    clip_skip: int | None = None  # 1 or 2, A1111's numbering; None: the registry default, else 1
    strength: float | None = None  # img2img / inpaint denoising strength; None without an init image
    init_image: bool = False  # whether the job has these input images (the images travel beside the task)
    mask_image: bool = False
    ip_image: bool = False
    controlnets: tuple[ControlNetChoice, ...] = ()
    # Which settings the request left out and who chose them: {"steps": "LoRA lcm", "scheduler": "model turbo"}.
    # Only settings that did not come from the API reference's defaults are named.
    defaults_from: tuple[tuple[str, str], ...] = ()
    hires: HiresChoice | None = None
    refiner: RefinerChoice | None = None
    upscale: UpscaleChoice | None = None  # an upscale-only job (POST /upscale)

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "model": self.model,
            "loras": [lora.as_dict() for lora in self.loras],
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "seed": self.seed,
            "ip_strength": self.ip_strength,
        }
        for key, default in _OPTIONAL_DEFAULTS.items():
            value = getattr(self, key)
            if value != default:
                data[key] = value
        if self.controlnets:
            data["controlnets"] = [unit.as_dict() for unit in self.controlnets]
        if self.defaults_from:
            data["defaults_from"] = dict(self.defaults_from)
        if self.hires is not None:
            data["hires"] = self.hires.as_dict()
        if self.refiner is not None:
            data["refiner"] = self.refiner.as_dict()
        if self.upscale is not None:
            data["upscale"] = self.upscale.as_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationTask:
        return cls(
            prompt=data["prompt"],
            negative_prompt=data.get("negative_prompt"),
            model=data["model"],
            loras=tuple(LoraChoice(lo["name"], float(lo["weight"])) for lo in data.get("loras", [])),
            steps=int(data["steps"]),
            guidance_scale=float(data["guidance_scale"]),
            seed=int(data["seed"]),
            ip_strength=float(data.get("ip_strength", 0.0)),
            width=_optional_int(data.get("width")),
            height=_optional_int(data.get("height")),
            num_images=int(data.get("num_images", 1)),
            scheduler=data.get("scheduler"),
            clip_skip=_optional_int(data.get("clip_skip")),
            strength=None if data.get("strength") is None else float(data["strength"]),
            init_image=bool(data.get("init_image", False)),
            mask_image=bool(data.get("mask_image", False)),
            ip_image=bool(data.get("ip_image", False)),
            controlnets=tuple(ControlNetChoice.from_dict(unit) for unit in data.get("controlnets", [])),
            defaults_from=tuple((str(name), str(source)) for name, source in data.get("defaults_from", {}).items()),
            hires=HiresChoice.from_dict(data["hires"]) if data.get("hires") else None,
            refiner=RefinerChoice.from_dict(data["refiner"]) if data.get("refiner") else None,
            upscale=UpscaleChoice.from_dict(data["upscale"]) if data.get("upscale") else None,
        )


_OPTIONAL_DEFAULTS: dict[str, Any] = {
    "width": None,
    "height": None,
    "num_images": 1,
    "scheduler": None,
    "clip_skip": None,
    "strength": None,
    "init_image": False,
    "mask_image": False,
    "ip_image": False,
}


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


# img2img / inpainting strength when a job with an init image names none (A1111's default; the API sets it)
DEFAULT_STRENGTH = 0.75


def denoising_steps(task: GenerationTask) -> int:
    """How many denoising steps the job really runs: ``steps``, or for img2img / inpainting
    ``int(steps * strength)`` as diffusers counts them (strength 0.5 of 30 steps: 15; 0: none, the init
    image comes back as it is). ``meta.total_steps`` shows this number."""
    if task.init_image:
        strength = task.strength if task.strength is not None else DEFAULT_STRENGTH
        return max(0, min(int(task.steps * strength), task.steps))
    return task.steps


def control_role(index: int) -> str:
    """The stored role of a job's ControlNet unit ``index``'s control image."""
    return f"control{index}"


CONTROL_ROLES = tuple(control_role(index) for index in range(CONTROLNETS_PER_REQUEST_CAP))
INPUT_ROLES = ("init", "mask", "ip", *CONTROL_ROLES)


@dataclass(frozen=True)
class InputImages:
    """A job's input images, decoded: ``init``, ``ip`` and each ControlNet unit's control image RGB, ``mask``
    mode "L" (white = repaint)."""

    init: Image.Image | None = None
    mask: Image.Image | None = None
    ip: Image.Image | None = None
    controls: tuple[Image.Image, ...] = ()

    @classmethod
    def from_png_bytes(cls, images: Mapping[str, bytes]) -> InputImages:
        """Decode the job's stored input images (PNG bytes by role: "init", "mask", "ip", "control<i>"),
        which the API side has already validated, EXIF-rotated and flattened."""
        unknown = set(images) - set(INPUT_ROLES)
        if unknown:
            raise ValueError(f"unknown input image roles: {', '.join(sorted(unknown))}")
        decoded: dict[str, Image.Image] = {}
        for role, data in images.items():
            with Image.open(io.BytesIO(data)) as opened:
                decoded[role] = opened.convert("L" if role == "mask" else "RGB")
        controls = []
        for role in CONTROL_ROLES:
            if role not in decoded:
                break
            controls.append(decoded[role])
        return cls(init=decoded.get("init"), mask=decoded.get("mask"), ip=decoded.get("ip"), controls=tuple(controls))


NO_INPUTS = InputImages()  # a text-to-image job's inputs


@dataclass
class GeneratedImage:
    """An engine's result: the RGB image and what it actually did (final prompt, size, sampler...)."""

    image: Image.Image
    extra_metadata: dict[str, Any] = field(default_factory=dict)
    # The same pixels as an RGB uint8 array (H, W, 3), when the engine already holds them: the PNG writer
    # then reads them directly instead of copying them back out of the PIL image.
    pixels: np.ndarray[Any, np.dtype[np.uint8]] | None = None

    def rgb_pixels(self) -> np.ndarray[Any, np.dtype[np.uint8]]:
        if self.pixels is not None:
            return self.pixels
        rgb = self.image if self.image.mode == "RGB" else self.image.convert("RGB")
        return np.asarray(rgb)


# preview(step, jpeg): a small JPEG of the image as it stands after denoising step ``step`` (1-based), for
# ``GET /events?preview=1``. Event-only: never stored, and lost when nobody listens.
PreviewCallback = Callable[[int, bytes], None]

# progress(step_name, percent 0-100). It raises ``imagen.errors.JobCancelled`` once the job is cancelled:
# engines call it at least once per denoising step and let that exception pass.
ProgressCallback = Callable[[str, int], None]


class JobProgress:
    """``meta.progress``: one number for the whole job, 0-100, that never goes back (a progress bar reads it;
    ``meta.step`` says which step runs), from the reports engines make, each a percent of its own step
    (``PROGRESS_BANDS``). A step name with no band (an engine's own) leaves the number where it is. One per
    attempt: both job backends turn each report into this number before they store it."""

    def __init__(self) -> None:
        self.value = 0

    def __call__(self, step: str, percent: int) -> int:
        band = PROGRESS_BANDS.get(step)
        if band is not None:
            low, high = band
            self.value = max(self.value, low + (high - low) * max(0, min(100, percent)) // 100)
        return self.value


class StepMeter:
    """Where a job's denoising stands, for ``meta`` (``current_step``, ``total_steps``, ``eta_s``), from the
    reports engines already make: ``STEP_GENERATION`` with the percent of ``total_steps`` done. With at most
    100 steps each percent value maps back to one step count (engines round the percent down), so engines
    need no second callback. ``eta_s``: the seconds of denoising left at the pace so far (None before the
    first step ends). One meter per job."""

    def __init__(self, total_steps: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.total_steps = total_steps
        self.clock = clock
        self._began: float | None = None

    def __call__(self, step: str, percent: int) -> dict[str, Any] | None:
        """The denoising details of this report; None outside denoising."""
        if step != STEP_GENERATION:
            return None
        now = self.clock()
        if self._began is None:
            self._began = now
        current = min(self.total_steps, -(-percent * self.total_steps // 100))
        eta_s = round((now - self._began) / current * (self.total_steps - current), 2) if current else None
        return {"current_step": current, "total_steps": self.total_steps, "eta_s": eta_s}


@dataclass(frozen=True)
class DeviceInfo:
    gpu_available: bool
    device: str
    dtype: str | None = None


class Engine(ABC):
    """A generation engine, built once per worker process and reused for every job it runs."""

    # Where the running job's previews go (every ``settings.preview_every_steps`` denoising steps), set by
    # ``runner.run_task`` for the job's duration; an engine that makes none ignores it.
    preview: PreviewCallback | None = None

    def __init__(self, registry: Registry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings

    @abstractmethod
    def device_info(self) -> DeviceInfo:
        """Where this engine computes (reported by ``/health``)."""

    def warm_up(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Called once when the worker starts, before the first job (e.g. build/compile the default model)."""

    @abstractmethod
    def generate(
        self, task: GenerationTask, progress: ProgressCallback, inputs: InputImages = NO_INPUTS
    ) -> list[GeneratedImage]:
        """Make ``task.num_images`` images (image i with seed ``task.seed + i``), in one batch where the
        engine can, using the job's input images (img2img, inpainting, IP-Adapter reference).
        Raise ``RetryableGenerationError`` / ``FatalGenerationError`` on purpose;
        any other exception is classified by the worker (out-of-memory retries, the rest fails)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release memory (called when the worker stops)."""

    def held_models(self) -> dict[str, str]:
        """The models this engine holds now, each with its tier (one of ``MODEL_TIERS``), for the worker's
        heartbeat: job routing sends a model's jobs to the workers that hold it."""
        return {}

    def model_loads(self) -> int:
        """How many models this engine has read from disk since it started (``/metrics``; a switch back from
        the host-RAM tier is no load)."""
        return 0

    def load_model(self, model_id: str) -> None:  # noqa: B027 - optional hook, nothing to load by default
        """Load the model ahead of its jobs (an admin's ``POST /models/{id}/load``), as a job would."""

    def unload_model(self, model_id: str) -> None:  # noqa: B027 - optional hook, nothing held by default
        """Free the model from every tier (an admin's ``POST /models/{id}/unload``, a model removed from the
        registry); a model that is not held is no error."""
