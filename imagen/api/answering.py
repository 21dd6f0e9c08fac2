"""Every request runs inside its job backend's ``answering()`` scope, where the backend gives up on a busy
store within seconds (the embedded backend: ``IMAGEN_DATABASE_BUSY_TIMEOUT_S`` for a SQLite lock held by
another writer), so the client gets a 503 with Retry-After instead of a long wait; background work keeps its
own, longer patience.

A pure ASGI middleware: the scope is a context variable set around the whole request, so it reaches the
thread pool that runs the routes' blocking calls (``run_in_threadpool`` copies the context).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from imagen.jobs.backend import JobBackend


class AnsweringMiddleware:
    def __init__(self, app: ASGIApp, backend: JobBackend) -> None:
        self.app = app
        self.backend = backend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self.backend.answering():
            await self.app(scope, receive, send)
