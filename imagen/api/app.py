"""Builds the FastAPI application: settings, registry, job backend and webhook outbox are wired here, once."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from imagen import __version__
from imagen.access.keys import ANYONE, KeyRing
from imagen.access.rate_limits import RateLimiter
from imagen.api.a1111_compat import router as a1111_router
from imagen.api.a1111_controlnet import router as a1111_controlnet_router
from imagen.api.access import AccessMiddleware
from imagen.api.answering import AnsweringMiddleware
from imagen.api.body_limit import BodyLimitMiddleware
from imagen.api.compat_jobs import Waiters
from imagen.api.errors import http_error, invalid_request
from imagen.api.metrics import install_metrics
from imagen.api.openai_compat import router as openai_router
from imagen.api.openapi import install_openapi
from imagen.api.request_id import RequestIdMiddleware
from imagen.api.routes import router, status
from imagen.api.web import install_web
from imagen.config import Settings
from imagen.errors import (
    BrokerUnavailableError,
    DatabaseUnavailableError,
    ImageBacklogFullError,
    KeyQueueFullError,
    OutputsFullError,
    QueueFullError,
)
from imagen.jobs.backend import JobBackend
from imagen.jobs.factory import build_backend
from imagen.outputs.retention import RetentionSweeper
from imagen.registry import load_registry
from imagen.registry.watch import RegistryWatcher
from imagen.webhooks.dispatcher import WebhookDispatcher
from imagen.webhooks.outbox import Outbox

QUEUE_FULL = "Queue pleine, réessayez plus tard"
BROKER_DOWN = "File d'attente indisponible (broker injoignable), réessayez plus tard"
DATABASE_DOWN = "Base de données des tâches indisponible, réessayez plus tard"
OUTPUTS_FULL = "Disque des images plein, réessayez plus tard"
IMAGE_BACKLOG_FULL = "Trop d'images en attente de copie, réessayez plus tard"


def key_queue_full(limit: int) -> str:
    return f"Trop de tâches en attente pour cette clé API (max {limit}), réessayez plus tard"

log = logging.getLogger("imagen.api")


def build_outbox(settings: Settings) -> Outbox:
    """The webhook outbox, in the job store the backend uses: keys in its Redis when distributed, tables in
    the job database when embedded (each implementation is imported only when chosen)."""
    if settings.broker_url:
        from imagen.jobs.distributed.store import connect
        from imagen.webhooks.redis_outbox import RedisOutbox

        # Short timeouts, as for the API's other Redis calls: a stalled Redis gives a 503 within seconds.
        return RedisOutbox(connect(settings.broker_url, socket_timeout=1.0, retry_on_timeout=False))
    from imagen.webhooks.sqlite_outbox import SqliteOutbox

    return SqliteOutbox(settings.database_path)


async def close_loop_connections(app: FastAPI) -> None:
    """Close the asyncio connections the app opened on the running event loop: the job-change listener's
    and the rate limiter's. The lifespan does it at the stop; a second server run on another loop for the
    same app (the tests' HTTP thread) does it for its own loop before that loop closes."""
    await app.state.backend.stop_listening()
    limiter: RateLimiter | None = app.state.limiter
    if limiter is not None:
        await limiter.aclose()


def create_app(settings: Settings | None = None, backend: JobBackend | None = None) -> FastAPI:
    settings = settings or Settings()
    registry = load_registry(settings.registry_path)
    registry.resolve_default_model(settings.default_model)  # a bad default fails at start, not per request
    if settings.engine == "diffusers" and not settings.broker_url:
        # Missing weights, pickles and unsupported LoRA types stop the start, not a job an hour later.
        # (Distributed workers check their own files: the API host may not have them.)
        from imagen.registry.safe_files import check_registry_files  # headers only, no torch

        check_registry_files(registry)
    # Read again when it changes: a new model is offered without a restart (checked as at start).
    registry_watcher = RegistryWatcher(
        settings.registry_path,
        registry=registry,
        default_model=settings.default_model,
        check_files=settings.engine == "diffusers" and not settings.broker_url,
    )
    keys = (
        KeyRing(
            settings.api_keys_file,
            default_max_waiting=settings.key_max_waiting,
            default_requests_per_minute=settings.key_requests_per_minute,
        )
        if settings.api_keys_file is not None
        else None
    )
    backend = backend or build_backend(settings)
    job_backend = backend

    def read_status(job_id: str) -> dict[str, Any] | None:
        """What /status answers now: the ``data`` of a webhook is exactly that."""
        try:
            answer: dict[str, Any] = json.loads(bytes(status(job_id, job_backend, ANYONE).body))
        except HTTPException:
            return None
        return answer

    webhooks = WebhookDispatcher.from_settings(settings, build_outbox, read_status=read_status)
    waiters = Waiters()  # the OpenAI and A1111 routes' waits for their jobs (compat_jobs)
    retention = RetentionSweeper.from_settings(settings)  # None unless IMAGEN_OUTPUTS_MAX_AGE_S/_BYTES is set

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backend.start()
        if webhooks is not None:
            webhooks.start()
        if retention is not None:
            retention.start()
        log.info("imagen %s ready: %d model(s), %d LoRA(s)", __version__, len(registry.models), len(registry.loras))
        try:
            yield
        finally:
            waiters.end_all()  # an OpenAI or A1111 request still waiting for its job answers 503 now
            if retention is not None:
                retention.stop()
            if webhooks is not None:
                webhooks.stop()
            await close_loop_connections(app)
            backend.stop()

    app = FastAPI(title="Imagen API", version="2.0", description="Stable Diffusion XL generation", lifespan=lifespan)
    app.state.settings = settings
    app.state.registry_watcher = registry_watcher  # deps.get_registry: the registry served now
    app.state.backend = backend
    app.state.webhooks = webhooks
    app.state.waiters = waiters
    app.include_router(router)
    app.include_router(openai_router)  # OpenAI's /v1/images and /v1/models
    app.include_router(a1111_router)  # AUTOMATIC1111's /sdapi/v1
    app.include_router(a1111_controlnet_router)  # its ControlNet extension's /controlnet
    install_openapi(app, lambda: registry_watcher.current, settings)
    install_web(app)  # the page at / and its files at /ui/

    # The service cannot take the request now: a 503 with the reference's kind of French detail and a hint.
    unavailable: dict[type[Exception], tuple[str, str]] = {
        QueueFullError: (QUEUE_FULL, "30"),
        BrokerUnavailableError: (BROKER_DOWN, "10"),
        DatabaseUnavailableError: (DATABASE_DOWN, "5"),  # a subclass of BrokerUnavailableError: its own text
        OutputsFullError: (OUTPUTS_FULL, "30"),
        ImageBacklogFullError: (IMAGE_BACKLOG_FULL, "30"),
    }

    async def answer_unavailable(_: Request, exc: Exception) -> JSONResponse:
        detail, retry_after = next(unavailable[kind] for kind in type(exc).__mro__ if kind in unavailable)
        if isinstance(exc, DatabaseUnavailableError):
            log.warning("answered 503: %s", exc)
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": retry_after})

    for kind in unavailable:
        app.add_exception_handler(kind, answer_unavailable)

    @app.exception_handler(KeyQueueFullError)
    async def key_queue_full_handler(_: Request, exc: KeyQueueFullError) -> JSONResponse:
        return JSONResponse({"detail": key_queue_full(exc.limit)}, status_code=429, headers={"Retry-After": "30"})

    app.exception_handler(RequestValidationError)(invalid_request)
    app.exception_handler(StarletteHTTPException)(http_error)  # a 400's reason, a 405's every method
    # Last added runs first: CORS (a browser's preflight carries no key), then keys, then the body limit (a
    # stranger's body is never read).
    app.add_middleware(AnsweringMiddleware, backend=backend)  # a request waits briefly for a busy store: 503
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    limiter = RateLimiter.from_settings(settings) if keys is not None else None
    app.state.limiter = limiter
    app.add_middleware(AccessMiddleware, keys=keys, limiter=limiter, metrics_token=settings.metrics_token)
    if settings.cors_origins:
        origins = [origin.strip() for origin in settings.cors_origins.split(",") if origin.strip()]
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "Last-Event-ID", "X-Request-ID"],
            expose_headers=[
                "X-Job-ID", "X-Generation-Metadata", "Retry-After", "X-Request-ID",
                "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset",
            ],
        )
    install_metrics(app, backend)  # GET /metrics, and the HTTP numbers
    app.add_middleware(RequestIdMiddleware)  # outermost: every response gets X-Request-ID
    return app
