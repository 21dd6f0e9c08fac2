"""What a registry declares: the models, LoRAs, ControlNets and IP-Adapter this server offers, as one YAML file
writes them.

Requests name models and LoRAs by id only; paths live in the registry and nowhere else.
See ``registry.example.yaml`` for the documented format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    PrivateAttr,
    StrictBool,
    field_validator,
    model_validator,
)

from imagen.errors import RegistryError
from imagen.registry.demo_model import DEMO_LATENT_RGB, DEMO_LATENT_RGB_BIAS, DEMO_MODEL_DIR
from imagen.sampler_names import SAMPLER_NAMES, is_sampler_name

ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
BASE_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,31}$"
SDXL_BASE = "sdxl"
DEMO_BASE = "demo-shapes"

# The control types of a ControlNet Union (xinsir's ControlNet++ for SDXL), in the order of its
# ``control_type`` vector: diffusers' ``ControlNetUnionModel`` takes each type as its index here.
UNION_CONTROL_TYPES = ("openpose", "depth", "softedge", "canny", "normal", "segment", "tile", "repaint")

Rgb = tuple[FiniteFloat, FiniteFloat, FiniteFloat]


# The hard bounds of any request, whatever a registry says: AUTOMATIC1111's own step limit, and guidance from 0
# (Turbo-style models sample without classifier-free guidance) to the reference's 30.
STEPS_CAP = 150
GUIDANCE_CAP = 30.0


class StepRange(BaseModel):
    """The denoising steps a model (or a LoRA) takes: the range a request must stay in, and its default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: int = Field(ge=1, le=STEPS_CAP)
    max: int = Field(ge=1, le=STEPS_CAP)
    default: int = Field(ge=1, le=STEPS_CAP)

    @model_validator(mode="after")
    def _ordered(self) -> StepRange:
        if not self.min <= self.default <= self.max:
            raise ValueError(f"steps: min <= default <= max, not {self.min}, {self.default}, {self.max}")
        return self


class GuidanceRange(BaseModel):
    """The CFG scale a model (or a LoRA) takes: the range a request must stay in, and its default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: float = Field(ge=0.0, le=GUIDANCE_CAP, allow_inf_nan=False)
    max: float = Field(ge=0.0, le=GUIDANCE_CAP, allow_inf_nan=False)
    default: float = Field(ge=0.0, le=GUIDANCE_CAP, allow_inf_nan=False)

    @model_validator(mode="after")
    def _ordered(self) -> GuidanceRange:
        if not self.min <= self.default <= self.max:
            raise ValueError(f"guidance_scale: min <= default <= max, not {self.min}, {self.default}, {self.max}")
        return self


# The API reference's numbers: every model whose entry says nothing of its own takes these.
REFERENCE_STEPS = StepRange(min=10, max=100, default=30)
REFERENCE_GUIDANCE = GuidanceRange(min=1.0, max=30.0, default=7.5)
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


class LatentRgb(BaseModel):
    """A linear map from a model's 4 latent channels, scaled as the denoising loop holds them, to RGB in
    [-1, 1]: how ``GET /events?preview=1`` previews are drawn without the VAE. ``factors``: one (R, G, B) row
    per latent channel; ``bias``: added to every pixel."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    factors: tuple[Rgb, Rgb, Rgb, Rgb]
    bias: Rgb = (0.0, 0.0, 0.0)


SDXL_LATENT_RGB = LatentRgb(
    #         R        G        B
    factors=(
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
    bias=(0.1084, -0.0175, -0.0011),
)
"""SDXL's approximation, every model's unless its entry gives its own: the coefficients ComfyUI uses for its
SDXL "Latent2RGB" previews (``comfy/latent_formats.py``, class ``SDXL``: ``latent_rgb_factors`` and
``latent_rgb_factors_bias``), fitted on SDXL's scaled latents."""


class ModelSpec(BaseModel):
    """A base model: an SDXL diffusers folder or a single-file ``.safetensors`` checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=ID_PATTERN)
    name: str
    description: str = ""
    path: Path | None = Field(None, description="Diffusers folder or single-file .safetensors checkpoint.")
    vae_path: str | None = Field(None, description="Optional VAE override (diffusers folder or .safetensors).")
    preview_decoder: Path | None = Field(
        None, description="Optional TAESDXL (diffusers AutoencoderTiny folder) for /events previews."
    )
    default_negative: str = ""
    prefix: str | None = Field(None, pattern=r"^[A-Za-z0-9_]{1,40}$", description="File-name prefix.")
    size: int = Field(1024, ge=64, le=4096, multiple_of=8, description="Native square resolution.")
    demo: StrictBool = Field(
        False,
        description="The built-in demo model (trained on shapes, shipped in the package): its folder (`path`) "
        "and its exact latent-to-RGB map (`latent_rgb`) come with it, unless the entry gives its own.",
    )
    latent_rgb: LatentRgb = Field(
        SDXL_LATENT_RGB,
        description="Linear map from the 4 latent channels to RGB for /events previews (without a "
        "preview_decoder): `factors` (one R, G, B row per channel) and `bias`. Default: SDXL's approximation.",
    )
    scheduler: str | None = Field(
        None, description="Default sampler for this model's jobs, by its A1111 name (see GET /schedulers)."
    )
    steps: StepRange = Field(
        REFERENCE_STEPS,
        description="The steps its jobs may ask for, and their default (`{min, max, default}`; default: the "
        "reference's 10-100, 30). A few-step model (Lightning, Turbo, Hyper-SD) sets its own, e.g. 4-8, 6.",
    )
    guidance_scale: GuidanceRange = Field(
        REFERENCE_GUIDANCE,
        description="The CFG scale its jobs may ask for, and their default (`{min, max, default}`; default: the "
        "reference's 1.0-30.0, 7.5). Turbo-style models: 0-1.",
    )
    timestep_spacing: str | None = Field(
        None,
        description="How its samplers space their timesteps: `leading`, `trailing` (what few-step models are "
        "distilled for) or `linspace`; a sampler that sets its own (Euler SGM Uniform) keeps it. Absent: the "
        "model's own scheduler config.",
    )
    refiner: StrictBool = Field(
        False,
        description="An SDXL refiner (one text encoder, aesthetic-score conditioning): it finishes the pictures of "
        "the models of its `base` (a request's `refiner.model`) and draws none itself.",
    )
    default_refiner: str | None = Field(
        None, description="A refiner (the id of a `refiner: true` entry) that finishes this model's jobs unless a "
        "request says `\"refiner\": null`."
    )
    clip_skip: int | None = Field(None, ge=1, le=2, description="Default clip skip (A1111's numbering), e.g. 2.")
    guidance_rescale: float = Field(
        0.0, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Guidance rescale (phi of Lin et al. 2023) for this model's jobs, 0-1; 0.7 suits "
        "zero-terminal-SNR v-prediction models. 0: plain classifier-free guidance.",
    )
    guidance_stop: float = Field(
        1.0, gt=0.0, le=1.0, allow_inf_nan=False,
        description="Share of the denoising steps after which classifier-free guidance stops, for this model's "
        "jobs (0 < x <= 1; the later steps run on the prompt alone, at half the cost). 1: guided to the end.",
    )
    base: str = Field(
        SDXL_BASE, pattern=BASE_PATTERN,
        description="The architecture family it belongs to: a ControlNet fits the models of its own `base`. "
        "Default `sdxl`; the demo model is `demo-shapes`.",
    )
    # ``vae_path`` as the registry file writes it (``vae_path`` itself is resolved for loading): /models
    # shows this one, never a path of the server's disk the file did not write.
    _declared_vae_path: str | None = PrivateAttr(None)

    @property
    def declared_vae_path(self) -> str | None:
        return self._declared_vae_path if self._declared_vae_path is not None else self.vae_path

    @property
    def file_prefix(self) -> str:
        return self.prefix or self.id.replace("-", "_").replace(".", "_")

    @field_validator("scheduler")
    @classmethod
    def _known_sampler(cls, name: str | None) -> str | None:
        return _known_sampler_name(name)

    @field_validator("timestep_spacing")
    @classmethod
    def _known_spacing(cls, spacing: str | None) -> str | None:
        if spacing is not None and spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing: one of {', '.join(TIMESTEP_SPACINGS)}, not {spacing!r}")
        return spacing

    @model_validator(mode="before")
    @classmethod
    def _demo_files(cls, data: Any) -> Any:
        """``demo: true`` names the shipped demo model: the entry gets its folder and its exact latent map
        (its latents are mean colours) unless it gives its own, so nothing that loads a model or draws its
        previews asks which model it is."""
        if isinstance(data, dict) and data.get("demo") is True:
            demo_data = {
                "path": DEMO_MODEL_DIR,
                "base": DEMO_BASE,
                "latent_rgb": {"factors": DEMO_LATENT_RGB, "bias": DEMO_LATENT_RGB_BIAS},
            }
            data = {**data, **{name: value for name, value in demo_data.items() if data.get(name) is None}}
        return data

    @model_validator(mode="after")
    def _needs_path(self) -> ModelSpec:
        if self.path is None:
            raise ValueError(f"model {self.id!r}: `path` is required")
        return self


def _known_sampler_name(name: str | None) -> str | None:
    if name is not None and not is_sampler_name(name):
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SAMPLER_NAMES)}")
    return name


class LoraNeeds(BaseModel):
    """What a LoRA needs to draw well (an LCM-LoRA: the LCM sampler, 4-8 steps, guidance 1-2). A job that uses
    it and does not say otherwise gets these; its steps and guidance must then stay in these ranges."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scheduler: str | None = Field(None, description="The sampler its jobs get unless they name one.")
    steps: StepRange | None = None
    guidance_scale: GuidanceRange | None = None

    @field_validator("scheduler")
    @classmethod
    def _known_sampler(cls, name: str | None) -> str | None:
        return _known_sampler_name(name)


class LoraSpec(BaseModel):
    """A LoRA / LyCORIS file (kohya or diffusers/PEFT key layout, ``.safetensors`` only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=ID_PATTERN)
    name: str
    description: str = ""
    path: Path
    default_weight: float = Field(0.8, ge=0.0, le=2.0, allow_inf_nan=False)
    trigger_words: list[str] | None = None
    needs: LoraNeeds | None = Field(
        None, description="What it needs to draw well (`scheduler`, `steps`, `guidance_scale`), e.g. an LCM-LoRA."
    )

    @field_validator("trigger_words")
    @classmethod
    def _no_blank_words(cls, words: list[str] | None) -> list[str] | None:
        if words is not None and any(not word.strip() for word in words):
            raise ValueError("trigger words must not be blank")
        return words or None


class ControlNetSpec(BaseModel):
    """A ControlNet: a diffusers folder or one ``.safetensors`` file (diffusers or original key layout); a
    ControlNet Union when it lists ``control_types``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=ID_PATTERN)
    name: str
    description: str = ""
    path: Path = Field(description="Diffusers folder (config.json + safetensors) or one .safetensors file.")
    base: str = Field(SDXL_BASE, pattern=BASE_PATTERN, description="The models it fits: those of this base.")
    control_types: list[str] | None = Field(
        None,
        description="A ControlNet Union: the control types it supports (of "
        f"{', '.join(UNION_CONTROL_TYPES)}); a request then names one per unit. Absent: a plain ControlNet.",
    )

    @field_validator("control_types")
    @classmethod
    def _known_control_types(cls, types: list[str] | None) -> list[str] | None:
        if types is None:
            return None
        unknown = [name for name in types if name not in UNION_CONTROL_TYPES]
        if unknown or not types or len(set(types)) != len(types):
            raise ValueError(
                f"control_types: a non-empty list without repeats, of {', '.join(UNION_CONTROL_TYPES)}"
                + (f" (unknown: {', '.join(unknown)})" if unknown else "")
            )
        return types

    @property
    def is_union(self) -> bool:
        return self.control_types is not None


class IpAdapterSpec(BaseModel):
    """The SDXL IP-Adapter used when a request asks ``ip_strength`` > 0, and its reference image."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path = Field(description="IP-Adapter weights (.safetensors, diffusers/h94 layout).")
    image_encoder_path: Path = Field(description="CLIP vision encoder folder (diffusers/transformers layout).")
    reference_image: Path = Field(Path("reference/electra_ref.png"), description="Style reference image.")


# The upscalers every server has, besides its registry's upscaler models: the latents resized (A1111's "Latent")
# and the picture resized with Lanczos.
BUILTIN_UPSCALERS = ("latent", "lanczos")


class UpscalerSpec(BaseModel):
    """A single-image super-resolution model (ESRGAN, Real-ESRGAN, SwinIR, HAT...) in one ``.safetensors`` file,
    loaded with spandrel, whose architecture and scale it reads from the file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=ID_PATTERN)
    name: str
    description: str = ""
    path: Path = Field(description="One .safetensors file (never a pickle: .pth / .pt files are refused).")

    @field_validator("id")
    @classmethod
    def _not_builtin(cls, upscaler_id: str) -> str:
        if upscaler_id in BUILTIN_UPSCALERS:
            raise ValueError(f"upscaler id {upscaler_id!r} is built in ({', '.join(BUILTIN_UPSCALERS)}): use another")
        return upscaler_id


EMBEDDING_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


class EmbeddingSpec(BaseModel):
    """A textual inversion (embedding) as AUTOMATIC1111 and civitai ship SDXL ones: one ``.safetensors`` holding
    ``clip_l`` and ``clip_g``. A prompt uses it by writing its ``name`` (A1111's convention: the file's name)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=EMBEDDING_NAME_PATTERN, description="The word a prompt writes to use it.")
    description: str = ""
    path: Path = Field(description="One .safetensors file with `clip_l` and `clip_g` tensors.")
    base: str = Field(SDXL_BASE, pattern=BASE_PATTERN, description="The models it fits: those of this base.")


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[ModelSpec]
    loras: list[LoraSpec] = []
    controlnets: list[ControlNetSpec] = []
    upscalers: list[UpscalerSpec] = []
    embeddings: list[EmbeddingSpec] = []
    ip_adapter: IpAdapterSpec | None = None
    default_model: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Registry:
        if not self.models:
            raise ValueError("declare at least one model")
        for kind, ids in (
            ("model", [m.id for m in self.models]),
            ("LoRA", [lo.id for lo in self.loras]),
            ("ControlNet", [c.id for c in self.controlnets]),
            ("upscaler", [u.id for u in self.upscalers]),
            ("embedding", [e.name.lower() for e in self.embeddings]),
        ):
            duplicates = sorted({i for i in ids if ids.count(i) > 1})
            if duplicates:
                raise ValueError(f"duplicate {kind} ids: {', '.join(duplicates)}")
        if self.default_model is not None and self.default_model not in self.model_ids:
            raise ValueError(f"default_model {self.default_model!r} is not a declared model")
        if self.default_model is not None and self.model(self.default_model).refiner:  # type: ignore[union-attr]
            raise ValueError(f"default_model {self.default_model!r} is a refiner: it draws no picture itself")
        for model in self.models:
            if model.default_refiner is None:
                continue
            refiner = self.model(model.default_refiner)
            if refiner is None or not refiner.refiner or refiner.base != model.base or model.refiner:
                raise ValueError(
                    f"model {model.id!r}: default_refiner {model.default_refiner!r} must be a refiner entry "
                    f"(refiner: true) of its base ({model.base})"
                )
        return self

    @property
    def model_ids(self) -> list[str]:
        return [m.id for m in self.models]

    @property
    def lora_ids(self) -> list[str]:
        return [lo.id for lo in self.loras]

    def model(self, model_id: str) -> ModelSpec | None:
        return next((m for m in self.models if m.id == model_id), None)

    def lora(self, lora_id: str) -> LoraSpec | None:
        return next((lo for lo in self.loras if lo.id == lora_id), None)

    @property
    def controlnet_ids(self) -> list[str]:
        return [c.id for c in self.controlnets]

    def controlnet(self, controlnet_id: str) -> ControlNetSpec | None:
        return next((c for c in self.controlnets if c.id == controlnet_id), None)

    @property
    def upscaler_ids(self) -> list[str]:
        """Every upscaler a request may name: the built-in ones, then the registry's models."""
        return [*BUILTIN_UPSCALERS, *(u.id for u in self.upscalers)]

    def upscaler(self, upscaler_id: str) -> UpscalerSpec | None:
        return next((u for u in self.upscalers if u.id == upscaler_id), None)

    def embeddings_for(self, model: ModelSpec) -> list[EmbeddingSpec]:
        """The embeddings a prompt of ``model`` may use: those of its base."""
        return [e for e in self.embeddings if e.base == model.base]

    def controlnets_for(self, model: ModelSpec) -> list[ControlNetSpec]:
        """The ControlNets that fit ``model``: those of its base."""
        return [c for c in self.controlnets if c.base == model.base]

    def models_for(self, controlnet: ControlNetSpec) -> list[ModelSpec]:
        return [m for m in self.models if m.base == controlnet.base]

    def resolve_default_model(self, configured: str | None = None) -> str:
        """The model a request gets when it names none."""
        for candidate in (configured, self.default_model):
            if candidate is not None:
                if candidate not in self.model_ids:
                    raise RegistryError(f"default model {candidate!r} is not declared in the registry")
                return candidate
        if "sdxl-base" in self.model_ids:
            return "sdxl-base"
        return next((m.id for m in self.models if not m.refiner), self.models[0].id)

    def refiners_for(self, model: ModelSpec) -> list[ModelSpec]:
        """The refiners that can finish ``model``'s pictures: the refiner entries of its base."""
        return [m for m in self.models if m.refiner and m.base == model.base and not model.refiner]
