"""Error answers: 422s that always encode and stay short, whatever the request held; 400s and 405s that say
what is wrong.

FastAPI's own handler echoes each error's whole ``input``: a 1 MB body comes back as a 1 MB answer, a
list of 300,000 items is walked by ``jsonable_encoder``, and a lone surrogate (``"\\ud800"``, which
Python's JSON parser accepts) or a NaN makes the answer itself fail with a 500. Here every string is made
encodable (a lone surrogate is written as its ``\\udXXX`` escape), non-finite numbers become text, and the
echoed ``input`` is cut to a short prefix before anything walks it.

FastAPI answers a body it cannot parse (not UTF-8, JSON nested past Python's recursion limit, a 5,000-digit
integer, a broken multipart form) with 400 "There was an error parsing the body": the 400 stays, its
``detail`` says which. Starlette's 405 lists in ``Allow`` the methods of the first route with that path
only (``GET`` for ``/sdapi/v1/options``, which also takes ``POST``): here, those of every route with it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from itertools import islice
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import compile_path

ECHO_CHARS = 200  # the longest echoed input, in characters
ECHO_ITEMS = 8  # items kept per list or object of an echoed input before it is cut
ECHO_DEPTH = 3
FASTAPI_UNPARSED_BODY = "There was an error parsing the body"


def unreadable_body(reason: str) -> str:
    return f"Corps de requête illisible : {reason}"


async def http_error(request: Request, exc: HTTPException) -> Response:
    """FastAPI's answer to ``exc``, with a 400's reason and a 405's full ``Allow``."""
    if exc.status_code == 405:
        allowed = _allowed_methods(request) or (exc.headers or {}).get("Allow")
        exc = HTTPException(405, exc.detail, headers={**(exc.headers or {}), **({"Allow": allowed} if allowed else {})})
    elif exc.status_code == 400 and exc.detail == FASTAPI_UNPARSED_BODY and exc.__cause__ is not None:
        exc = HTTPException(400, unreadable_body(_parse_failure(exc.__cause__)), headers=exc.headers)
    return await http_exception_handler(request, exc)


def _parse_failure(cause: BaseException) -> str:
    if isinstance(cause, UnicodeDecodeError):
        return f"ce n'est pas du texte UTF-8 (octet {cause.start})"
    if isinstance(cause, RecursionError):
        return "JSON imbriqué trop profondément"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "nombre entier de plus de 4300 chiffres"
    return f"formulaire ou JSON invalide ({str(cause)[:ECHO_CHARS]})"


def _allowed_methods(request: Request) -> str:
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):  # included routers' routes too, prefixed
        if route.path is not None and route.methods and compile_path(route.path)[0].match(request.scope["path"]):
            methods |= route.methods
    return ", ".join(sorted(methods))


async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": [_answerable(error) for error in exc.errors()]}, status_code=422)


def _answerable(error: Mapping[str, Any]) -> dict[str, Any]:
    answer = {
        key: _encodable(jsonable_encoder(value, custom_encoder={BaseException: str}))  # ctx's ValueError: its text
        for key, value in error.items()
        if key != "input"
    }
    if "input" in error:
        answer["input"] = _echo(error["input"])
    return answer


def _encodable(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {_encodable(str(key)): _encodable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_encodable(item) for item in value]
    return value


def _echo(value: Any) -> Any:
    """``value`` itself when it is short, else the first ``ECHO_CHARS`` characters of its JSON text + "…"."""
    clipped, complete = _clip(value, ECHO_DEPTH)
    safe = _encodable(clipped)
    text = safe if isinstance(safe, str) else json.dumps(safe, ensure_ascii=False, default=str)
    if complete and len(text) <= ECHO_CHARS:
        return safe
    return text[:ECHO_CHARS] + "…"


def _clip(value: Any, depth: int) -> tuple[Any, bool]:
    """A copy of ``value`` with long strings, lists and objects cut, and whether nothing was cut.

    Nothing past a cut is walked: the cost does not grow with the input.
    """
    if isinstance(value, bytes):  # a body sent with a Content-Type that is not JSON: echoed as text
        value = value[: ECHO_CHARS * 4 + 1].decode("utf-8", "backslashreplace")  # past ECHO_CHARS if cut
    if isinstance(value, str):
        return value[: ECHO_CHARS + 1], len(value) <= ECHO_CHARS
    if not isinstance(value, Mapping | list | tuple):
        return value, True
    if depth == 0:
        return "…", False
    complete = len(value) <= ECHO_ITEMS
    if isinstance(value, Mapping):
        clipped_object = {}
        for key, item in islice(value.items(), ECHO_ITEMS):
            clipped_key, key_complete = _clip(str(key), depth)
            clipped_object[clipped_key], item_complete = _clip(item, depth - 1)
            complete = complete and key_complete and item_complete
        return clipped_object, complete
    clipped_list = []
    for item in islice(value, ECHO_ITEMS):
        clipped_item, item_complete = _clip(item, depth - 1)
        clipped_list.append(clipped_item)
        complete = complete and item_complete
    return clipped_list, complete
