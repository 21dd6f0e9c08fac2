"""The web page: ``GET /`` answers ``index.html`` and ``/ui/...`` its other files (CSS, JavaScript, axe).

The page is a client of the public API only (it calls the same routes a script does), so these routes hold
no data and stay open when API keys are on (``access.OPEN_PATHS``): the page asks for a key when an API call
answers 401. They are left out of the OpenAPI document, which describes the API.

Every answer carries ``PAGE_HEADERS``: a Content-Security-Policy that lets the page run only its own files (no
inline script or style, no other origin: an injected ``<script>`` does not run) and talk only to this server,
and no framing by any site (``frame-ancestors 'none'``, ``X-Frame-Options: DENY``: no clickjacking of the
Generate or Forget buttons). The page needs nothing more: its scripts and styles are files under ``/ui/``,
its images are object URLs (``blob:``) of what it fetched with the key, and previews are ``data:`` URLs.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.staticfiles import PathLike, StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent.parent / "web" / "static"
# The files change with the package: a browser asks again (ETag / Last-Modified make that cheap).
NO_CACHE = {"Cache-Control": "no-cache"}
CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' blob: data:",
    "connect-src 'self' blob:",  # blob: the page's own object URLs (reading back an image it shows)
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
))
PAGE_HEADERS = {
    **NO_CACHE,
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _Static(StaticFiles):
    def file_response(
        self, full_path: PathLike, stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(PAGE_HEADERS)
        return response


def install_web(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    app.mount("/ui", _Static(directory=STATIC_DIR), name="ui")
