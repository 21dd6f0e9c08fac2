"""The endpoints of the API reference v2.0, with its status codes and French ``detail`` strings."""

from __future__ import annotations

import json

from fastapi import APIRouter, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse

from imagen.api.deps import BackendDep, RegistryDep, SettingsDep
from imagen.api.schemas import (
    GenerationRequest,
    GenerationResponse,
    Health,
    LoraInfo,
    LoraList,
    ModelInfo,
    ModelList,
)
from imagen.api.submission import InvalidRequest, prepare_job
from imagen.jobs.types import JobRecord, JobState
from imagen.outputs.serving import resolve_servable

JOB_NOT_FOUND = "Job ID non trouvé"
IMAGE_NOT_FOUND = "Image non trouvée"

router = APIRouter()


@router.post("/generate", status_code=201, response_model=GenerationResponse)
def generate(
    request: GenerationRequest, backend: BackendDep, registry: RegistryDep, settings: SettingsDep
) -> GenerationResponse:
    try:
        job = prepare_job(request, registry, settings)
    except InvalidRequest as exc:
        raise RequestValidationError([error.as_pydantic_error() for error in exc.errors]) from exc
    submitted = backend.submit(job)
    return GenerationResponse(
        job_id=submitted.job_id,
        status="queued",
        message=f"Tâche en file d'attente. Position estimée: {submitted.position}",
    )


def _find(backend: BackendDep, job_id: str) -> JobRecord:
    job = backend.get(job_id)
    if job is None:
        raise HTTPException(status_code=404, detail=JOB_NOT_FOUND)
    return job


@router.get("/status/{job_id}")
async def status(job_id: str, backend: BackendDep) -> JSONResponse:
    job = _find(backend, job_id)
    body: dict[str, object] = {"job_id": job.job_id, "status": job.state.value, "result": job.result}
    if job.state is JobState.FAILURE:
        body["error"] = job.error
    elif job.meta is not None and not job.state.is_terminal():
        body["meta"] = job.meta
    return JSONResponse(body)


@router.get("/image/{job_id}", response_model=None)
async def image(job_id: str, backend: BackendDep, settings: SettingsDep) -> FileResponse | JSONResponse:
    job = _find(backend, job_id)
    if job.state is JobState.FAILURE:
        return JSONResponse({"detail": {"status": "failed", "error": job.error}}, status_code=500)
    if job.state is not JobState.SUCCESS or job.result is None:
        meta = job.meta or {"step": "queued" if job.state is JobState.PENDING else "starting", "progress": 0}
        detail = {
            "status": "processing",
            "message": "Image en cours de génération",
            "state": job.state.value,
            "meta": meta,
        }
        return JSONResponse({"detail": detail}, status_code=202)
    path = resolve_servable(settings.outputs_dir, job.result["filename"])
    if path is None:
        raise HTTPException(status_code=404, detail=IMAGE_NOT_FOUND)
    headers = {"X-Job-ID": job.job_id, "X-Generation-Metadata": json.dumps(job.result["metadata"])}
    return FileResponse(path, media_type="image/png", headers=headers)


def _serve_output(filename: str, backend: BackendDep, settings: SettingsDep) -> FileResponse:
    path = resolve_servable(settings.outputs_dir, filename)
    if path is None:
        backend.ensure_output(filename)  # distributed: the image may still be on its way from a worker
        path = resolve_servable(settings.outputs_dir, filename)
    if path is None:
        raise HTTPException(status_code=404, detail=IMAGE_NOT_FOUND)
    return FileResponse(path, media_type="image/png")


router.add_api_route("/download/{filename:path}", _serve_output, methods=["GET"], response_model=None)
router.add_api_route("/outputs/{filename:path}", _serve_output, methods=["GET"], response_model=None)


@router.get("/models", response_model=ModelList)
def models(registry: RegistryDep) -> ModelList:
    return ModelList(
        models=[
            ModelInfo(
                id=m.id,
                name=m.name,
                description=m.description,
                vae_path=m.vae_path,
                default_negative=m.default_negative,
            )
            for m in registry.models
        ]
    )


@router.get("/loras", response_model=LoraList)
def loras(registry: RegistryDep) -> LoraList:
    return LoraList(
        loras=[
            LoraInfo(
                id=lo.id,
                name=lo.name,
                description=lo.description,
                default_weight=lo.default_weight,
                trigger_words=lo.trigger_words,
            )
            for lo in registry.loras
        ]
    )


@router.get("/health", response_model=Health)
def health(backend: BackendDep) -> Health:
    state = backend.health()
    return Health(status="ok", gpu_available=state.gpu_available, queue_broker=state.queue_broker)
