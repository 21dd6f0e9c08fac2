"""Request bodies over ``IMAGEN_MAX_BODY_BYTES`` get 413 without the API reading more than the limit.

A pure ASGI middleware, outside every route: a ``Content-Length`` over the limit is refused before the
app runs; a body without one (chunked) is counted as it streams and refused as soon as the count passes
the limit. The 413 closes the connection (``Connection: close``), so the server stops reading the rest.

FastAPI's own ``max_body_size`` (0.165) checks ``Content-Length`` only once a route reads the body and
answers some paths in English plain text; this one answers every path at once, in the reference's style.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def too_large_detail(limit: int) -> str:
    return f"Requête trop volumineuse (max {limit} octets)"


class _BodyTooLarge(Exception):
    """Raised into the app from ``receive`` once the 413 has been sent; the middleware absorbs it."""


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(scope, receive, send)
            return

        received = 0
        response_started = False
        refused = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    if not response_started:
                        refused = True
                        await self._refuse(scope, receive, send)
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refused:
                return  # the app's answer to the exception above; the 413 is already out
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            if not refused:  # the app had already started its response: nothing sensible left to send
                raise

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {"detail": too_large_detail(self.max_body_bytes)}, status_code=413, headers={"Connection": "close"}
        )
        await response(scope, receive, send)
