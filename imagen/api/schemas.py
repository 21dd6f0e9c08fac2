"""Request and response bodies, as the API reference (v2.0) defines them.

Numbers are strict: a JSON string or boolean is refused, never converted. As in JSON Schema, an integer is
a number and ``30.0`` is the integer 30 (``30.5`` is not). Every string must be valid Unicode: JSON lets a
body carry a lone surrogate such as ``"\\ud800"``, which no file, database or header can store.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from imagen.config import CONTROLNETS_PER_REQUEST_CAP, LORAS_PER_REQUEST_CAP
from imagen.inputs.control_maps import (
    DEFAULT_HIGH_THRESHOLD,
    DEFAULT_LOW_THRESHOLD,
    MAX_PROCESSOR_RES,
    MIN_PROCESSOR_RES,
    PREPROCESSORS,
    ResizeMode,
)
from imagen.inputs.sizes import MAX_SIDE, MIN_SIDE, SIDE_STEP
from imagen.registry.specs import (
    GUIDANCE_CAP,
    REFERENCE_GUIDANCE,
    REFERENCE_STEPS,
    STEPS_CAP,
    GuidanceRange,
    LoraNeeds,
    StepRange,
)
from imagen.webhooks.events import DEFAULT_EVENTS, EventName

MAX_SEED = 2**53 - 1  # exact in JSON for every client, JavaScript included
MAX_PROMPT_CHARS = 20_000
MAX_WEBHOOK_URL_CHARS = 2048
MAX_IMAGES = 4
MAX_IMAGE_FIELD_CHARS = 28_000_000  # a 20 MB image as base64, with its data: prefix
# A character that is not blank, alike in Python and in JSON Schema's (ECMAScript's) regular expressions: each
# language's \s misses a few of the other's spaces (Python: U+FEFF; ECMAScript: U+001C-U+001F, U+0085).
NOT_BLANK = r"[^\s\u001c-\u001f\u0085\ufeff]"


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"must be valid Unicode text; found a lone surrogate {text[exc.start]!a} at position {exc.start}"
        ) from None
    return text


def _integer_not_text_or_bool(value: Any) -> Any:
    # pydantic's strict mode would also refuse 30.0, which JSON Schema (and so the OpenAPI document) calls
    # an integer: refuse only what is not a number at all.
    if isinstance(value, str | bool):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]
# The bounds come before the validator: so placed, pydantic writes them into the JSON schema as
# minimum/maximum (after it, as keywords no JSON Schema tool reads).
IntegerNotText = BeforeValidator(_integer_not_text_or_bool)

# The numbers a job takes, with their bounds: one place for the native, OpenAI and AUTOMATIC1111 requests
# (each names them its own way: ``cfg_scale``, ``n``, ``batch_size``...).
# Steps and guidance: the hard bounds of any model here; each model's own range (the reference's 10-100 and
# 1.0-30.0 unless its registry entry sets another) is checked at submission (``submission.py``).
Steps = Annotated[int, Field(ge=1, le=STEPS_CAP), IntegerNotText]
GuidanceScale = Annotated[float, Field(ge=0.0, le=GUIDANCE_CAP, strict=True, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED), IntegerNotText]
Side = Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_STEP), IntegerNotText]
ImageCount = Annotated[int, Field(ge=1, le=MAX_IMAGES), IntegerNotText]
Strength = Annotated[float, Field(ge=0.0, le=1.0, strict=True, allow_inf_nan=False)]


class LoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text = Field(description="LoRA id (see GET /loras).")
    weight: float | None = Field(
        None, ge=0.0, le=2.0, strict=True, allow_inf_nan=False,
        description="0.0-2.0; default: the LoRA's default_weight, else 0.8.",
    )


Fraction = Annotated[float, Field(ge=0.0, le=1.0, strict=True, allow_inf_nan=False)]
Threshold = Annotated[int, Field(ge=1, le=255), IntegerNotText]


class UpscaleRequest(BaseModel):
    """POST /upscale: a picture made larger by an upscaler, as a job (queue, limits, keys, events)."""

    model_config = ConfigDict(extra="forbid")

    image: Text = Field(
        max_length=MAX_IMAGE_FIELD_CHARS,
        description='The picture: a PNG, JPEG or WebP as a data URL ("data:image/png;base64,...") or '
        '"upload:<upload_id>" from POST /uploads.',
    )
    upscaler: Annotated[str, Field(min_length=1, max_length=80)] = Field(
        "lanczos", description="`lanczos`, or an upscaler model's id (GET /upscalers)."
    )
    scale: float = Field(
        2.0, ge=1.0, le=8.0, strict=True, allow_inf_nan=False,
        description="The result's size as a multiple of the picture's (1.0-8.0), unless width or height is given.",
    )
    width: Annotated[int, Field(ge=1, le=16384), IntegerNotText] | None = Field(
        None, description="A target width instead of `scale` (alone: the height keeps the aspect)."
    )
    height: Annotated[int, Field(ge=1, le=16384), IntegerNotText] | None = Field(
        None, description="A target height instead of `scale` (alone: the width keeps the aspect)."
    )


class RefinerRequest(BaseModel):
    """SDXL's ensemble of experts: the model denoises the first part of the schedule, a refiner the rest."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=80)] = Field(
        description="A refiner of the registry (GET /models: `refiner: true`) that fits the job's model."
    )
    switch_at: float = Field(
        0.8, ge=0.5, le=0.95, strict=True, allow_inf_nan=False,
        description="The share of the schedule the model denoises before the refiner takes over (0.5-0.95).",
    )


class HiresFix(BaseModel):
    """A1111's hires fix: after the first pass, upscale and denoise again at the larger size."""

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(
        2.0, ge=1.0, le=4.0, allow_inf_nan=False,
        description="The final size as a multiple of the first pass's (1.0-4.0), unless width or height is given.",
    )
    width: Annotated[int, Field(ge=64, le=8192), IntegerNotText] | None = Field(
        None, description="A target width instead of `scale` (alone: the height keeps the aspect); rounded to 64."
    )
    height: Annotated[int, Field(ge=64, le=8192), IntegerNotText] | None = Field(
        None, description="A target height instead of `scale` (alone: the width keeps the aspect); rounded to 64."
    )
    upscaler: Annotated[str, Field(min_length=1, max_length=80)] = Field(
        "latent",
        description="`latent` (the latents resized, A1111's Latent), `lanczos` (the picture resized), or an "
        "upscaler model's id (GET /upscalers).",
    )
    steps: Steps | None = Field(None, description="Steps of the second pass (as img2img: × denoise run); null: "
                                "the job's steps.")
    denoise: float = Field(
        0.5, ge=0.0, le=1.0, allow_inf_nan=False, strict=True,
        description="How much the second pass changes the upscaled picture, 0.0-1.0 (A1111's denoising strength).",
    )


class ControlNetUnit(BaseModel):
    """One ControlNet applied to a job: its model, its control image and how strongly and when it guides."""

    model_config = ConfigDict(extra="forbid")

    model: Text = Field(description="ControlNet id (see GET /controlnets); it must fit the job's model.")
    image: Text = Field(
        max_length=MAX_IMAGE_FIELD_CHARS,
        description='The control image: a PNG, JPEG or WebP as a data URL or "upload:<upload_id>"; a control '
        "map already (preprocessor `none`) or a picture the preprocessor turns into one.",
    )
    scale: float = Field(
        1.0, ge=0.0, le=2.0, strict=True, allow_inf_nan=False,
        description="How strongly it guides, 0.0-2.0 (0: not at all; the picture is the one without it).",
    )
    start: Fraction = Field(0.0, description="When it starts guiding, a fraction of the steps (0.0-1.0, < end).")
    end: Fraction = Field(1.0, description="When it stops guiding, a fraction of the steps (0.0-1.0, > start).")
    preprocessor: Text = Field(
        "none", description=f"What is made of the image first: {', '.join(PREPROCESSORS)} (GET /controlnets)."
    )
    resize_mode: ResizeMode = Field(
        "crop",
        description="How the map is fitted to the picture's size: `crop` (cover, overflow cropped: A1111's "
        '"Crop and Resize"), `fill` (fit inside, black around: "Resize and Fill"), `stretch` ("Just Resize").',
    )
    control_type: Text | None = Field(
        None, description="A ControlNet Union only (and required there): one of its `control_types`."
    )
    low_threshold: Threshold = Field(DEFAULT_LOW_THRESHOLD, description="Canny's low threshold, 1-255.")
    high_threshold: Threshold = Field(DEFAULT_HIGH_THRESHOLD, description="Canny's high threshold, 1-255.")
    processor_res: Annotated[int, Field(ge=MIN_PROCESSOR_RES, le=MAX_PROCESSOR_RES), IntegerNotText] | None = Field(
        None,
        description=f"The preprocessor runs with the image's short side at this size ({MIN_PROCESSOR_RES}-"
        f"{MAX_PROCESSOR_RES}); default: the picture's own (A1111's pixel perfect).",
    )


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Text = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw.")
    negative_prompt: Text | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="What to avoid; default: the model's default_negative."
    )
    model: Text | None = Field(None, description='Model id (see GET /models); default "sdxl-base".')
    loras: list[LoraRequest] = Field(
        default_factory=list,
        # The server's limit (IMAGEN_MAX_LORAS) is checked at submission; this cap stops a long array
        # before an object is built for each item.
        max_length=LORAS_PER_REQUEST_CAP,
        description="Each LoRA at most once; at most IMAGEN_MAX_LORAS of them (4 unless the server says "
        f"otherwise, never more than {LORAS_PER_REQUEST_CAP}).",
    )
    steps: Steps = Field(
        30, description="Diffusion steps, 10-100 (default 30), unless the model's registry entry sets its own range "
        "and default (GET /models: `steps`), or a LoRA of the request does (GET /loras: `needs`)."
    )
    guidance_scale: GuidanceScale = Field(
        7.5, description="CFG scale, 1.0-30.0 (default 7.5), unless the model's registry entry sets its own range "
        "and default (GET /models: `guidance_scale`), or a LoRA of the request does."
    )
    seed: Seed | None = Field(
        None, description="null = random (the seed used is reported)."
    )
    ip_strength: float = Field(
        0.0, ge=0.0, le=1.0, strict=True, allow_inf_nan=False, description="IP-Adapter strength, 0.0-1.0."
    )
    # -- more of SDXL (docs/sdxl-fields.md): all optional; unused, the job is as before -----------------------
    width: Side | None = Field(
        None,
        description=f"Image width, a multiple of {SIDE_STEP} from {MIN_SIDE} to {MAX_SIDE} (with `height`; "
        "default: the model's native size, or the init image's). GET /models lists recommended sizes.",
    )
    height: Side | None = Field(
        None, description=f"Image height, a multiple of {SIDE_STEP} from {MIN_SIDE} to {MAX_SIDE} (with `width`)."
    )
    num_images: ImageCount = Field(
        1,
        description=f"1-{MAX_IMAGES} images in one job (one batch); image i uses seed + i. The result's "
        "`images` lists them; /image/{job_id}?index=i serves image i.",
    )
    scheduler: Text | None = Field(
        None, description="An AUTOMATIC1111 sampler name (GET /schedulers); default: the model's, else its own."
    )
    clip_skip: Annotated[int, Field(ge=1, le=2), IntegerNotText] | None = Field(
        None, description="1 or 2, AUTOMATIC1111's meaning; default: the model's (PonyXL: 2), else 1."
    )
    init_image: Text | None = Field(
        None,
        max_length=MAX_IMAGE_FIELD_CHARS,
        description='img2img / inpainting: a PNG, JPEG or WebP as a data URL ("data:image/png;base64,...") or '
        '"upload:<upload_id>" from POST /uploads. Transparent areas become the mask when no mask is given.',
    )
    mask_image: Text | None = Field(
        None,
        max_length=MAX_IMAGE_FIELD_CHARS,
        description="Inpainting, with `init_image`: white = repaint, black = keep (same size as init_image).",
    )
    strength: Strength | None = Field(
        None,
        description="With `init_image`: how much to change it, 0.0-1.0 (default 0.75); steps run = steps × strength.",
    )
    ip_image: Text | None = Field(
        None,
        max_length=MAX_IMAGE_FIELD_CHARS,
        description="With `ip_strength` > 0: this request's own IP-Adapter reference image (data URL or "
        '"upload:<id>"), instead of the server\'s.',
    )
    controlnets: list[ControlNetUnit] = Field(
        default_factory=list,
        max_length=CONTROLNETS_PER_REQUEST_CAP,
        description="ControlNets guiding the picture by a control image (edges, depth, a silhouette...), with "
        "text-to-image, img2img or inpainting; at most IMAGEN_MAX_CONTROLNETS (3 unless the server says "
        f"otherwise, never more than {CONTROLNETS_PER_REQUEST_CAP}).",
    )
    refiner: RefinerRequest | None = Field(
        None,
        description="The SDXL refiner that finishes the picture (text-to-image). Absent: the model's "
        "`default_refiner` if its registry entry names one; null: none.",
    )
    hires: HiresFix | None = Field(
        None,
        description="Hires fix (text-to-image only): upscale the first pass and denoise it again at the larger "
        "size; the final size stays within IMAGEN_MAX_OUTPUT_PIXELS.",
    )
    webhook: Text | None = Field(
        None,
        max_length=MAX_WEBHOOK_URL_CHARS,
        description="An extension: http(s) URL that receives signed Standard Webhooks POSTs for this job "
        "(needs IMAGEN_WEBHOOK_SECRET on the server).",
    )
    webhook_events_filter: list[EventName] = Field(
        default_factory=lambda: list(DEFAULT_EVENTS),
        min_length=1,
        max_length=3,
        description="An extension, with `webhook`: which events to send (`progress` at most once a second).",
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not re.search(NOT_BLANK, prompt):
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


class Size(BaseModel):
    width: int
    height: int


class ModelHolder(BaseModel):
    """A worker that holds a model now, and where."""

    worker: str = Field(description="The worker, `host:pid` as GET /health lists it.")
    tier: Literal["device", "ram"] = Field(
        description="`device`: ready to run (on the GPU, or in RAM on a CPU-only worker); `ram`: pushed off the "
        "GPU into host RAM, brought back by a copy rather than a read from disk."
    )


class ModelInfo(BaseModel):
    id: str
    name: str
    description: str
    vae_path: str | None
    default_negative: str
    # extensions: what `width`/`height`, `scheduler`, `clip_skip` and guidance are for this model
    native_size: Size
    sizes: list[Size] = Field(description="Recommended sizes (SDXL's aspect buckets for a 1024² model).")
    default_scheduler: str | None = Field(description="Its default sampler; null: the model's own scheduler.")
    clip_skip: int = 1
    guidance_rescale: float = Field(0.0, description="Guidance rescale its jobs use (0: plain guidance).")
    guidance_stop: float = Field(
        1.0, description="Share of the steps after which its jobs' guidance stops (1: guided to the end)."
    )
    loaded_on: list[ModelHolder] = Field(
        [], description="The workers that hold it now (from their heartbeats), each with its tier; [] for none."
    )
    base: str = Field("sdxl", description="Its architecture family: the ControlNets of the same `base` fit it.")
    controlnets: list[str] = Field([], description="The ControlNets that fit it (ids, see GET /controlnets).")
    steps: StepRange = Field(REFERENCE_STEPS, description="The steps its jobs may ask for, and their default.")
    guidance_scale: GuidanceRange = Field(
        REFERENCE_GUIDANCE, description="The CFG scale its jobs may ask for, and their default."
    )
    timestep_spacing: str | None = Field(
        None, description="How its samplers space their timesteps (`trailing` for few-step models); null: its own."
    )
    refiner: bool = Field(False, description="An SDXL refiner: it finishes other models' jobs (`refiner.model`).")
    default_refiner: str | None = Field(None, description="The refiner that finishes its jobs unless told not to.")
    refiners: list[str] = Field([], description="The refiners that can finish its jobs (ids).")


class ModelOrderAccepted(BaseModel):
    model: str = Field(description="The model id.")
    action: Literal["load", "unload"]
    workers: list[str] = Field(
        description="The workers asked (`host:pid`): each carries it out between jobs, after the one it runs; "
        "[] when no worker is ready."
    )


class SchedulerList(BaseModel):
    schedulers: list[str] = Field(description="AUTOMATIC1111 sampler names accepted in `scheduler`.")


class UploadResponse(BaseModel):
    upload_id: str = Field(description='Name it as "upload:<upload_id>" in init_image, mask_image or ip_image.')
    width: int
    height: int
    expires_at: float = Field(description="Unix time after which it is gone (IMAGEN_UPLOAD_TTL_S).")


class LoraInfo(BaseModel):
    id: str
    name: str
    description: str
    default_weight: float
    trigger_words: list[str] | None
    needs: LoraNeeds | None = Field(
        None, description="What it needs (sampler, steps and CFG ranges): a job using it gets these unless it says "
        "otherwise, and must keep its steps and CFG in these ranges. Absent for a LoRA that needs nothing."
    )


class ControlNetInfo(BaseModel):
    id: str
    name: str
    description: str
    base: str = Field(description="The models it fits: those of this base (GET /models `base`).")
    control_types: list[str] | None = Field(
        description="A ControlNet Union: the control types it supports (a unit names one); null: a plain one."
    )
    models: list[str] = Field(description="The models it fits (ids).")


class PreprocessorInfo(BaseModel):
    name: str
    description: str


class ControlNetList(BaseModel):
    controlnets: list[ControlNetInfo]
    preprocessors: list[PreprocessorInfo] = Field(
        description="What a unit's `preprocessor` may be: those that need no weights."
    )


class EmbeddingInfo(BaseModel):
    name: str = Field(description="The word a prompt (or negative prompt) writes to use it.")
    description: str
    base: str = Field(description="The models it fits: those of this base.")
    models: list[str] = Field(description="The models it fits (ids).")


class EmbeddingList(BaseModel):
    embeddings: list[EmbeddingInfo]


class UpscalerInfo(BaseModel):
    id: str = Field(description="What `hires.upscaler` names.")
    name: str
    description: str
    kind: str = Field(description="`latent` (the latents resized), `pixel` (the picture resized) or `model` (an "
                      "upscaler model of the registry, loaded with spandrel).")


class UpscalerList(BaseModel):
    upscalers: list[UpscalerInfo]


class ModelList(BaseModel):
    models: list[ModelInfo]


class LoraList(BaseModel):
    loras: list[LoraInfo]


class WorkerStatus(BaseModel):
    host: str
    pid: int
    ready: bool = Field(description="Its engine is loaded: it takes jobs.")
    error: str | None = Field(None, description="Why its engine does not load (it retries; takes no job meanwhile).")
    device: str | None = None
    gpu_available: bool = Field(False, description="Its engine runs on a GPU.")
    models: dict[str, Literal["device", "ram"]] = Field(
        default_factory=dict,
        description="The models its engine holds now, each with its tier (as GET /models `loaded_on`).",
    )


class Health(BaseModel):
    status: Literal["ok", "degraded", "unavailable"] = Field(
        description="`ok`: all is well. `degraded` (200): jobs are accepted but something is wrong, e.g. no "
        "worker ready (jobs wait for one). `unavailable` (503): no new job can be accepted now (broker "
        "unreachable, job database deleted or damaged, outputs disk full). `reasons` says why."
    )
    gpu_available: bool = Field(description="A ready worker runs on a GPU.")
    queue_broker: str = Field(description="`connected` or `disconnected` (Redis), or `embedded` (SQLite).")
    reasons: list[str] = Field(
        default_factory=list,
        description="An extension of the reference: why the status is not `ok`, one short sentence each "
        "(those that make it unavailable first). Empty when ok.",
    )
    workers: list[WorkerStatus] = Field(
        default_factory=list,
        description="An extension of the reference: the generation workers, ready or not (embedded: one per "
        "worker slot, pid 0 while its process starts; distributed: the live workers' heartbeats).",
    )



# --- bodies the routes build by hand (documented in the OpenAPI schema, checked by the schemathesis run) ---


class Detail(BaseModel):
    """An error answer of the reference: 404, 413, 503."""

    detail: str


class Progress(BaseModel):
    step: str = Field(description="queued, starting, loading_model, loading_loras, encoding_prompt, "
                      "generation_gpu, decoding or saving.")
    progress: int = Field(
        ge=0, le=100, description="The whole job's percent: never goes back when the step changes (denoising is 10-90)."
    )
    # While denoising only (step generation_gpu):
    current_step: int | None = Field(None, ge=0, description="Denoising steps done.")
    total_steps: int | None = Field(None, ge=1, description="Denoising steps in all (the request's steps).")
    eta_s: float | None = Field(
        None, ge=0, description="Seconds of denoising left at the pace so far; null before the first step ends."
    )


class JobResult(BaseModel):
    status: Literal["success"]
    filename: str
    path: str
    url: str
    metadata: dict[str, Any] = Field(description="Every generation parameter (also in the PNG's text chunks).")
    images: list[dict[str, Any]] | None = Field(
        None, description="An extension: every image of the job (`filename`, `path`, `url`, `seed`)."
    )


class JobStatus(BaseModel):
    job_id: str
    status: Literal["PENDING", "STARTED", "PROGRESS", "SUCCESS", "FAILURE", "REVOKED"]
    result: JobResult | None = Field(description="Set on SUCCESS, else null.")
    error: str | None = Field(None, description="Present on FAILURE and REVOKED only.")
    meta: Progress | None = Field(None, description="Present while the job runs.")


class Processing(BaseModel):
    status: Literal["processing"]
    message: str
    state: Literal["PENDING", "STARTED", "PROGRESS"]
    meta: Progress


class ImageProcessing(BaseModel):
    """202 from /image: not finished yet."""

    detail: Processing


class Failed(BaseModel):
    status: Literal["failed"]
    error: str


class ImageFailed(BaseModel):
    """500 from /image: the job failed."""

    detail: Failed


class Revoked(BaseModel):
    status: Literal["revoked"]
    error: str


class ImageRevoked(BaseModel):
    """410 from /image: the job was cancelled (REVOKED); it has no image and never will."""

    detail: Revoked


class CancelResponse(BaseModel):
    """200 from POST /cancel (also for a job cancelled before)."""

    job_id: str
    status: Literal["REVOKED"]


class AlreadyFinished(BaseModel):
    status: Literal["SUCCESS", "FAILURE"]
    message: str


class CancelTooLate(BaseModel):
    """409 from POST /cancel: the job ended first."""

    detail: AlreadyFinished
