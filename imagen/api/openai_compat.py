"""OpenAI's Images API on the job system: ``POST /v1/images/generations``, ``POST /v1/images/edits``
(multipart; img2img, or inpainting with a mask) and ``GET /v1/models``.

Each request becomes a ``POST /generate`` job (same checks, queue and per-key limits) and the answer waits
for its end (``compat_jobs``). Errors are OpenAI's body, ``{"error": {"message", "type", "param",
"code"}}``: a bad field 400 (naming it), an unknown model 404, a full queue 429, a failed job 500.

Mappings (docs/clients.md): OpenAI's model names (``dall-e-2``, ``dall-e-3``, ``gpt-image-1``...) mean the
server's default model; ``quality`` low → 2/3 of the model's default steps (20 of the reference's 30), high/hd
→ 5/3 (50), else the default (an explicit ``steps`` wins); ``style`` is accepted and echoed, and changes nothing
(dall-e-3 clients send it unasked); ``background: transparent`` is refused (our pictures are opaque);
``moderation`` and ``user`` are accepted (no moderation here; ``user`` is the caller's own label).
"""

from __future__ import annotations

import base64
import io
import re
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from imagen.api.compat_jobs import NoImages, Outcome, read_images, run_job
from imagen.api.deps import BackendDep, CallerDep, RegistryDep, SettingsDep
from imagen.api.json_body import BadJson, read_json
from imagen.api.schemas import (
    MAX_PROMPT_CHARS,
    GenerationRequest,
    GuidanceScale,
    ImageCount,
    IntegerNotText,
    LoraRequest,
    Seed,
    Steps,
)
from imagen.config import Settings
from imagen.inputs.images import MAX_IMAGE_BYTES, BadImage, check_image
from imagen.inputs.sizes import MAX_SIDE, MIN_SIDE, SIDE_STEP
from imagen.registry import Registry

OPENAI_MODEL_NAMES = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")
# ``quality`` as a share of the model's default steps (the reference's 30: low 20, high 50), kept in its range.
QUALITY_STEPS = {"low": 2 / 3, "high": 5 / 3, "hd": 5 / 3}
# Our field names as OpenAI's clients know them (an error names the field the client sent).
_PARAM_NAMES = {"width": "size", "height": "size", "num_images": "n", "guidance_scale": "guidance_scale"}

router = APIRouter(prefix="/v1", tags=["OpenAI compatible"])

# A size a job may have ("auto": the model's own): both sides from the list, so the document says it exactly
_SIDES = "|".join(str(side) for side in range(MIN_SIDE, MAX_SIDE + 1, SIDE_STEP))
_SIZE = re.compile(rf"^(auto|({_SIDES})[xX]({_SIDES}))$")  # no named groups: JSON Schema's regex has none

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("A field the server refuses (`param` names it)."),
    404: _error("Unknown model (`code`: model_not_found)."),
    429: _error("Queue full, or this key has as many jobs waiting as it may (`code`: queue_full)."),
    500: _error("The job failed (`code`: generation_failed) or was cancelled."),
    503: _error("The job queue is unreachable, the service cannot take jobs now, or it is restarting."),
    504: _error("The job did not end in time."),
}
_IMAGES_RESPONSE: dict[str, Any] = {
    "type": "object",
    "required": ["created", "data"],
    "properties": {
        "created": {"type": "integer"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "url": {"type": "string"}, "b64_json": {"type": "string"}, "revised_prompt": {"type": "string"},
                },
            },
        },
        "size": {"type": "string"},
        "output_format": {"type": "string"},
        "quality": {"type": "string"},
        "style": {"type": "string"},
    },
}
_OK: dict[int | str, dict[str, Any]] = {
    200: {"description": "The images.", "content": {"application/json": {"schema": _IMAGES_RESPONSE}}}
}


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(None, description="A model id (GET /v1/models); OpenAI's names: the default one.")
    n: ImageCount = 1
    size: str | None = Field(
        None,
        description=f'"WIDTHxHEIGHT", each a multiple of {SIDE_STEP} from {MIN_SIDE} to {MAX_SIDE} (SDXL buckets: '
        'GET /models), or "auto".',
        json_schema_extra={"pattern": _SIZE.pattern},
    )
    response_format: Literal["url", "b64_json"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: Annotated[int, Field(ge=0, le=100), IntegerNotText] | None = None
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = None
    style: Literal["vivid", "natural"] | None = None
    # "transparent" is refused by this list, not dropped: our pictures are opaque.
    background: Literal["auto", "opaque"] | None = None
    moderation: Literal["auto", "low"] | None = None
    user: str | None = None
    # extensions (a strict OpenAI client never sends them)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    seed: Seed | None = None
    steps: Steps | None = None
    guidance_scale: GuidanceScale | None = None
    loras: list[LoraRequest] = Field(default_factory=list)
    scheduler: str | None = None


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def _invalid(message: str, param: str | None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


# How a job that ends without images is answered: status, type, code, message ({}: the reason). A job the
# submission refuses is answered below: its error names the field.
_NO_IMAGES: dict[Outcome, tuple[int, str, str, str]] = {
    Outcome.QUEUE_FULL: (429, "rate_limit_exceeded", "queue_full", "Too many jobs waiting: {}; try again later"),
    Outcome.QUEUE_UNREACHABLE: (
        503, "server_error", "queue_unavailable", "The job queue is unreachable; try again later"
    ),
    Outcome.UNAVAILABLE: (
        503, "server_error", "service_unavailable", "The service cannot take jobs now ({}); try again later"
    ),
    Outcome.TIMED_OUT: (504, "server_error", "timeout", "{}"),
    # the server is stopping (a client that went away reads nothing)
    Outcome.ABANDONED: (503, "server_error", "server_stopping", "The server is restarting; try again"),
    Outcome.FAILED: (500, "server_error", "generation_failed", "The image generation failed: {}"),
    Outcome.CANCELLED: (500, "server_error", "cancelled", "The image generation failed: {}"),
}  # fmt: skip


def _no_images(ended: NoImages) -> JSONResponse:
    if ended.outcome is Outcome.REFUSED:
        first = ended.problems[0]
        param = _PARAM_NAMES.get(str(first.loc[0]), str(first.loc[0]))
        if param == "model":
            return OpenAIError(404, first.message, "invalid_request_error", "model", "model_not_found").response()
        return _invalid(first.message, param).response()
    status, type_, code, message = _NO_IMAGES[ended.outcome]
    retry_after = None if ended.retry_after_s is None else {"Retry-After": str(ended.retry_after_s)}
    return OpenAIError(status, message.format(ended.reason), type_, None, code).response(retry_after)


def _parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    match = _SIZE.fullmatch(size)
    if match is None:
        raise _invalid(
            f"size must be 'WIDTHxHEIGHT', each a multiple of {SIDE_STEP} from {MIN_SIDE} to {MAX_SIDE} "
            f"(e.g. '1024x1024'), or 'auto'; not {size!r}", "size",
        )
    return int(match[2]), int(match[3])


def _model_id(model: str | None, registry: Registry) -> str | None:
    if model is None or model in OPENAI_MODEL_NAMES:
        return None  # the server's default
    if registry.model(model) is None:
        available = ", ".join(registry.model_ids)
        raise OpenAIError(
            404, f"The model {model!r} does not exist; available: {available}", "invalid_request_error", "model",
            "model_not_found",
        )
    return model


def _generation_request(
    fields: ImageGenerationRequest,
    registry: Registry,
    default_model: str | None,
    init_image: str | None = None,
    mask: str | None = None,
) -> GenerationRequest:
    width, height = _parse_size(fields.size)
    model_id = _model_id(fields.model, registry)
    values: dict[str, Any] = {
        "prompt": fields.prompt,
        "negative_prompt": fields.negative_prompt,
        "model": model_id,
        "loras": fields.loras,
        "seed": fields.seed,
        "width": width,
        "height": height,
        "num_images": fields.n,
        "scheduler": fields.scheduler,
        "init_image": init_image,
        "mask_image": mask,
    }
    if fields.guidance_scale is not None:
        values["guidance_scale"] = fields.guidance_scale
    if fields.steps is not None:
        values["steps"] = fields.steps
    elif (share := QUALITY_STEPS.get(fields.quality or "auto")) is not None:
        model = registry.model(model_id or registry.resolve_default_model(default_model))
        if model is not None:
            values["steps"] = min(max(round(model.steps.default * share), model.steps.min), model.steps.max)
    try:
        return GenerationRequest.model_validate(values)
    except ValidationError as exc:
        raise _from_validation(exc) from exc


def _from_validation(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> OpenAIError:
    error = exc.errors()[0]
    loc = [part for part in error["loc"] if part not in prefix]
    param = _PARAM_NAMES.get(str(loc[0]), str(loc[0])) if loc else None
    return _invalid(f"{param}: {error['msg']}" if param else error["msg"], param)


def base_url(request: Request, settings: Settings) -> str:
    """Where clients reach this server: IMAGEN_PUBLIC_URL, else the proxy's forwarded headers, else the
    request's own address."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    host = request.headers.get("x-forwarded-host")
    if host:
        proto = request.headers.get("x-forwarded-proto", request.url.scheme)
        return f"{proto.split(',')[0].strip()}://{host.split(',')[0].strip()}"
    return str(request.base_url).rstrip("/")


def _convert(png: bytes, output_format: str, compression: int | None) -> bytes:
    if output_format == "png":
        return png
    image = Image.open(io.BytesIO(png)).convert("RGB")
    out = io.BytesIO()
    image.save(out, format=output_format.upper(), quality=compression if compression is not None else 90)
    return out.getvalue()


async def _run(
    fields: ImageGenerationRequest,
    request: GenerationRequest,
    http: Request,
    backend: BackendDep,
    registry: RegistryDep,
    settings: SettingsDep,
    caller: CallerDep,
) -> JSONResponse:
    try:
        job = await run_job(request, http, backend, registry, settings, caller)
    except NoImages as ended:
        return _no_images(ended)
    wants_url = (fields.response_format or "url") == "url"
    output_format = "png" if wants_url else (fields.output_format or "png")
    body: dict[str, Any] = {
        "created": int(job.record.created_at or time.time()),
        "data": [],  # the images, below
        "size": f"{job.metadata.get('width')}x{job.metadata.get('height')}",
        "output_format": output_format,
        "quality": fields.quality or "auto",
    }
    if fields.style is not None:
        body["style"] = fields.style
    if wants_url:
        body["data"] = [
            {"url": f"{base_url(http, settings)}/download/{filename}", "revised_prompt": job.revised_prompt}
            for filename in job.filenames
        ]
        return JSONResponse(body)
    pngs = await read_images(backend, settings, job)
    return await run_in_threadpool(
        _b64_answer, body, pngs, output_format, fields.output_compression, job.revised_prompt
    )


def _b64_answer(
    body: dict[str, Any], pngs: list[bytes], output_format: str, compression: int | None, prompt: str
) -> JSONResponse:
    """``body`` with the images as ``b64_json``: converted, encoded and rendered in a worker thread. Four
    2048² WebP are more than a second of CPU, which the event loop must not spend."""
    body["data"] = [
        {"b64_json": base64.b64encode(_convert(png, output_format, compression)).decode("ascii"),
         "revised_prompt": prompt}
        for png in pngs
    ]  # fmt: skip
    return JSONResponse(body)


@router.post(
    "/images/generations",
    response_model=None,
    responses={**_OK, **_ERRORS},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": ImageGenerationRequest.model_json_schema(ref_template="#/components/schemas/{model}")
                }
            },
        }
    },
)
async def generations(
    http: Request,
    backend: BackendDep,
    registry: RegistryDep,
    settings: SettingsDep,
    caller: CallerDep,
) -> JSONResponse:
    """OpenAI's image generation: waits for the job and answers its images (`url` or `b64_json`)."""
    try:
        raw = await read_json(http)
        fields = ImageGenerationRequest.model_validate(raw)
        request = _generation_request(fields, registry, settings.default_model)
    except BadJson as exc:
        return _invalid(str(exc), exc.field).response()
    except ValidationError as exc:
        return _from_validation(exc).response()
    except OpenAIError as exc:
        return exc.response()
    return await _run(fields, request, http, backend, registry, settings, caller)


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _mask_from_transparency(data: bytes) -> str:
    """OpenAI's mask (transparent = repaint) as ours (white = repaint)."""
    try:
        checked = check_image(data)
    except BadImage as exc:
        raise _invalid(f"mask: {exc}", "mask") from exc
    image = checked.image
    if "A" not in image.getbands():
        raise _invalid("mask must have an alpha channel: its transparent areas are repainted", "mask")
    alpha = image.getchannel("A").point(lambda a: 255 if a < 128 else 0)
    out = io.BytesIO()
    alpha.save(out, format="PNG")
    return _data_url(out.getvalue())


_EDIT_FIELDS = ("prompt", "model", "n", "size", "response_format", "output_format", "quality", "user")
_GENERATION_FIELDS: dict[str, Any] = ImageGenerationRequest.model_json_schema()["properties"]


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    choices = [choice for choice in schema.get("anyOf", []) if choice.get("type") != "null"]
    if len(choices) != 1:
        return schema
    return {**{key: value for key, value in schema.items() if key not in ("anyOf", "default")}, **choices[0]}
_EDIT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "prompt"],
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP."},
                        "mask": {"type": "string", "format": "binary", "description": "Transparent = repaint."},
                        # the generation request's fields, as text (a form has no null)
                        **{name: _not_null(_GENERATION_FIELDS[name]) for name in _EDIT_FIELDS},
                    },
                }
            }
        },
    }
}


async def _file(form: Any, *names: str) -> bytes | None:
    for name in names:
        value = form.get(name)
        if value is not None and not isinstance(value, str):
            data: bytes = await value.read(MAX_IMAGE_BYTES + 1)
            return data
    return None


@router.post("/images/edits", response_model=None, responses={**_OK, **_ERRORS}, openapi_extra=_EDIT_BODY)
async def edits(
    http: Request,
    backend: BackendDep,
    registry: RegistryDep,
    settings: SettingsDep,
    caller: CallerDep,
) -> JSONResponse:
    """OpenAI's image edit (multipart): img2img of `image`, or inpainting where `mask` (or the image
    itself) is transparent."""
    try:
        form = await http.form()
    except Exception:  # not multipart, or a broken one
        return _invalid("expected a multipart/form-data body with `image` and `prompt`", None).response()
    picture = await _file(form, "image", "image[]")
    if picture is None:
        return _invalid("image: give the image to edit as a file", "image").response()
    mask_bytes = await _file(form, "mask")
    values: dict[str, Any] = {name: form.get(name) for name in _EDIT_FIELDS if isinstance(form.get(name), str)}
    if "n" in values:
        values["n"] = int(values["n"]) if str(values["n"]).isdigit() else values["n"]
    try:
        fields = ImageGenerationRequest.model_validate(values)
        request = await run_in_threadpool(
            _edit_request, fields, registry, settings.default_model, picture, mask_bytes
        )
    except ValidationError as exc:
        return _from_validation(exc).response()
    except OpenAIError as exc:
        return exc.response()
    return await _run(fields, request, http, backend, registry, settings, caller)


def _edit_request(
    fields: ImageGenerationRequest, registry: Registry, default_model: str | None, picture: bytes, mask: bytes | None
) -> GenerationRequest:
    """The edit's job request, its image and mask checked (which decodes them: an 11 MB JPEG takes more than a
    second) in a worker thread, never on the event loop."""
    try:
        check_image(picture)
    except BadImage as exc:
        raise _invalid(f"image: {exc}", "image") from exc
    mask_url = _mask_from_transparency(mask) if mask is not None else None
    return _generation_request(fields, registry, default_model, init_image=_data_url(picture), mask=mask_url)


@router.get("/models")
def models(registry: RegistryDep) -> dict[str, Any]:
    """The registry's models in OpenAI's list format."""
    return {
        "object": "list",
        "data": [{"id": m.id, "object": "model", "created": 0, "owned_by": "imagen"} for m in registry.models],
    }
