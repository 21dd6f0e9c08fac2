"""What a registry declares: the models, LoRAs and IP-Adapter this server offers, as one YAML file writes them.

Requests name models and LoRAs by id only; paths live in the registry and nowhere else.
See ``registry.example.yaml`` for the documented format.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from imagen.errors import RegistryError
from imagen.sampler_names import SAMPLER_NAMES, is_sampler_name

ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


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
    demo: bool = Field(False, description="The built-in demo model (trained on shapes, shipped in the package).")
    scheduler: str | None = Field(
        None, description="Default sampler for this model's jobs, by its A1111 name (see GET /schedulers)."
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
        if name is not None and not is_sampler_name(name):
            raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SAMPLER_NAMES)}")
        return name

    @model_validator(mode="after")
    def _needs_path(self) -> ModelSpec:
        if self.path is None and not self.demo:
            raise ValueError(f"model {self.id!r}: `path` is required")
        return self


class LoraSpec(BaseModel):
    """A LoRA / LyCORIS file (kohya or diffusers/PEFT key layout, ``.safetensors`` only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=ID_PATTERN)
    name: str
    description: str = ""
    path: Path
    default_weight: float = Field(0.8, ge=0.0, le=2.0, allow_inf_nan=False)
    trigger_words: list[str] | None = None

    @field_validator("trigger_words")
    @classmethod
    def _no_blank_words(cls, words: list[str] | None) -> list[str] | None:
        if words is not None and any(not word.strip() for word in words):
            raise ValueError("trigger words must not be blank")
        return words or None


class IpAdapterSpec(BaseModel):
    """The SDXL IP-Adapter used when a request asks ``ip_strength`` > 0, and its reference image."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path = Field(description="IP-Adapter weights (.safetensors, diffusers/h94 layout).")
    image_encoder_path: Path = Field(description="CLIP vision encoder folder (diffusers/transformers layout).")
    reference_image: Path = Field(Path("reference/electra_ref.png"), description="Style reference image.")


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[ModelSpec]
    loras: list[LoraSpec] = []
    ip_adapter: IpAdapterSpec | None = None
    default_model: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Registry:
        if not self.models:
            raise ValueError("declare at least one model")
        for kind, ids in (("model", [m.id for m in self.models]), ("LoRA", [lo.id for lo in self.loras])):
            duplicates = sorted({i for i in ids if ids.count(i) > 1})
            if duplicates:
                raise ValueError(f"duplicate {kind} ids: {', '.join(duplicates)}")
        if self.default_model is not None and self.default_model not in self.model_ids:
            raise ValueError(f"default_model {self.default_model!r} is not a declared model")
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

    def resolve_default_model(self, configured: str | None = None) -> str:
        """The model a request gets when it names none."""
        for candidate in (configured, self.default_model):
            if candidate is not None:
                if candidate not in self.model_ids:
                    raise RegistryError(f"default model {candidate!r} is not declared in the registry")
                return candidate
        return "sdxl-base" if "sdxl-base" in self.model_ids else self.models[0].id
