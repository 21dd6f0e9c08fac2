"""Request and response bodies, as the API reference (v2.0) defines them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_LORAS = 4
MAX_SEED = 2**53 - 1  # exact in JSON for every client, JavaScript included
MAX_PROMPT_CHARS = 20_000


class LoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="LoRA id (see GET /loras).")
    weight: float | None = Field(
        None, ge=0.0, le=2.0, allow_inf_nan=False,
        description="0.0-2.0; default: the LoRA's default_weight, else 0.8.",
    )


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw.")
    negative_prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="What to avoid; default: the model's default_negative."
    )
    model: str | None = Field(None, description='Model id (see GET /models); default "sdxl-base".')
    loras: list[LoraRequest] = Field(default_factory=list, max_length=MAX_LORAS, description="At most 4.")
    steps: int = Field(30, ge=10, le=100, description="Diffusion steps, 10-100.")
    guidance_scale: float = Field(7.5, ge=1.0, le=30.0, allow_inf_nan=False, description="CFG scale, 1.0-30.0.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="null = random (the seed used is reported).")
    ip_strength: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False, description="IP-Adapter strength.")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt must not be blank")
        return prompt

    @field_validator("loras")
    @classmethod
    def _no_duplicates(cls, loras: list[LoraRequest]) -> list[LoraRequest]:
        names = [lora.name for lora in loras]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"each LoRA may appear once; repeated: {', '.join(repeated)}")
        return loras


class GenerationResponse(BaseModel):
    job_id: str
    status: str = "queued"
    message: str


class ModelInfo(BaseModel):
    id: str
    name: str
    description: str
    vae_path: str | None
    default_negative: str


class LoraInfo(BaseModel):
    id: str
    name: str
    description: str
    default_weight: float
    trigger_words: list[str] | None


class ModelList(BaseModel):
    models: list[ModelInfo]


class LoraList(BaseModel):
    loras: list[LoraInfo]


class Health(BaseModel):
    status: str
    gpu_available: bool
    queue_broker: str

