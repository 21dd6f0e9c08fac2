"""``X-Request-ID`` on every response: the client's own id when it sent a usable one (printable ASCII, at
most 128 characters), else a new uuid4 hex. The id is set in ``logs.REQUEST_ID`` while the request is
handled, so every line logged for it (uvicorn's access line included) carries it.

A pure ASGI middleware: it neither buffers nor wraps the body, so streams (``/events``) pass untouched.
"""

from __future__ import annotations

import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagen.logs import REQUEST_ID

HEADER = "X-Request-ID"
MAX_LENGTH = 128


def usable_request_id(value: str | None) -> str | None:
    """The client's id if it is 1 to 128 printable ASCII characters (no spaces at the ends), else None."""
    if value is None:
        return None
    value = value.strip()
    if not 0 < len(value) <= MAX_LENGTH or not all(" " <= char <= "~" for char in value):
        return None
    return value


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = None
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                sent = value.decode("latin-1")
                break
        request_id = usable_request_id(sent) or uuid.uuid4().hex

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
