"""OpenAI's Images API on the job system: ``POST /v1/images/generations``, ``POST /v1/images/edits``
(multipart; img2img, or inpainting with a mask) and ``GET /v1/models``.

Each request becomes a ``POST /generate`` job (same checks, queue and per-key limits) and the answer waits
for its end (``compat_jobs``). Errors are OpenAI's body, ``{"error": {"message", "type", "param",
"code"}}``: a bad field 400 (naming it), an unknown model 404, a full queue 429, a failed job 500.

Mappings (README "Use it from your tools"): OpenAI's model names (``dall-e-2``, ``dall-e-3``,
``gpt-image-1``...) mean the server's default model; ``quality`` low → 20 steps, high/hd → 50, else 30
(an explicit ``steps`` wins); ``style`` is accepted and echoed, and changes nothing.
"""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from imagen.api.compat_jobs import (
    JobWaitTimeout,
    WaitAbandoned,
    image_files,
    read_image,
    revised_prompt,
    submit,
    wait_for_end,
    wait_limit_s,
)
from imagen.api.deps import BackendDep, CallerDep, RegistryDep, SettingsDep
from imagen.api.schemas import MAX_IMAGES, MAX_PROMPT_CHARS, GenerationRequest, LoraRequest
from imagen.api.submission import InvalidRequest
from imagen.config import Settings
from imagen.errors import BrokerUnavailableError, KeyQueueFullError, QueueFullError, UnavailableError
from imagen.inputs.images import MAX_IMAGE_BYTES, BadImage, check_image
from imagen.jobs.types import JobState
from imagen.registry import Registry

OPENAI_MODEL_NAMES = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")
QUALITY_STEPS = {"low": 20, "medium": 30, "standard": 30, "auto": 30, "high": 50, "hd": 50}
# Our field names as OpenAI's clients know them (an error names the field the client sent).
_PARAM_NAMES = {"width": "size", "height": "size", "num_images": "n", "guidance_scale": "guidance_scale"}

router = APIRouter(prefix="/v1", tags=["OpenAI compatible"])

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
    401: _error("Missing or unknown API key."),
    404: _error("Unknown model (`code`: model_not_found)."),
    429: _error("Queue full, or this key has as many jobs waiting as it may (`code`: queue_full)."),
    500: _error("The job failed (`code`: generation_failed) or was cancelled."),
    503: _error("The job queue is unreachable."),
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
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(None, description="A model id (GET /v1/models); OpenAI's names: the default one.")
    n: int = Field(1, ge=1, le=MAX_IMAGES, strict=True)
    size: str | None = Field(None, description='"WIDTHxHEIGHT" (SDXL buckets: GET /models) or "auto".')
    response_format: Literal["url", "b64_json"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = None
    style: Literal["vivid", "natural"] | None = None
    background: Literal["auto", "opaque", "transparent"] | None = None
    moderation: Literal["auto", "low"] | None = None
    user: str | None = None
    # extensions (a strict OpenAI client never sends them)
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
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


def _parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    width, sep, height = size.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise _invalid(f"size must be 'WIDTHxHEIGHT' (e.g. '1024x1024') or 'auto', not {size!r}", "size")
    return int(width), int(height)


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
    fields: ImageGenerationRequest, registry: Registry, init_image: str | None = None, mask: str | None = None
) -> GenerationRequest:
    width, height = _parse_size(fields.size)
    steps = fields.steps if fields.steps is not None else QUALITY_STEPS.get(fields.quality or "auto", 30)
    values: dict[str, Any] = {
        "prompt": fields.prompt,
        "negative_prompt": fields.negative_prompt,
        "model": _model_id(fields.model, registry),
        "loras": fields.loras,
        "steps": steps,
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
        job_id = await submit(request, backend, registry, settings, caller)
    except InvalidRequest as exc:
        first = exc.errors[0]
        param = _PARAM_NAMES.get(str(first.loc[0]), str(first.loc[0]))
        if param == "model":
            return OpenAIError(404, first.message, "invalid_request_error", "model", "model_not_found").response()
        return _invalid(first.message, param).response()
    except (QueueFullError, KeyQueueFullError) as exc:
        return OpenAIError(429, f"Too many jobs waiting: {exc}; try again later", "rate_limit_exceeded", None,
                           "queue_full").response({"Retry-After": "30"})
    except BrokerUnavailableError:
        return OpenAIError(503, "The job queue is unreachable; try again later", "server_error", None,
                           "queue_unavailable").response({"Retry-After": "10"})
    except UnavailableError as exc:  # a full outputs disk, too many images waiting for a copy
        return OpenAIError(503, f"The service cannot take jobs now ({exc}); try again later", "server_error", None,
                           "service_unavailable").response({"Retry-After": "30"})
    try:
        job = await wait_for_end(
            backend, job_id, wait_limit_s(settings), client=http, cancel_on_disconnect=settings.cancel_on_disconnect
        )
    except JobWaitTimeout as exc:
        return OpenAIError(504, str(exc), "server_error", None, "timeout").response()
    except WaitAbandoned:  # the server is stopping (a client that went away reads nothing)
        return OpenAIError(503, "The server is restarting; try again", "server_error", None,
                           "server_stopping").response({"Retry-After": "10"})
    if job.state is not JobState.SUCCESS or job.result is None:
        code = "cancelled" if job.state is JobState.REVOKED else "generation_failed"
        return OpenAIError(500, f"The image generation failed: {job.error}", "server_error", None, code).response()
    wants_url = (fields.response_format or "url") == "url"
    output_format = "png" if wants_url else (fields.output_format or "png")
    prompt = revised_prompt(job)
    filenames = [str(image["filename"]) for image in image_files(job)]
    metadata = job.result["metadata"]
    body: dict[str, Any] = {
        "created": int(job.created_at or time.time()),
        "data": [],  # the images, below
        "size": f"{metadata.get('width')}x{metadata.get('height')}",
        "output_format": output_format,
        "quality": fields.quality or "auto",
    }
    if fields.style is not None:
        body["style"] = fields.style
    if wants_url:
        body["data"] = [
            {"url": f"{base_url(http, settings)}/download/{filename}", "revised_prompt": prompt}
            for filename in filenames
        ]
        return JSONResponse(body)
    pngs = [await read_image(backend, settings, filename) for filename in filenames]
    return await run_in_threadpool(_b64_answer, body, pngs, output_format, fields.output_compression, prompt)


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
        raw = await run_in_threadpool(json.loads, await http.body())  # up to 32 MB: not on the loop
        fields = ImageGenerationRequest.model_validate(raw)
        request = _generation_request(fields, registry)
    except json.JSONDecodeError:
        return _invalid("The body is not valid JSON", None).response()
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
                        "prompt": {"type": "string"},
                        "model": {"type": "string"},
                        "n": {"type": "integer", "minimum": 1, "maximum": MAX_IMAGES},
                        "size": {"type": "string"},
                        "response_format": {"enum": ["url", "b64_json"]},
                        "output_format": {"enum": ["png", "jpeg", "webp"]},
                        "quality": {"type": "string"},
                        "user": {"type": "string"},
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
        request = await run_in_threadpool(_edit_request, fields, registry, picture, mask_bytes)
    except ValidationError as exc:
        return _from_validation(exc).response()
    except OpenAIError as exc:
        return exc.response()
    return await _run(fields, request, http, backend, registry, settings, caller)


def _edit_request(
    fields: ImageGenerationRequest, registry: Registry, picture: bytes, mask: bytes | None
) -> GenerationRequest:
    """The edit's job request, its image and mask checked (which decodes them: an 11 MB JPEG takes more than a
    second) in a worker thread, never on the event loop."""
    try:
        check_image(picture)
    except BadImage as exc:
        raise _invalid(f"image: {exc}", "image") from exc
    mask_url = _mask_from_transparency(mask) if mask is not None else None
    return _generation_request(fields, registry, init_image=_data_url(picture), mask=mask_url)


@router.get("/models")
def models(registry: RegistryDep) -> dict[str, Any]:
    """The registry's models in OpenAI's list format."""
    return {
        "object": "list",
        "data": [{"id": m.id, "object": "model", "created": 0, "owned_by": "imagen"} for m in registry.models],
    }
