"""API keys at the door: a pure ASGI middleware in front of every route.

With keys configured (``IMAGEN_API_KEYS_FILE``), every request but ``GET /health`` needs
``Authorization: Bearer <key>`` (or ``X-API-Key: <key>``, or HTTP Basic with the key as password, as
AUTOMATIC1111 clients send it): the reference's routes, ``/docs``,
``/openapi.json``, ``/metrics``, the extensions, and any route added later, because nothing is opted in
route by route. A missing or unknown key gets 401 with ``WWW-Authenticate: Bearer``. A known key is counted
against its requests per minute (429 past it, ``X-RateLimit-*`` headers on every answer), and the route finds
the caller in ``request.state.caller`` (``deps.CallerDep``) to keep each key to its own jobs and files.
``/metrics`` needs more: an admin key (403 for the others) or the metrics token (``METRICS_PATH``).

Without keys, every request is ``ANYONE`` (sees everything, no limit): the reference's examples run as
written.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocketClose

from imagen.access.keys import ANYONE, Caller, KeyRing
from imagen.access.rate_limits import RateLimiter

# /health: load balancers and orchestrators probe it without a key. The web page's files (``/`` and
# ``/ui/...``) hold no data: the page asks for a key and sends it with every API call it makes.
OPEN_PATHS = frozenset({"/health", "/"})
OPEN_PREFIXES = ("/ui/",)
KEY_MISSING = "Clé API requise (en-tête Authorization: Bearer <clé>)"
KEY_INVALID = "Clé API invalide"
# /metrics shows every key's activity (jobs running, totals, workers' host:pid): with keys on, admin keys only;
# IMAGEN_METRICS_TOKEN, when set, also opens it (to a Prometheus scraper) and, with keys off, is needed.
METRICS_PATH = "/metrics"
METRICS_ADMIN_ONLY = "Métriques réservées aux clés API d'administration (ou au jeton IMAGEN_METRICS_TOKEN)"
METRICS_TOKEN_REQUIRED = "Jeton de métriques requis (en-tête Authorization: Bearer <jeton>)"
METRICS_READER = Caller(name="")  # the metrics token: owns nothing, reaches /metrics only


def too_many_requests(per_minute: int, retry_after_s: int) -> str:
    return f"Trop de requêtes pour cette clé API (max {per_minute} par minute), réessayez dans {retry_after_s} s"


def presented_key(headers: Headers) -> str | None:
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
        if scheme.lower() == "basic" and credentials.strip():
            # AUTOMATIC1111 clients (Open WebUI, SillyTavern) send "user:password": the key is the password
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                return None
            key = decoded.partition(":")[2] if ":" in decoded else decoded
            return key.strip() or None
    api_key = headers.get("x-api-key")
    return api_key.strip() if api_key and api_key.strip() else None


class AccessMiddleware:
    def __init__(
        self, app: ASGIApp, keys: KeyRing | None, limiter: RateLimiter | None, metrics_token: str | None = None
    ) -> None:
        self.app = app
        self.keys = keys
        self.limiter = limiter
        self.metrics_token = hashlib.sha256(metrics_token.encode()).digest() if metrics_token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        if self.metrics_token is not None and scope["path"] == METRICS_PATH:
            presented = presented_key(Headers(scope=scope))
            if presented is not None and hmac.compare_digest(
                hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest(), self.metrics_token
            ):
                self._admit(scope, METRICS_READER)
                await self.app(scope, receive, send)
                return
            if self.keys is None:
                await _refuse(401, METRICS_TOKEN_REQUIRED, scope, receive, send)
                return
        if self.keys is None:
            self._admit(scope, ANYONE)
            await self.app(scope, receive, send)
            return
        if scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        if self.keys.refresh_due():  # the keys file is read in a thread, once a second, never on the loop
            await run_in_threadpool(self.keys.refresh)
        presented = presented_key(Headers(scope=scope))
        caller = self.keys.identify(presented) if presented is not None else None
        if caller is None and scope["type"] == "websocket":  # none today; a later one is covered too
            await WebSocketClose(code=1008, reason=KEY_MISSING if presented is None else KEY_INVALID)(
                scope, receive, send
            )
            return
        if caller is None:
            await _refuse(401, KEY_MISSING if presented is None else KEY_INVALID, scope, receive, send)
            return
        extra_headers: dict[str, str] = {}
        if scope["type"] == "http" and self.limiter is not None and caller.requests_per_minute is not None:
            allowance = await self.limiter.hit(caller.name, caller.requests_per_minute)
            if allowance is not None:
                extra_headers = allowance.headers()
                if not allowance.allowed:
                    retry_after = allowance.retry_after_s
                    response = JSONResponse(
                        {"detail": too_many_requests(allowance.limit, retry_after)},
                        status_code=429,
                        headers={**extra_headers, "Retry-After": str(retry_after)},
                    )
                    await response(scope, receive, send)
                    return
        if scope["path"] == METRICS_PATH and not caller.admin:
            await _refuse(403, METRICS_ADMIN_ONLY, scope, receive, send, extra_headers)
            return
        self._admit(scope, caller)
        if not extra_headers:
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in extra_headers.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)

    @staticmethod
    def _admit(scope: Scope, caller: Caller) -> None:
        scope.setdefault("state", {})["caller"] = caller


async def _refuse(
    status: int, detail: str, scope: Scope, receive: Receive, send: Send, headers: dict[str, str] | None = None
) -> None:
    """401 (with ``WWW-Authenticate: Bearer``) or 403, as JSON, before any route runs."""
    challenge = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    await JSONResponse({"detail": detail}, status_code=status, headers={**(headers or {}), **challenge})(
        scope, receive, send
    )
