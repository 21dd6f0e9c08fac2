"""The part of AUTOMATIC1111's API (``/sdapi/v1``) that clients use (Open WebUI, SillyTavern, webuiapi,
bots): txt2img and img2img on the job system, the model/LoRA/sampler lists, options, progress, interrupt,
and the checkpoint routes (unload, reload: admin keys' orders to every worker; refresh: the registry file).

Each txt2img/img2img request is one ``POST /generate`` job (``batch_size`` × ``n_iter`` images, at most 4;
image i uses seed + i, as A1111) submitted and waited for through ``compat_jobs``. ``<lora:name:weight>``
tags choose LoRAs (``prompt_tags``).

What A1111 keeps for the whole server is kept here per API key, in this API process's memory: the model
``POST /options`` selects (``sd_model_checkpoint``) is the default of that key's later requests;
``/progress`` shows, and ``/interrupt`` cancels, only that key's jobs submitted through ``/sdapi`` and still
waited for. With several API replicas (distributed mode), each keeps its own: a client talks to one.

Errors: A1111's shape, ``{"error", "detail", "body", "errors"}``; 422 for a refused request (with the
field), 429/503 for a full or unreachable queue, 500 for a failed job.
"""

from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import ImageOps
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, WithJsonSchema
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool

from imagen import __version__
from imagen.access.keys import Caller
from imagen.api.a1111_controlnet import ALWAYSON_SCRIPTS_SCHEMA, UnitProblem, client_field, controlnet_units
from imagen.api.compat_jobs import LivePreviews, NoImages, Outcome, read_images, run_job
from imagen.api.deps import BackendDep, CallerDep, RegistryDep, SettingsDep
from imagen.api.json_body import BadJson, read_json
from imagen.api.prompt_tags import parse_lora_tags
from imagen.api.routes import MODELS_ADMIN_ONLY
from imagen.api.schemas import (
    MAX_IMAGE_FIELD_CHARS,
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    GenerationRequest,
    GuidanceScale,
    ImageCount,
    IntegerNotText,
    Side,
    Steps,
    Strength,
    UpscaleRequest,
)
from imagen.api.submission import FieldError
from imagen.config import Settings
from imagen.generation.samplers import available_samplers
from imagen.inputs.images import BadImage, check_image, decode_data_url
from imagen.jobs.backend import JobBackend
from imagen.jobs.model_control import ModelOrder
from imagen.jobs.types import JobState
from imagen.outputs.png import a1111_controlnet_fields, a1111_hires_fields, a1111_parameters, a1111_refiner_fields
from imagen.registry import Registry
from imagen.registry.watch import RegistryWatcher

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 compatible"])

# Fields of a job as A1111's clients name them.
_FIELD_NAMES = {
    "init_image": "init_images", "mask_image": "mask", "guidance_scale": "cfg_scale", "strength": "denoising_strength",
    "num_images": "batch_size × n_iter", "scheduler": "sampler_name", "loras": "prompt's <lora:…> tags",
    "hires": "enable_hr", "refiner": "refiner_checkpoint",
}  # fmt: skip
_HIRES_NAMES = {
    "scale": "hr_scale", "upscaler": "hr_upscaler", "steps": "hr_second_pass_steps", "denoise": "denoising_strength",
    "width": "hr_resize_x", "height": "hr_resize_y",
}  # fmt: skip
# A1111's "Schedule type" values that mean something here: Karras picks a sampler's Karras variant, SGM Uniform
# its trailing-timesteps variant (Euler's: for few-step models).
SCHEDULE_TYPES = ("Automatic", "Karras", "SGM Uniform")


@dataclass
class A1111State:
    """Per API process: each key's chosen model and its /sdapi jobs being waited for."""

    models: dict[str, str] = field(default_factory=dict)  # key name → model id
    jobs: dict[str, dict[str, float]] = field(default_factory=dict)  # key name → {job id: submitted at}
    previews: LivePreviews = field(default_factory=LivePreviews)


def _state(request: Request) -> A1111State:
    state: A1111State | None = getattr(request.app.state, "a1111", None)
    if state is None:
        state = request.app.state.a1111 = A1111State()
    return state


def _error(status: int, detail: str, error: str = "HTTPException") -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail, "body": "", "errors": ""}, status_code=status)


# How a job that ends without images is answered: status, `error`, `detail` ({}: the reason). A job the
# submission refuses is a 422 that names each field; a cancelled one is answered with no image, as A1111 does.
_NO_IMAGES: dict[Outcome, tuple[int, str, str]] = {
    Outcome.QUEUE_FULL: (429, "HTTPException", "queue full ({}); try again later"),
    Outcome.QUEUE_UNREACHABLE: (503, "HTTPException", "the job queue is unreachable; try again later"),
    Outcome.UNAVAILABLE: (503, "HTTPException", "the service cannot take jobs now ({}); try again later"),
    Outcome.TIMED_OUT: (504, "HTTPException", "{}"),
    # the server is stopping (a client that went away reads nothing)
    Outcome.ABANDONED: (503, "HTTPException", "the server is restarting; try again"),
    Outcome.FAILED: (500, "GenerationError", "generation failed: {}"),
}


def _no_images(ended: NoImages, unit_paths: list[str]) -> JSONResponse:
    if ended.outcome is Outcome.REFUSED:
        return _error(422, _refusal(ended.problems, unit_paths), "ValidationError")
    status, error, detail = _NO_IMAGES[ended.outcome]
    return _error(status, detail.format(ended.reason), error)


class OverrideSettings(BaseModel):
    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str | None = Field(
        None, description="The model of this request (GET /sdapi/v1/sd-models: its title or file name)."
    )


class Txt2ImgRequest(BaseModel):
    """The fields used; every other A1111 field is accepted and ignored (clients send dozens). Numbers are
    as strict as on POST /generate: ``"seed": false`` or ``"steps": "30"`` is a 422, never converted, and NaN or
    Infinity anywhere in the body is a 422 (``json_body``)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = Field(
        min_length=1, max_length=MAX_PROMPT_CHARS, description="Not blank; `<lora:name:weight>` tags choose LoRAs."
    )
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    steps: Steps | None = None
    cfg_scale: GuidanceScale | None = None
    seed: Annotated[int, Field(ge=-1, le=MAX_SEED), IntegerNotText] = Field(-1, description="-1: random.")
    width: Side | None = Field(None, description="With `height`.")
    height: Side | None = Field(None, description="With `width`.")
    sampler_name: str | None = Field(None, description='GET /sdapi/v1/samplers; "" or null: the model\'s default.')
    sampler_index: str | None = Field(None, description="The old name of `sampler_name`, read when it is absent.")
    scheduler: str | None = Field(
        None,
        description='A1111\'s "Schedule type": Automatic (the sampler as named), Karras or SGM Uniform (its variant '
        "of that schedule, for a sampler that has one; a 422 otherwise).",
    )
    batch_size: ImageCount = Field(1, description=f"batch_size × n_iter images, at most {MAX_IMAGES}.")
    n_iter: ImageCount = 1
    override_settings: OverrideSettings = Field(default_factory=OverrideSettings)
    # img2img
    init_images: list[str] | None = Field(None, description="Base64 PNG, JPEG or WebP (data URL or bare); the first.")
    mask: str | None = Field(None, description="Base64 image: white = repaint (img2img).")
    denoising_strength: Strength | None = None
    inpainting_mask_invert: Annotated[int, Field(ge=0, le=1), IntegerNotText] = Field(
        0, description="1: the mask's black is repainted."
    )
    # hires fix (txt2img)
    enable_hr: StrictBool = Field(False, description="Hires fix: upscale the first pass and denoise it again.")
    hr_scale: float = Field(
        2.0, ge=1.0, le=4.0, strict=True, allow_inf_nan=False, description="With enable_hr: the upscale."
    )
    hr_upscaler: str | None = Field(
        None, description="Latent (the default), None or Lanczos (the picture resized), or an upscaler model "
        "(GET /sdapi/v1/upscalers)."
    )
    hr_second_pass_steps: Annotated[int, Field(ge=0, le=150), IntegerNotText] = Field(
        0, description="0: the first pass's steps."
    )
    hr_resize_x: Annotated[int, Field(ge=0, le=8192), IntegerNotText] = Field(0, description="A target width.")
    hr_resize_y: Annotated[int, Field(ge=0, le=8192), IntegerNotText] = Field(0, description="A target height.")
    # what this server cannot do: a 422 when set to anything but "off", never ignored
    hr_checkpoint_name: str | None = Field(None, description="Refused unless empty or the job's model.")
    hr_sampler_name: str | None = Field(None, description="Refused unless empty or the job's sampler.")
    hr_prompt: str = Field("", description="Refused unless empty or the prompt itself.")
    hr_negative_prompt: str = Field("", description="Refused unless empty or the negative prompt itself.")
    refiner_checkpoint: str | None = Field(
        None, description="An SDXL refiner that finishes the picture (GET /sdapi/v1/sd-models); \"\"/None: none."
    )
    refiner_switch_at: float | None = Field(
        None, strict=True, allow_inf_nan=False, description="When the refiner takes over, 0.5-0.95 (default 0.8)."
    )
    restore_faces: StrictBool | None = Field(None, description="Refused when true: no face restoration here.")
    tiling: StrictBool | None = Field(None, description="Refused when true: no tiling here.")
    styles: list[str] | None = Field(None, max_length=16, description="Refused unless empty: no saved styles here.")
    subseed_strength: float = Field(
        0.0, strict=True, allow_inf_nan=False, description="Refused unless 0: no variation seeds."
    )
    script_name: str | None = Field(None, description="Refused unless empty: no scripts here.")
    alwayson_scripts: Annotated[dict[str, Any] | None, WithJsonSchema(ALWAYSON_SCRIPTS_SCHEMA)] = Field(
        None,
        description="`controlnet` (or `ControlNet`): `{\"args\": [unit, ...]}`, the ControlNet extension's units "
        "(docs/controlnet.md); any other script is a 422 unless its args are `[]` or `[false]` (off).",
    )


class ExtraSingleImageRequest(BaseModel):
    """A1111's extras (``/sdapi/v1/extra-single-image``): the upscale only. Face restoration and a second
    upscaler are refused when asked for, never ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    image: str = Field(min_length=1, max_length=MAX_IMAGE_FIELD_CHARS, description="Base64 PNG, JPEG or WebP.")
    resize_mode: Annotated[int, Field(ge=0, le=1), IntegerNotText] = Field(
        0, description="0: by `upscaling_resize`; 1: to `upscaling_resize_w` x `upscaling_resize_h`."
    )
    upscaling_resize: float = Field(2.0, ge=1.0, le=8.0, strict=True, description="The scale (resize_mode 0).")
    upscaling_resize_w: Annotated[int, Field(ge=1, le=16384), IntegerNotText] = 512
    upscaling_resize_h: Annotated[int, Field(ge=1, le=16384), IntegerNotText] = 512
    upscaling_crop: StrictBool = Field(True, description="resize_mode 1 to another aspect: refused (no crop here).")
    upscaler_1: str = Field("None", description="None or Lanczos (resized with Lanczos), or an upscaler model.")
    upscaler_2: str = Field("None", description="Refused unless None (or its visibility 0).")
    extras_upscaler_2_visibility: float = Field(0.0, ge=0.0, le=1.0, strict=True)
    gfpgan_visibility: float = Field(0.0, ge=0.0, le=1.0, strict=True, description="Refused unless 0.")
    codeformer_visibility: float = Field(0.0, ge=0.0, le=1.0, strict=True, description="Refused unless 0.")
    codeformer_weight: float = Field(0.0, ge=0.0, le=1.0, strict=True)
    upscale_first: StrictBool = False
    show_extras_results: StrictBool = True


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(min_length=1, description="Base64 PNG, JPEG or WebP (data URL or bare); the first.")


def model_title(model_id: str) -> str:
    return model_id


def find_model(name: str, registry: Registry) -> str | None:
    """A model named by id, A1111 title ("name [hash]"), or checkpoint file name/stem."""
    name = name.strip()
    bare = name.split(" [", 1)[0].strip()
    for candidate in (name, bare):
        if registry.model(candidate) is not None:
            return candidate
    for model in registry.models:
        if model.path is not None and bare in (model.path.name, model.path.stem):
            return model.id
    return None


def _sampler(fields: Txt2ImgRequest) -> tuple[str | None, str | None]:
    """Our sampler name (an A1111 name, Karras variants included), or an error. Both names a client may send
    are checked: neither is ignored."""
    available = available_samplers()
    for field_name, given in (("sampler_name", fields.sampler_name), ("sampler_index", fields.sampler_index)):
        if given and given not in available:
            return None, f"{field_name}: sampler {given!r} is not available here; available: {', '.join(available)}"
    name = fields.sampler_name or fields.sampler_index
    schedule = (fields.scheduler or "").strip().lower()
    if schedule and schedule not in {known.lower() for known in SCHEDULE_TYPES}:
        return None, f"scheduler: schedule type {fields.scheduler!r} is not available here; available: " + ", ".join(
            SCHEDULE_TYPES
        )
    suffix = f" {next((known for known in SCHEDULE_TYPES if known.lower() == schedule), '')}"
    if schedule in ("", "automatic") or (name and name.endswith(suffix)):
        return name or None, None  # an empty name is the model's own sampler, as in A1111
    # A schedule we cannot give is refused, never dropped: the picture would not be the one asked for.
    with_it = [known.removesuffix(suffix) for known in available if known.endswith(suffix)]
    if not name or name + suffix not in available:
        return None, (
            f"scheduler: the{suffix} schedule needs a sampler_name that has it ({', '.join(with_it)}), not {name!r}"
        )
    return name + suffix, None


def _unsupported(fields: Txt2ImgRequest, sampler: str | None) -> str | None:
    """A field this server cannot honour, set to anything but its "off" value: refused, never ignored (the
    picture would not be the one asked for)."""
    same = {
        "hr_prompt": (fields.hr_prompt, ("", fields.prompt)),
        "hr_negative_prompt": (fields.hr_negative_prompt, ("", fields.negative_prompt or "")),
        "hr_sampler_name": (fields.hr_sampler_name, (None, "", "Use same sampler", sampler, fields.sampler_name)),
        "hr_checkpoint_name": (fields.hr_checkpoint_name, (None, "", "Use same checkpoint")),
    }
    for name, (value, allowed) in same.items():
        if value not in allowed:
            return f"{name}: a second pass with its own {name.removeprefix('hr_').replace('_', ' ')} is not "\
                "supported here; leave it empty"
    off: dict[str, tuple[object, str]] = {
        "restore_faces": (fields.restore_faces, "face restoration is not available here"),
        "tiling": (fields.tiling, "seamless tiling is not available here"),
        "styles": (fields.styles, "there are no saved styles here: put the style in the prompt"),
        "subseed_strength": (fields.subseed_strength, "variation seeds are not available here"),
        "script_name": (fields.script_name, "scripts are not available here"),
    }
    for name, (setting, why) in off.items():
        if setting:
            return f"{name}: {why}; leave it out"
    return None


# hr_upscaler names of A1111 that resize the picture with Lanczos here ("None" upscales nothing, then A1111
# resizes with Lanczos); anything else names a latent mode or an upscaler model.
_LANCZOS_NAMES = ("none", "lanczos")


def _upscaler_named(name: str, registry: Registry) -> str | None:
    """Our upscaler for an A1111 pixel upscaler's name: ``lanczos`` for None/Lanczos, else a registry
    upscaler by its name or id; None when there is no such upscaler."""
    if name.lower() in _LANCZOS_NAMES:
        return "lanczos"
    return next((u.id for u in registry.upscalers if name in (u.id, u.name)), None)


def hires_from_fields(fields: Txt2ImgRequest, registry: Registry) -> tuple[dict[str, Any] | None, str | None]:
    """A1111's hires fields as our ``hires``: hr_scale, hr_upscaler (by A1111 name, or a registry upscaler's
    name or id), hr_second_pass_steps, hr_resize_x/y and denoising_strength (A1111's 0.7 when absent)."""
    if not fields.enable_hr:
        return None, None
    if fields.init_images:
        return None, "enable_hr: the hires fix is for txt2img"
    wanted = (fields.hr_upscaler or "Latent").strip()
    upscaler = "latent" if wanted.lower() == "latent" else _upscaler_named(wanted, registry)
    if upscaler is None:
        names = ["Latent", "None", "Lanczos", *(u.name for u in registry.upscalers)]
        return None, f"hr_upscaler: {wanted!r} is not available here; available: {', '.join(names)}"
    hires: dict[str, Any] = {
        "scale": fields.hr_scale,
        "upscaler": upscaler,
        "denoise": fields.denoising_strength if fields.denoising_strength is not None else 0.7,
    }
    if fields.hr_second_pass_steps:
        hires["steps"] = fields.hr_second_pass_steps
    if fields.hr_resize_x:
        hires["width"] = fields.hr_resize_x
    if fields.hr_resize_y:
        hires["height"] = fields.hr_resize_y
    return hires, None


def _data_url(image: str) -> str:
    return image if image.startswith("data:") else "data:image/png;base64," + image


def _inverted_mask(mask: str) -> str:
    """A1111's ``inpainting_mask_invert``: the mask, black and white swapped, as a PNG data URL. Checked first
    as every input image (its size read from the header: a huge one is never decoded); it decodes and encodes,
    so it runs in a worker thread, never on the event loop. Raises ``BadImage``."""
    checked = check_image(decode_data_url(mask))
    out = io.BytesIO()
    ImageOps.invert(checked.image.convert("L")).save(out, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def _generation_request(
    fields: Txt2ImgRequest,
    registry: Registry,
    settings: Settings,
    default_model: str | None,
    mask: str | None,
    units: list[tuple[str, dict[str, Any]]],
) -> tuple[GenerationRequest | None, str | None]:
    tags = parse_lora_tags(fields.prompt, registry)
    if tags.unknown:
        return None, (
            f"prompt: unknown LoRA {tags.unknown[0]!r} in a <lora:...> tag; available: "
            + (", ".join(registry.lora_ids) or "none")
        )
    if tags.bad_weights:
        return None, f"prompt: the weight in {tags.bad_weights[0]} is not a number"
    sampler, problem = _sampler(fields)
    if problem is not None:
        return None, problem
    problem = _unsupported(fields, sampler)
    if problem is not None:
        return None, problem
    hires, problem = hires_from_fields(fields, registry)
    if problem is not None:
        return None, problem
    refiner: dict[str, Any] | None = None
    if fields.refiner_checkpoint not in (None, "", "None"):
        found = find_model(str(fields.refiner_checkpoint), registry)
        if found is None:
            return None, (
                f"refiner_checkpoint: unknown model {fields.refiner_checkpoint!r}; available: "
                f"{', '.join(registry.model_ids)}"
            )
        refiner = {"model": found, **({"switch_at": fields.refiner_switch_at}
                                      if fields.refiner_switch_at is not None else {})}
    count = fields.batch_size * fields.n_iter
    if count > MAX_IMAGES:
        return None, f"batch_size × n_iter is at most {MAX_IMAGES} here, not {count}"
    checkpoint = fields.override_settings.sd_model_checkpoint
    model = default_model
    if checkpoint is not None:
        model = find_model(checkpoint, registry)
        if model is None:
            return None, (
                f"override_settings.sd_model_checkpoint: unknown model {checkpoint!r}; available: "
                f"{', '.join(registry.model_ids)}"
            )
    values: dict[str, Any] = {
        "prompt": tags.prompt or fields.prompt,
        "negative_prompt": fields.negative_prompt or None,
        "model": model,
        "loras": [{"name": name, "weight": weight} for name, weight in tags.loras],  # checked below, as the rest
        "seed": fields.seed if fields.seed >= 0 else None,
        "width": fields.width,
        "height": fields.height,
        "num_images": count,
        "scheduler": sampler,
        "controlnets": [unit for _, unit in units],
        **({"hires": hires} if hires is not None else {}),
        # A1111 has no refiner unless asked: a model's default refiner is not applied to its requests
        "refiner": refiner,
    }
    if fields.steps is not None:
        values["steps"] = fields.steps
    if fields.cfg_scale is not None:
        values["guidance_scale"] = float(fields.cfg_scale)
    if fields.init_images:
        values["init_image"] = _data_url(fields.init_images[0])
        values["mask_image"] = mask
        values["strength"] = fields.denoising_strength if fields.denoising_strength is not None else 0.75
    try:
        return GenerationRequest.model_validate(values), None
    except ValidationError as exc:
        return None, _problems(exc, [path for path, _ in units])


def _client_field(loc: tuple[str | int, ...], unit_paths: list[str]) -> str:
    """A field of our request as the client named it (``cfg_scale``, ``alwayson_scripts.controlnet.args.0.weight``)."""
    controlnet = client_field(loc, unit_paths)
    if controlnet is not None:
        return controlnet
    if loc[0] == "hires" and len(loc) > 1:
        return _HIRES_NAMES.get(str(loc[1]), "enable_hr")
    if loc[0] == "refiner" and len(loc) > 1:
        return "refiner_switch_at" if loc[1] == "switch_at" else "refiner_checkpoint"
    return ".".join([_FIELD_NAMES.get(str(loc[0]), str(loc[0])), *map(str, loc[1:])])


def _problems(exc: ValidationError, unit_paths: list[str] | None = None) -> str:
    """A refused body's problems, each after its field as the client named it (``cfg_scale``)."""
    return "; ".join(
        f"{_client_field(tuple(error['loc']), unit_paths or [])}: {error['msg']}" if error["loc"] else error["msg"]
        for error in exc.errors()
    )


def _refusal(problems: tuple[FieldError, ...], unit_paths: list[str]) -> str:
    """The job's refusal, each problem after the field as the client named it (``mask``, not ``mask_image``)."""
    return "; ".join(f"{_client_field(error.loc, unit_paths)}: {error.message}" for error in problems)


def _infotext(metadata: dict[str, Any], seed: int, model: str) -> str:
    lines = [str(metadata.get("final_prompt") or metadata.get("prompt", ""))]
    negative = metadata.get("final_negative_prompt") or metadata.get("negative_prompt")
    if negative:
        lines.append(f"Negative prompt: {negative}")
    params = [
        ("Steps", metadata.get("steps")),
        ("Sampler", metadata.get("scheduler") or "Default"),
        ("CFG scale", metadata.get("guidance_scale")),
        ("Seed", seed),
        ("Size", f"{metadata.get('width')}x{metadata.get('height')}"),
        ("Model", model),
        ("Lora", ", ".join(f"{lo['name']}:{lo['weight']}" for lo in metadata.get("loras", [])) or None),
        *a1111_controlnet_fields(metadata).items(),
        *a1111_hires_fields(metadata).items(),
        *a1111_refiner_fields(metadata).items(),
        ("Version", f"imagen {__version__}"),
    ]
    lines.append(", ".join(f"{name}: {value}" for name, value in params if value is not None))
    return "\n".join(lines)


async def _generate(
    fields: Txt2ImgRequest,
    raw: dict[str, Any],
    http: Request,
    backend: JobBackend,
    registry: Registry,
    settings: Settings,
    caller: Caller,
) -> JSONResponse:
    state = _state(http)
    mask = _data_url(fields.mask) if fields.init_images and fields.mask else None
    if mask is not None and fields.inpainting_mask_invert:
        try:
            mask = await run_in_threadpool(_inverted_mask, mask)
        except BadImage as exc:
            return _error(422, f"mask: {exc}", "ValidationError")
    try:
        units = controlnet_units(
            fields.alwayson_scripts, _data_url(fields.init_images[0]) if fields.init_images else None
        )
    except UnitProblem as exc:
        return _error(422, str(exc), "ValidationError")
    request, problem = _generation_request(fields, registry, settings, state.models.get(caller.name), mask, units)
    if request is None:
        return _error(422, problem or "invalid request", "ValidationError")
    try:
        job = await run_job(
            request, http, backend, registry, settings, caller,
            previews=state.previews, waiting=state.jobs.setdefault(caller.name, {}),
        )  # fmt: skip
    except NoImages as ended:
        if ended.outcome is Outcome.CANCELLED:
            # A1111 answers an interrupted generation with what it has: here, no image
            return await run_in_threadpool(_images_answer, [], raw, {"interrupted": True})
        return _no_images(ended, [path for path, _ in units])
    pngs = await read_images(backend, settings, job)
    seeds = [int(str(image["seed"])) for image in job.images]
    metadata = job.metadata
    model = str(metadata.get("model", ""))
    prompt = str(metadata.get("final_prompt") or metadata.get("prompt", ""))
    negative = str(metadata.get("final_negative_prompt") or metadata.get("negative_prompt") or "")
    info: dict[str, Any] = {
        "prompt": prompt,
        "all_prompts": [prompt] * len(pngs),
        "negative_prompt": negative,
        "all_negative_prompts": [negative] * len(pngs),
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(pngs),
        "subseed_strength": 0,
        "width": metadata.get("width"),
        "height": metadata.get("height"),
        "sampler_name": metadata.get("scheduler") or fields.sampler_name,
        "cfg_scale": metadata.get("guidance_scale"),
        "steps": metadata.get("steps"),
        "batch_size": fields.batch_size,
        "sd_model_name": model,
        "sd_model_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": metadata.get("strength"),
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": [_infotext(metadata, seed, model) for seed in seeds],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.record.created_at or time.time())),
        "clip_skip": metadata.get("clip_skip") or 1,
        "is_using_inpainting_conditioning": bool(metadata.get("mask_image")),
        "version": f"imagen {__version__}",
    }
    return await run_in_threadpool(_images_answer, pngs, raw, info)


def _images_answer(pngs: list[bytes], parameters: dict[str, Any], info: dict[str, Any]) -> JSONResponse:
    """A1111's answer, its images in base64 and the request echoed as ``parameters`` (an img2img's own image
    with it): encoded and rendered in a worker thread. For four large images that is tens of MB of JSON, about
    a second of CPU that the event loop must not spend."""
    images = [base64.b64encode(png).decode("ascii") for png in pngs]
    return JSONResponse({"images": images, "parameters": parameters, "info": json.dumps(info)})


async def _json_object(http: Request) -> dict[str, Any] | JSONResponse:
    """The body's JSON object (none: an empty one), or the 422 to answer."""
    try:
        raw = await read_json(http, empty=b"{}")
    except BadJson as exc:
        return _error(422, str(exc), "ValidationError")
    if not isinstance(raw, dict):
        return _error(422, "the body must be a JSON object", "ValidationError")
    return raw


async def _read(http: Request, model: type[Txt2ImgRequest]) -> tuple[Txt2ImgRequest, dict[str, Any]] | JSONResponse:
    """The body's fields and its raw JSON (A1111 echoes it as `parameters`), or the 422 to answer."""
    raw = await _json_object(http)
    if isinstance(raw, JSONResponse):
        return raw
    try:
        return model.model_validate(raw), raw
    except ValidationError as exc:
        return _error(422, _problems(exc), "ValidationError")


def request_schemas() -> dict[str, Any]:
    """The JSON Schemas of the bodies these routes read themselves, for the OpenAPI document's components."""
    _, schemas = models_json_schema(
        [(Txt2ImgRequest, "validation"), (Img2ImgRequest, "validation"), (ExtraSingleImageRequest, "validation")],
        ref_template="#/components/schemas/{model}",
    )
    defs: dict[str, Any] = schemas["$defs"]
    return defs


_A1111_ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error", "detail", "body", "errors"],
    "properties": {name: {"type": "string"} for name in ("error", "detail", "body", "errors")},
}


def _answers(description: str, schema: dict[str, Any] = _A1111_ERROR) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _generation_route(model: str) -> dict[str, Any]:
    """What the OpenAPI document says of a txt2img/img2img route: its body, and every answer it gives."""
    return {
        "openapi_extra": {
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}},
            }
        },
        "responses": {
            200: _answers(
                "`images`: base64 PNGs; `parameters`: the request; `info`: a JSON string (seeds, infotexts...).",
                {
                    "type": "object",
                    "required": ["images", "parameters", "info"],
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string"}},
                        "parameters": {"type": "object"},
                        "info": {"type": "string"},
                    },
                },
            ),
            422: _answers("A refused request: `detail` names the field (`error`: ValidationError)."),
            429: _answers("Queue full, or this key has as many jobs waiting as it may."),
            500: _answers("The job failed (`error`: GenerationError)."),
            503: _answers("The job queue is unreachable, the service cannot take jobs now, or it is restarting."),
            504: _answers("The job did not end in time."),
        },
    }


def _upscale_request(fields: ExtraSingleImageRequest, registry: Registry) -> UpscaleRequest | str:
    """A1111's extras fields as our upscale request, or why they cannot be honoured."""
    for name, value in (("gfpgan_visibility", fields.gfpgan_visibility),
                        ("codeformer_visibility", fields.codeformer_visibility)):
        if value:
            return f"{name}: face restoration is not available here; send 0"
    if fields.upscaler_2 not in ("", "None") and fields.extras_upscaler_2_visibility:
        return "upscaler_2: a second upscaler blended in is not available here; send None"
    wanted = fields.upscaler_1.strip()
    upscaler = _upscaler_named(wanted, registry)
    if upscaler is None:
        names = ["None", "Lanczos", *(u.name for u in registry.upscalers)]
        return f"upscaler_1: {wanted!r} is not available here; available: {', '.join(names)}"
    values: dict[str, Any] = {"image": _data_url(fields.image), "upscaler": upscaler}
    if fields.resize_mode == 1:
        values.update(width=fields.upscaling_resize_w, height=fields.upscaling_resize_h)
    else:
        values["scale"] = fields.upscaling_resize
    request = UpscaleRequest.model_validate(values)
    if fields.resize_mode == 1 and fields.upscaling_crop:
        return _crop_problem(request)
    return request


def _crop_problem(request: UpscaleRequest) -> UpscaleRequest | str:
    """A1111 crops to fill another aspect; this server does not crop: the same aspect passes, another is refused."""
    try:
        picture = check_image(decode_data_url(request.image))
    except BadImage as exc:
        return f"image: {exc}"
    assert request.width is not None and request.height is not None
    if abs(picture.width * request.height - picture.height * request.width) > max(picture.width, picture.height):
        return (f"upscaling_crop: cropping {picture.width}x{picture.height} to {request.width}x{request.height} "
                "(another aspect) is not available here; send upscaling_crop false (the picture is stretched) or "
                "a size of the picture's aspect")  # fmt: skip
    return request


@router.post(
    "/extra-single-image",
    response_model=None,
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/ExtraSingleImageRequest"}}}}},
    responses={
        200: _answers("`image`: the upscaled picture, base64 PNG; `html_info`: what was done.", {
            "type": "object", "required": ["html_info", "image"],
            "properties": {"html_info": {"type": "string"}, "image": {"type": "string"}},
        }),
        422: _answers("A refused request: `detail` names the field (`error`: ValidationError)."),
        429: _answers("Queue full, or this key has as many jobs waiting as it may."),
        500: _answers("The job failed (`error`: GenerationError)."),
        503: _answers("The job queue is unreachable, the service cannot take jobs now, or it is restarting."),
        504: _answers("The job did not end in time."),
    },
)  # fmt: skip
async def extra_single_image(
    http: Request, backend: BackendDep, registry: RegistryDep, settings: SettingsDep, caller: CallerDep
) -> JSONResponse:
    """A1111's extras tab for one picture: the upscale, as a job on the queue (POST /upscale's)."""
    raw = await _json_object(http)
    if isinstance(raw, JSONResponse):
        return raw
    try:
        fields = ExtraSingleImageRequest.model_validate(raw)
        request = await run_in_threadpool(_upscale_request, fields, registry)
    except ValidationError as exc:
        return _error(422, _problems(exc), "ValidationError")
    if isinstance(request, str):
        return _error(422, request, "ValidationError")
    try:
        job = await run_job(request, http, backend, registry, settings, caller)
    except NoImages as ended:
        if ended.outcome is Outcome.CANCELLED:
            return JSONResponse({"html_info": "interrupted", "image": ""})
        return _no_images(ended, [])
    [png] = await read_images(backend, settings, job)
    info = a1111_parameters(job.metadata)
    return await run_in_threadpool(
        lambda: JSONResponse({"html_info": f"<p>{info}</p>", "image": base64.b64encode(png).decode("ascii")})
    )


@router.post("/txt2img", response_model=None, **_generation_route("Txt2ImgRequest"))
async def txt2img(
    http: Request, backend: BackendDep, registry: RegistryDep, settings: SettingsDep, caller: CallerDep
) -> JSONResponse:
    """A1111's txt2img: waits for the job; `images` are base64 PNGs, `info` a JSON string."""
    read = await _read(http, Txt2ImgRequest)
    if isinstance(read, JSONResponse):
        return read
    fields, raw = read
    return await _generate(fields, raw, http, backend, registry, settings, caller)


@router.post("/img2img", response_model=None, **_generation_route("Img2ImgRequest"))
async def img2img(
    http: Request, backend: BackendDep, registry: RegistryDep, settings: SettingsDep, caller: CallerDep
) -> JSONResponse:
    """A1111's img2img: `init_images[0]`, optional `mask` (white = repaint), `denoising_strength`."""
    read = await _read(http, Img2ImgRequest)
    if isinstance(read, JSONResponse):
        return read
    fields, raw = read
    return await _generate(fields, raw, http, backend, registry, settings, caller)


@router.get("/sd-models")
def sd_models(registry: RegistryDep) -> list[dict[str, Any]]:
    return [
        {
            "title": model_title(m.id),
            "model_name": m.id,
            "hash": None,
            "sha256": None,
            "filename": m.path.name if m.path is not None else m.id,
            "config": None,
        }
        for m in registry.models
    ]


@router.get("/loras")
def loras(registry: RegistryDep) -> list[dict[str, Any]]:
    """Name them in a prompt as <lora:NAME:WEIGHT> (the registry id; the file's stem works too)."""
    return [
        {
            "name": lo.id,
            "alias": lo.path.stem,
            "path": lo.path.name,
            "metadata": {"ss_output_name": lo.name, "trigger_words": lo.trigger_words or []},
        }
        for lo in registry.loras
    ]


@router.get("/samplers")
def samplers() -> list[dict[str, Any]]:
    return [{"name": name, "aliases": [], "options": {}} for name in available_samplers()]


@router.get("/schedulers")
def schedulers() -> list[dict[str, Any]]:
    return [
        {"name": name.lower(), "label": name, "aliases": None, "default_rho": -1, "need_inner_model": False}
        for name in SCHEDULE_TYPES
    ]


@router.get("/upscalers")
def upscalers(registry: RegistryDep) -> list[dict[str, Any]]:
    """What ``hr_upscaler`` may name besides the latent modes: A1111's "None" and "Lanczos" (both resize with
    Lanczos) and the registry's upscaler models, by name (their paths stay on the server)."""
    return [
        *({"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
          for name in ("None", "Lanczos")),
        *({"name": u.name, "model_name": u.id, "model_path": None, "model_url": None, "scale": None}
          for u in registry.upscalers),
    ]  # fmt: skip


@router.get("/embeddings")
def embeddings(registry: RegistryDep) -> dict[str, Any]:
    """The registry's textual inversions as A1111 lists them (a prompt uses one by its name)."""
    loaded = {
        e.name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None, "vectors": None}
        for e in registry.embeddings
    }
    return {"loaded": loaded, "skipped": {}}


@router.get("/latent-upscale-modes")
def latent_upscale_modes() -> list[dict[str, Any]]:
    """``hr_upscaler``'s latent mode: A1111's "Latent" (bilinear)."""
    return [{"name": "Latent"}]


@router.get("/sd-vae")
def sd_vae() -> list[dict[str, Any]]:
    """Each model brings its VAE (the registry's `vae_path`): none to choose per request."""
    return []


@router.get("/options")
def get_options(
    http: Request, registry: RegistryDep, settings: SettingsDep, caller: CallerDep
) -> dict[str, Any]:
    """The options clients read: `sd_model_checkpoint` is this key's default model."""
    model = _state(http).models.get(caller.name) or registry.resolve_default_model(settings.default_model)
    return {
        "sd_model_checkpoint": model_title(model),
        "sd_checkpoint_hash": None,
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
        "sd_vae": "Automatic",
    }


@router.post(
    "/options",
    response_model=None,
    openapi_extra={
        "requestBody": {  # none: nothing changes
            "required": False,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OverrideSettings"}}},
        }
    },
    responses={
        200: _answers("Set.", {"type": "boolean"}),
        400: _answers("An unknown `sd_model_checkpoint`."),
        422: _answers("A body that is not a JSON object."),
    },
)
async def set_options(http: Request, registry: RegistryDep, caller: CallerDep) -> Any:
    """Accepts any options (clients send back all they read); `sd_model_checkpoint` selects this key's
    default model for its later requests. The others are ignored."""
    options = await _json_object(http)
    if isinstance(options, JSONResponse):
        return options
    checkpoint = options.get("sd_model_checkpoint")
    if checkpoint is not None:
        model = find_model(str(checkpoint), registry)
        if model is None:
            return _error(
                400, f"unknown sd_model_checkpoint {checkpoint!r}; available: {', '.join(registry.model_ids)}"
            )
        _state(http).models[caller.name] = model
    return True


@router.get("/progress")
async def progress(http: Request, backend: BackendDep, caller: CallerDep) -> dict[str, Any]:
    """The caller's running (else waiting) /sdapi job: `progress` 0-1, `eta_relative` seconds,
    `current_image` the latest preview (base64 JPEG) when the engine gives one."""
    state = _state(http)
    job_ids = list(state.jobs.get(caller.name, {}))
    jobs = [job for job in [await run_in_threadpool(backend.get, job_id) for job_id in job_ids] if job is not None]
    running = [job for job in jobs if job.state in (JobState.STARTED, JobState.PROGRESS)]
    current = running[0] if running else (jobs[0] if jobs else None)
    body: dict[str, Any] = {
        "progress": 0.0,
        "eta_relative": 0.0,
        "state": {
            "skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": len(jobs),
            "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
        },
        "current_image": None,
        "textinfo": None,
    }
    if current is None:
        return body
    meta = current.meta or {}
    body["progress"] = round((current.progress or 0) / 100, 4)
    body["eta_relative"] = float(meta.get("eta_s") or 0.0)
    body["state"].update({
        "job": current.job_id,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(current.created_at or time.time())),
        "sampling_step": int(meta.get("current_step") or 0),
        "sampling_steps": int(meta.get("total_steps") or current.task.get("steps") or 0),
    })
    preview = state.previews.latest.get(current.job_id)
    if preview is not None:
        body["current_image"] = base64.b64encode(preview[1]).decode("ascii")
    return body


@router.post("/interrupt")
async def interrupt(http: Request, backend: BackendDep, caller: CallerDep) -> dict[str, Any]:
    """Cancels the caller's /sdapi jobs (running or waiting), never another key's."""
    job_ids = list(_state(http).jobs.get(caller.name, {}))
    for job_id in job_ids:
        await run_in_threadpool(backend.cancel, job_id)
    return {"interrupted": job_ids}


# -- checkpoints: what A1111 does to its one loaded model, done on every worker --------------------------
_EMPTY_OBJECT: dict[str, Any] = {"type": "object", "maxProperties": 0}
_CHECKPOINT_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: _answers("Asked of every ready worker (each does it between jobs): `{}`, as A1111.", _EMPTY_OBJECT),
    403: _answers("A key that is not an admin key."),
}


@router.post("/unload-checkpoint", response_model=None, responses=_CHECKPOINT_ANSWERS)
def unload_checkpoint(backend: BackendDep, caller: CallerDep) -> Any:
    """Admin keys: every worker frees every model it holds, in every tier (after the job it runs), as A1111
    frees its checkpoint. The next job loads its model again."""
    if not caller.admin:
        return _error(403, MODELS_ADMIN_ONLY)
    backend.order_models(ModelOrder("unload"))
    return {}


@router.post("/reload-checkpoint", response_model=None, responses=_CHECKPOINT_ANSWERS)
def reload_checkpoint(
    http: Request, backend: BackendDep, registry: RegistryDep, settings: SettingsDep, caller: CallerDep
) -> Any:
    """Admin keys: every worker loads the key's checkpoint (`sd_model_checkpoint` of POST /options, else the
    server's default model) again, as A1111 puts its checkpoint back on the GPU."""
    if not caller.admin:
        return _error(403, MODELS_ADMIN_ONLY)
    model = _state(http).models.get(caller.name)
    if model is None or registry.model(model) is None:  # none chosen, or removed from the registry since
        model = registry.resolve_default_model(settings.default_model)
    backend.order_models(ModelOrder("load", model))
    return {}


@router.post(
    "/refresh-checkpoints",
    response_model=None,
    responses={200: _answers("The registry file was read again: `null`, as A1111.", {"type": "null"})},
)
def refresh_checkpoints(http: Request) -> None:
    """Read the registry file again now (it is also read on its own within a second of a change): a new model
    is listed by GET /sdapi/v1/sd-models. A file that does not parse keeps the registry served (and is logged)."""
    watcher: RegistryWatcher = http.app.state.registry_watcher
    watcher.refresh()
