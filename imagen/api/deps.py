"""What routes receive, as typed dependencies. Everything is built once in ``app.create_app``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from imagen.access.keys import Caller
from imagen.config import Settings
from imagen.jobs.backend import JobBackend
from imagen.registry import Registry
from imagen.registry.watch import RegistryWatcher
from imagen.webhooks.dispatcher import WebhookDispatcher


def get_backend(request: Request) -> JobBackend:
    backend: JobBackend = request.app.state.backend
    return backend


def get_caller(request: Request) -> Caller:
    """Who sent the request (``access.AccessMiddleware`` put it there): ``ANYONE`` without keys."""
    caller: Caller = request.state.caller
    return caller


def get_registry(request: Request) -> Registry:
    """The registry served now: its file is read again when it changed, at most once a second (in the
    thread pool FastAPI runs this in, never on the event loop)."""
    watcher: RegistryWatcher = request.app.state.registry_watcher
    if watcher.refresh_due():
        watcher.refresh()
    return watcher.current


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_webhooks(request: Request) -> WebhookDispatcher | None:
    webhooks: WebhookDispatcher | None = request.app.state.webhooks
    return webhooks


CallerDep = Annotated[Caller, Depends(get_caller)]
BackendDep = Annotated[JobBackend, Depends(get_backend)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
WebhooksDep = Annotated[WebhookDispatcher | None, Depends(get_webhooks)]  # None: no IMAGEN_WEBHOOK_SECRET
