"""JSON bodies, parsed in a worker thread: those the OpenAI and AUTOMATIC1111 routes read themselves
(``read_json``), and those FastAPI reads for the native routes (``OffLoopJsonRoute``).

``json.loads`` alone lets through what later fails as a 500: bytes that are not UTF-8 (``UnicodeDecodeError``),
nesting deep enough for a ``RecursionError`` in the parser or in whatever walks the value afterwards (the
A1111 answer echoes the body), and what Python's parser accepts but no JSON answer can carry: ``NaN``,
``Infinity`` (or ``1e999``) and lone surrogates (``"\\ud800"``): an A1111 job ran to the end, then its answer
failed. Here each is a ``BadJson`` that names the problem and, for a value, its field, before anything else
reads the body. It walks the value without recursion, in a worker thread (``read_json``: a body may be 32 MB).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

MAX_DEPTH = 32  # nesting levels of arrays and objects; A1111 clients send about 5
# Only a \uD800-\uDFFF escape makes a lone surrogate: without one, no string needs checking.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class BadJson(ValueError):
    """Why a body is refused, as a sentence; ``path`` is where (``("override_settings", "eta")``), if known."""

    def __init__(self, message: str, path: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.path = path

    @property
    def field(self) -> str | None:
        """The top-level field at fault (OpenAI's ``param``), if any."""
        return self.path[0] if self.path and isinstance(self.path[0], str) else None


def _loads(body: bytes) -> Any:
    """``json.loads``, named so that a test can hold it (it runs in a worker thread)."""
    return json.loads(body)


class OffLoopJsonRoute(APIRoute):
    """A route whose JSON body FastAPI finds already parsed: ``json.loads`` of a body (up to the body limit,
    a data URL image inside) runs in a worker thread, never on the event loop. FastAPI reads the value
    through ``Request.json()``, which keeps what it parsed in ``_json``. A body that does not parse is left to
    FastAPI, which answers it as before (its parse fails where this one did)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def parse_off_the_loop(request: Request) -> Response:
            content_type = request.headers.get("content-type", "")
            if not content_type or "json" in content_type.lower():
                body = await request.body()
                if body:
                    try:
                        value = await run_in_threadpool(_loads, body)
                    except (ValueError, RecursionError):
                        pass
                    else:
                        request._json = value  # Starlette's own cache of request.json()
            return await handler(request)

        return parse_off_the_loop


async def read_json(http: Request, empty: bytes = b"") -> Any:
    """The value of the request's JSON body (``empty``: what an empty body stands for), parsed in a worker
    thread, never on the event loop; or ``BadJson``."""
    return await run_in_threadpool(parse_json, await http.body() or empty)


def parse_json(body: bytes) -> Any:
    """The value of a JSON body (UTF-8, as RFC 8259 requires), or ``BadJson``."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadJson(f"the body is not UTF-8 text (byte {exc.start}: {body[exc.start:exc.start + 1]!r})") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise BadJson(f"the body's JSON nests more than {MAX_DEPTH} levels of arrays and objects") from None
    except json.JSONDecodeError as exc:
        raise BadJson(f"the body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except ValueError as exc:  # an integer of more than 4300 digits
        raise BadJson(f"the body's JSON holds a number that cannot be read: {exc}") from None
    _check(value, strings=_SURROGATE_ESCAPE.search(text) is not None)
    return value


def _check(value: Any, strings: bool) -> None:
    """Refuse nesting past ``MAX_DEPTH`` and numbers that are not finite (and, if ``strings``, text that is not
    Unicode), naming where."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if strings and isinstance(item, str) and not _unicode(item):
            raise BadJson(f"{_dotted(path) or 'the body'}: not valid Unicode text (a lone surrogate)", path)
        if strings and isinstance(item, dict) and not all(_unicode(key) for key in item):
            raise BadJson(f"{_dotted(path) or 'the body'}: a key is not valid Unicode text (a lone surrogate)", path)
        if isinstance(item, float) and not math.isfinite(item):
            raise BadJson(
                f"{_dotted(path) or 'the body'}: NaN, Infinity and numbers past ±1.8e308 are not accepted; give a "
                "finite number", path,
            )
        if isinstance(item, dict | list):
            if len(path) >= MAX_DEPTH:
                raise BadJson(f"the body's JSON nests more than {MAX_DEPTH} levels of arrays and objects")
            children = item.items() if isinstance(item, dict) else enumerate(item)
            stack.extend((child, (*path, key)) for key, child in children)


def _unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _dotted(path: tuple[str | int, ...]) -> str:
    """``("loras", 0, "weight")`` as ``loras[0].weight``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text
