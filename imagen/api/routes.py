"""The endpoints of the API reference v2.0, with its status codes and French ``detail`` strings, and
``POST /cancel/{job_id}`` and ``GET /events/{job_id}`` (docs/cancel-and-events.md).

Every route that reaches the job backend or the disk is a plain ``def``: FastAPI runs it in its thread
pool, so a slow Redis or disk never stalls the event loop (``/health`` keeps answering). Each route
declares every status code and media type it can answer, for the OpenAPI document.
"""

from __future__ import annotations

import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, File, Header, HTTPException, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from imagen.access.keys import Caller
from imagen.api.deps import BackendDep, CallerDep, RegistryDep, SettingsDep, WebhooksDep
from imagen.api.events import first_event_id, status_events
from imagen.api.headers import generation_metadata_header
from imagen.api.json_body import OffLoopJsonRoute
from imagen.api.schemas import (
    MAX_IMAGES,
    CancelResponse,
    CancelTooLate,
    ControlNetInfo,
    ControlNetList,
    Detail,
    EmbeddingInfo,
    EmbeddingList,
    GenerationRequest,
    GenerationResponse,
    Health,
    ImageFailed,
    ImageProcessing,
    ImageRevoked,
    JobStatus,
    LoraInfo,
    LoraList,
    ModelHolder,
    ModelInfo,
    ModelList,
    ModelOrderAccepted,
    PreprocessorInfo,
    SchedulerList,
    Size,
    UploadResponse,
    UpscaleRequest,
    UpscalerInfo,
    UpscalerList,
    WorkerStatus,
)
from imagen.api.submission import InvalidRequest, prepare_job, prepare_upscale
from imagen.config import Settings
from imagen.errors import UploadQuotaError
from imagen.generation.base import MODEL_TIERS
from imagen.generation.samplers import available_samplers
from imagen.inputs.control_maps import PREPROCESSORS
from imagen.inputs.images import MAX_IMAGE_BYTES, BadImage, check_image
from imagen.inputs.sizes import recommended_sizes
from imagen.jobs.backend import JobBackend
from imagen.jobs.model_control import ModelOrder
from imagen.jobs.types import JobRecord, JobState, Upload, UploadQuota
from imagen.outputs.serving import resolve_servable
from imagen.registry import Registry

JOB_NOT_FOUND = "Job ID non trouvé"
IMAGE_NOT_FOUND = "Image non trouvée"
ALREADY_FINISHED = "Job déjà terminé"
MODEL_NOT_FOUND = "Modèle non trouvé"
WORKER_NOT_FOUND = "Worker non trouvé (ou pas prêt)"
MODELS_ADMIN_ONLY = "Chargement et déchargement des modèles réservés aux clés API d'administration"

_PNG: dict[str, Any] = {"image/png": {"schema": {"type": "string", "format": "binary"}}}
_NOT_FOUND = {"model": Detail, "description": "Not found (or expired)."}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again.", "schema": {"type": "string"}}}

# One Server-Sent Event of /events (the Open API 3.2 way: ``itemSchema`` describes each event).
_STATUS_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["event", "id", "data"],
    "properties": {
        "event": {"const": "status"},
        "id": {"type": "string", "description": "Increasing integers, counted on from Last-Event-ID."},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": "#/components/schemas/JobStatus"},
        },
    },
}

_PREVIEW_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["event", "id", "data"],
    "properties": {
        "event": {"const": "preview"},
        "id": {"type": "string"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {
                "type": "object",
                "required": ["step", "image"],
                "properties": {
                    "step": {"type": "integer", "description": "The denoising step it shows (from 1)."},
                    "image": {"type": "string", "description": "data:image/jpeg;base64,... at most 256 px."},
                },
            },
        },
    },
}

router = APIRouter(route_class=OffLoopJsonRoute)  # /generate's body (up to 32 MB) is parsed off the loop


@router.post(
    "/generate",
    status_code=201,
    response_model=GenerationResponse,
    responses={
        400: {"model": Detail, "description": "A body that is not UTF-8 text."},
        413: {"model": Detail, "description": "Body larger than IMAGEN_MAX_BODY_BYTES."},
        429: {
            "model": Detail,
            "description": "With API keys: this key has as many jobs waiting as it may (IMAGEN_KEY_MAX_WAITING), "
            "or sent too many requests this minute.",
            "headers": _RETRY_AFTER,
        },
        503: {
            "model": Detail,
            "description": "Queue full, broker or job database unreachable, outputs disk full, or too many images "
            "waiting to be copied (distributed).",
            "headers": _RETRY_AFTER,
        },
    },
)
def generate(
    request: GenerationRequest,
    backend: BackendDep,
    registry: RegistryDep,
    settings: SettingsDep,
    webhooks: WebhooksDep,
    caller: CallerDep,
) -> GenerationResponse:
    try:
        job = prepare_job(request, registry, settings, key_name=caller.name, uploads=backend.load_upload)
    except InvalidRequest as exc:
        raise RequestValidationError([error.as_pydantic_error() for error in exc.errors]) from exc
    # prepare_job refused a webhook on a server without a secret (no dispatcher)
    subscribed = (
        webhooks.subscribed(job.job_id, request.webhook, request.webhook_events_filter)
        if webhooks is not None and request.webhook is not None
        else nullcontext()
    )
    with subscribed:
        submitted = backend.submit(job, key_max_waiting=caller.max_waiting)
    return GenerationResponse(
        job_id=submitted.job_id,
        status="queued",
        message=f"Tâche en file d'attente. Position estimée: {submitted.position}",
    )


@router.post(
    "/upscale",
    status_code=201,
    response_model=GenerationResponse,
    responses={
        413: {"model": Detail, "description": "Body larger than IMAGEN_MAX_BODY_BYTES."},
        429: {"model": Detail, "description": "With API keys: this key has as many jobs waiting as it may, or sent "
              "too many requests this minute.", "headers": _RETRY_AFTER},
        503: {"model": Detail, "description": "Queue full, broker or job database unreachable, outputs disk full.",
              "headers": _RETRY_AFTER},
    },
)  # fmt: skip
def upscale(request: UpscaleRequest, backend: BackendDep, registry: RegistryDep, settings: SettingsDep,
            caller: CallerDep) -> GenerationResponse:  # fmt: skip
    """A picture made larger by an upscaler (Lanczos or an upscaler model): a job like POST /generate's, followed
    with /status, /events, /cancel and fetched with /image; the result is upscale_<date>_<time>_<hex>.png."""
    try:
        job = prepare_upscale(request, registry, settings, key_name=caller.name, uploads=backend.load_upload)
    except InvalidRequest as exc:
        raise RequestValidationError([error.as_pydantic_error() for error in exc.errors]) from exc
    submitted = backend.submit(job, key_max_waiting=caller.max_waiting)
    return GenerationResponse(
        job_id=submitted.job_id,
        status="queued",
        message=f"Tâche en file d'attente. Position estimée: {submitted.position}",
    )


def _find(backend: BackendDep, job_id: str, caller: CallerDep) -> JobRecord:
    """The job, if it exists and is the caller's: another key's job is answered exactly as a missing one,
    so job ids cannot be probed."""
    job = backend.get(job_id)
    if job is None or not caller.owns(job.key_name):
        raise HTTPException(status_code=404, detail=JOB_NOT_FOUND)
    return job


def status_body(job: JobRecord) -> dict[str, Any]:
    """What ``/status`` answers for the job: also the data of its ``/events`` and webhooks."""
    body: dict[str, Any] = {"job_id": job.job_id, "status": job.state.value, "result": job.result}
    if job.state.shows_error():
        body["error"] = job.error
    elif job.meta is not None and not job.state.is_terminal():
        body["meta"] = job.meta
    return body


@router.get("/status/{job_id}", response_model=None, responses={200: {"model": JobStatus}, 404: _NOT_FOUND})
def status(job_id: str, backend: BackendDep, caller: CallerDep) -> JSONResponse:
    return JSONResponse(status_body(_find(backend, job_id, caller)))


@router.get(
    "/events/{job_id}",
    response_model=None,
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"itemSchema": {"oneOf": [_STATUS_EVENT, _PREVIEW_EVENT]}}},
            "description": "`status` events (data: the /status JSON) on each change, until the terminal one; "
            "`preview` events too with `?preview=1`.",
        },
        404: _NOT_FOUND,
    },
)
async def events(
    job_id: str,
    backend: BackendDep,
    settings: SettingsDep,
    caller: CallerDep,
    last_event_id: Annotated[str | None, Header(include_in_schema=False)] = None,
    preview: Annotated[
        bool, Query(description="Also send `preview` events: a small JPEG of the image every few steps.")
    ] = False,
) -> EventSourceResponse:
    """Live progress: a `status` event at once and on every change of state or progress; the stream ends
    after the terminal event (SUCCESS, FAILURE, REVOKED)."""
    await run_in_threadpool(_find, backend, job_id, caller)  # an unknown id: 404 JSON, not a stream
    return EventSourceResponse(
        status_events(backend, job_id, status_body, first_event_id(last_event_id), previews=preview),
        ping=settings.events_ping_s,
    )


@router.get(
    "/image/{job_id}",
    response_model=None,
    response_class=FileResponse,  # for the document: the 200 is a PNG (its other answers say their own type)
    responses={
        200: {
            "content": _PNG,
            "description": "The PNG.",
            "headers": {
                "X-Job-ID": {"schema": {"type": "string"}},
                "X-Generation-Metadata": {
                    "description": "ASCII JSON, at most 2 KB: model, loras, steps, guidance_scale, seed, "
                    "ip_strength, size, sampler (full metadata: /status and the PNG).",
                    "schema": {"type": "string"},
                },
            },
        },
        202: {"model": ImageProcessing, "description": "Still queued or running."},
        404: _NOT_FOUND,
        410: {"model": ImageRevoked, "description": "The job was cancelled (REVOKED): no image, ever."},
        500: {"model": ImageFailed, "description": "The job failed."},
    },
)
def image(
    job_id: str,
    backend: BackendDep,
    settings: SettingsDep,
    caller: CallerDep,
    index: Annotated[
        int, Query(ge=0, le=MAX_IMAGES - 1, description="Which image of a `num_images` job (0: the first).")
    ] = 0,
) -> FileResponse | JSONResponse:
    job = _find(backend, job_id, caller)
    if job.state is JobState.FAILURE:
        return JSONResponse({"detail": {"status": "failed", "error": job.error}}, status_code=500)
    if job.state is JobState.REVOKED:
        return JSONResponse({"detail": {"status": "revoked", "error": job.error}}, status_code=410)
    if job.state is not JobState.SUCCESS or job.result is None:
        meta = job.meta or {"step": "queued" if job.state is JobState.PENDING else "starting", "progress": 0}
        detail = {
            "status": "processing",
            "message": "Image en cours de génération",
            "state": job.state.value,
            "meta": meta,
        }
        return JSONResponse({"detail": detail}, status_code=202)
    images = job.result.get("images") or [{"filename": job.result["filename"]}]
    if index >= len(images):
        raise HTTPException(status_code=404, detail=IMAGE_NOT_FOUND)
    filename = images[index]["filename"]
    if index > 0:
        backend.ensure_output(filename)  # distributed: the first one is fetched by get()
    path = resolve_servable(settings.outputs_dir, filename)
    if path is None:
        raise HTTPException(status_code=404, detail=IMAGE_NOT_FOUND)
    metadata = {**job.result["metadata"], "seed": images[index].get("seed", job.result["metadata"].get("seed"))}
    headers = {"X-Job-ID": job.job_id, "X-Generation-Metadata": generation_metadata_header(metadata)}
    return FileResponse(path, media_type="image/png", headers=headers)


@router.post(
    "/cancel/{job_id}",
    response_model=CancelResponse,
    responses={
        404: _NOT_FOUND,
        409: {"model": CancelTooLate, "description": "The job ended first (SUCCESS or FAILURE)."},
    },
)
def cancel(job_id: str, backend: BackendDep, caller: CallerDep) -> CancelResponse | JSONResponse:
    """A waiting job never starts; a running one stops at its next denoising step, without an image. Both
    end REVOKED. Cancelling a REVOKED job again answers the same."""
    _find(backend, job_id, caller)  # another key's job: 404, and untouched
    state = backend.cancel(job_id)
    if state is None:
        raise HTTPException(status_code=404, detail=JOB_NOT_FOUND)
    if state is not JobState.REVOKED:
        return JSONResponse({"detail": {"status": state.value, "message": ALREADY_FINISHED}}, status_code=409)
    return CancelResponse(job_id=job_id, status="REVOKED")


def _serve_output(filename: str, backend: BackendDep, settings: SettingsDep, caller: CallerDep) -> FileResponse:
    if not caller.admin and not caller.owns(backend.output_owner(filename)):
        raise HTTPException(status_code=404, detail=IMAGE_NOT_FOUND)  # another key's file: as if missing
    path = resolve_servable(settings.outputs_dir, filename)
    if path is None:
        backend.ensure_output(filename)  # distributed: the image may still be on its way from a worker
        path = resolve_servable(settings.outputs_dir, filename)
    if path is None:
        raise HTTPException(status_code=404, detail=IMAGE_NOT_FOUND)
    return FileResponse(path, media_type="image/png")


for _prefix in ("/download", "/outputs"):
    router.add_api_route(
        _prefix + "/{filename:path}",
        _serve_output,
        name=_prefix.strip("/"),
        methods=["GET"],
        response_model=None,
        response_class=FileResponse,
        responses={200: {"content": _PNG, "description": "The PNG."}, 404: _NOT_FOUND},
    )


def known_tiers(models: dict[str, str]) -> dict[str, str]:
    """A worker's held models, less any in a tier this API does not know (a newer worker's)."""
    return {model_id: tier for model_id, tier in sorted(models.items()) if tier in MODEL_TIERS}


def model_holders(backend: JobBackend) -> dict[str, list[ModelHolder]]:
    """Which workers hold each model now, and in which tier, from what they last reported."""
    found: dict[str, list[ModelHolder]] = {}
    for worker in backend.health().workers:
        for model_id, tier in known_tiers(worker.models).items():
            found.setdefault(model_id, []).append(ModelHolder(worker=worker.name, tier=tier))
    return found


@router.get("/models", response_model=ModelList)
def models(registry: RegistryDep, backend: BackendDep) -> ModelList:
    """The registry's models; `loaded_on`: the workers that hold each one now, and in which tier."""
    holders = model_holders(backend)
    return ModelList(
        models=[
            ModelInfo(
                id=m.id,
                name=m.name,
                description=m.description,
                vae_path=m.declared_vae_path,
                default_negative=m.default_negative,
                native_size=Size(width=m.size, height=m.size),
                sizes=[Size(width=w, height=h) for w, h in recommended_sizes(m.size)],
                default_scheduler=m.scheduler,
                clip_skip=m.clip_skip or 1,
                guidance_rescale=m.guidance_rescale,
                guidance_stop=m.guidance_stop,
                loaded_on=holders.get(m.id, []),
                base=m.base,
                controlnets=[c.id for c in registry.controlnets_for(m)],
                steps=m.steps,
                guidance_scale=m.guidance_scale,
                timestep_spacing=m.timestep_spacing,
                refiner=m.refiner,
                default_refiner=m.default_refiner,
                refiners=[r.id for r in registry.refiners_for(m)],
            )
            for m in registry.models
        ]
    )


def order_models(
    order: ModelOrder, worker: str | None, registry: Registry, backend: JobBackend, caller: Caller
) -> ModelOrderAccepted:
    """An admin's load or unload, sent to the workers (``JobBackend.order_models``). 403 for another key,
    404 for a model the registry does not declare or a worker that is not ready."""
    if not caller.admin:
        raise HTTPException(status_code=403, detail=MODELS_ADMIN_ONLY)
    if order.model_id is not None and registry.model(order.model_id) is None:
        raise HTTPException(status_code=404, detail=MODEL_NOT_FOUND)
    asked = backend.order_models(order, worker)
    if worker is not None and not asked:
        raise HTTPException(status_code=404, detail=WORKER_NOT_FOUND)
    return ModelOrderAccepted(model=order.model_id or "", action=order.action, workers=asked)


_ORDER_ANSWERS: dict[int | str, dict[str, Any]] = {
    403: {"model": Detail, "description": "A key that is not an admin key (IMAGEN_API_KEYS_FILE, `admin: true`)."},
    404: {"model": Detail, "description": "No such model in the registry, or no ready worker of that name."},
}
_WORKER_QUERY = Query(
    description="Only this worker (`host:pid`, as GET /health and GET /models list it); default: every ready "
    "worker."
)


@router.post("/models/{model_id}/load", status_code=202, response_model=ModelOrderAccepted, responses=_ORDER_ANSWERS)
def load_model(
    model_id: str,
    registry: RegistryDep,
    backend: BackendDep,
    caller: CallerDep,
    worker: Annotated[str | None, _WORKER_QUERY] = None,
) -> ModelOrderAccepted:
    """Admin keys: load the model on the workers ahead of its jobs (each worker's model cache decides the
    tier and what leaves to make room). Answered at once; each worker loads it between jobs, and GET /models
    shows it in `loaded_on` once it holds it."""
    return order_models(ModelOrder("load", model_id), worker, registry, backend, caller)


@router.post(
    "/models/{model_id}/unload", status_code=202, response_model=ModelOrderAccepted, responses=_ORDER_ANSWERS
)
def unload_model(
    model_id: str,
    registry: RegistryDep,
    backend: BackendDep,
    caller: CallerDep,
    worker: Annotated[str | None, _WORKER_QUERY] = None,
) -> ModelOrderAccepted:
    """Admin keys: free the model from the workers, in every tier (after the job each one runs). Its next
    job loads it again."""
    return order_models(ModelOrder("unload", model_id), worker, registry, backend, caller)


@router.get("/schedulers", response_model=SchedulerList)
def schedulers() -> SchedulerList:
    """The AUTOMATIC1111 sampler names a request's `scheduler` accepts (each model's default: GET /models)."""
    return SchedulerList(schedulers=available_samplers())


def upload_quota_reached(exc: UploadQuotaError) -> str:
    """The French ``detail`` of an upload over its owner's quota (``exc.retry_after_s`` set)."""
    kept = f"{exc.limit} conservées" if exc.what == "uploads" else f"{exc.limit} octets conservés"
    return f"Quota d'images envoyées atteint ({kept} au plus à la fois), réessayez dans {exc.retry_after_s} s"


def upload_larger_than_quota(limit: int) -> str:
    return f"Image plus grande que le quota d'images envoyées ({limit} octets au plus)"


def upload_quota(caller: Caller, settings: Settings) -> UploadQuota:
    """The caller's quota of live uploads: its key's own, else the server's (also without keys)."""
    return UploadQuota(
        max_uploads=caller.max_uploads or settings.key_max_uploads,
        max_bytes=caller.max_upload_bytes or settings.key_max_upload_bytes,
    )


@router.post(
    "/uploads",
    status_code=201,
    response_model=UploadResponse,
    responses={
        413: {
            "model": Detail,
            "description": "Body larger than IMAGEN_MAX_BODY_BYTES, or an image larger than the upload quota "
            "(IMAGEN_KEY_MAX_UPLOAD_BYTES or the key's own).",
        },
        429: {
            "model": Detail,
            "description": "Upload quota reached: as many uploads (IMAGEN_KEY_MAX_UPLOADS), or bytes of them "
            "(IMAGEN_KEY_MAX_UPLOAD_BYTES), are kept for this key as it may have at once (or too many requests "
            "this minute). Retry-After: when its oldest upload expires.",
            "headers": _RETRY_AFTER,
        },
    },
)
def upload(
    file: Annotated[UploadFile, File(description="A PNG, JPEG or WebP image, at most 20 MB.")],
    backend: BackendDep,
    settings: SettingsDep,
    caller: CallerDep,
) -> UploadResponse:
    """Keep an image for later requests (`init_image`, `mask_image`, `ip_image`: `"upload:<upload_id>"`),
    for IMAGEN_UPLOAD_TTL_S seconds. Checked now: a bad image is a 422 here, never a failed job later. Kept
    as sent (the bytes count against the key's upload quota), decoded again when a request names it."""
    data = file.file.read(MAX_IMAGE_BYTES + 1)
    try:
        checked = check_image(data)
    except BadImage as exc:
        error = {"type": "value_error", "loc": ("body", "file"), "msg": str(exc), "input": file.filename or ""}
        raise RequestValidationError([error]) from exc
    stored = Upload(
        upload_id=uuid.uuid4().hex,
        key_name=caller.name,
        data=data,
        width=checked.width,
        height=checked.height,
        expires_at=time.time() + settings.upload_ttl_s,
    )
    try:
        backend.save_upload(stored, upload_quota(caller, settings))
    except UploadQuotaError as exc:
        if exc.retry_after_s is None:
            raise HTTPException(status_code=413, detail=upload_larger_than_quota(exc.limit)) from exc
        raise HTTPException(
            status_code=429, detail=upload_quota_reached(exc), headers={"Retry-After": str(exc.retry_after_s)}
        ) from exc
    return UploadResponse(
        upload_id=stored.upload_id, width=stored.width, height=stored.height, expires_at=stored.expires_at
    )


# The reference's fields always (trigger_words null included); ``needs`` only for a LoRA that states them, so
# the reference's answer stays as it wrote it.
@router.get("/loras", response_model=LoraList, response_model_exclude_unset=True)
def loras(registry: RegistryDep) -> LoraList:
    return LoraList(
        loras=[
            LoraInfo(
                id=lo.id,
                name=lo.name,
                description=lo.description,
                default_weight=lo.default_weight,
                trigger_words=lo.trigger_words,
                **({"needs": lo.needs} if lo.needs is not None else {}),
            )
            for lo in registry.loras
        ]
    )


BUILTIN_UPSCALER_INFO = (
    UpscalerInfo(id="latent", name="Latent", kind="latent",
                 description="The first pass's latents resized (bilinear), as A1111's Latent: fast; needs denoise "
                 "of about 0.5 or more to sharpen."),
    UpscalerInfo(id="lanczos", name="Lanczos", kind="pixel",
                 description="The first pass's picture resized with Lanczos, then encoded again."),
)  # fmt: skip


@router.get("/embeddings", response_model=EmbeddingList)
def embeddings(registry: RegistryDep) -> EmbeddingList:
    """The registry's textual inversions: a prompt uses one by writing its name."""
    return EmbeddingList(embeddings=[
        EmbeddingInfo(name=e.name, description=e.description, base=e.base,
                      models=[m.id for m in registry.models if m.base == e.base and not m.refiner])
        for e in registry.embeddings
    ])  # fmt: skip


@router.get("/upscalers", response_model=UpscalerList)
def upscalers(registry: RegistryDep) -> UpscalerList:
    """What a hires fix's `upscaler` may name: the built-in ones and the registry's upscaler models."""
    return UpscalerList(upscalers=[
        *BUILTIN_UPSCALER_INFO,
        *(UpscalerInfo(id=u.id, name=u.name, description=u.description, kind="model") for u in registry.upscalers),
    ])


@router.get("/controlnets", response_model=ControlNetList)
def controlnets(registry: RegistryDep) -> ControlNetList:
    """The registry's ControlNets, the models each fits, and the preprocessors a unit may name."""
    return ControlNetList(
        controlnets=[
            ControlNetInfo(
                id=c.id,
                name=c.name,
                description=c.description,
                base=c.base,
                control_types=c.control_types,
                models=[m.id for m in registry.models_for(c)],
            )
            for c in registry.controlnets
        ],
        preprocessors=[PreprocessorInfo(name=name, description=text) for name, text in PREPROCESSORS.items()],
    )


@router.get(
    "/health",
    response_model=Health,
    response_model_exclude_none=True,
    responses={503: {"model": Health, "description": "`unavailable`: no new job can be accepted now (`reasons`)."}},
)
def health(backend: BackendDep, response: Response) -> Health:
    """`ok`, `degraded` (200: jobs are accepted, `reasons` says what is wrong) or `unavailable` (503: a load
    balancer should send work elsewhere). Never keyed, never rate-limited."""
    state = backend.health()
    workers = [
        WorkerStatus(**{**asdict(worker), "models": known_tiers(worker.models)}) for worker in state.workers
    ]
    status = "unavailable" if state.unavailable else "degraded" if state.degraded else "ok"
    if state.unavailable:
        response.status_code = 503
    return Health(
        status=status,
        gpu_available=state.gpu_available,
        queue_broker=state.queue_broker,
        reasons=[*state.unavailable, *state.degraded],
        workers=workers,
    )
