"""The uvicorn server ``imagen serve`` runs: a deadline on every connection that is not being served, and a
bound on every request head.

**Deadline.** uvicorn closes a keep-alive connection that stays silent ``timeout_keep_alive`` seconds *after a
response*. It sets no deadline on a connection that has not sent a whole request head yet: one opened and left
silent, or one that sent half a request line or half its headers and stalled, stays open for as long as the
client wants (each holds a file descriptor; enough of them exhaust the process's). ``BoundedHttpProtocol``
gives those the same deadline, ``IMAGEN_KEEP_ALIVE_S``: a connection that opened, or that started a new request
after a response, must deliver the whole request head within it, or the server closes it. A request whose head
has arrived is never cut by this deadline (a slow body or a long `GET /events` stream is not "idle").

**Head size.** uvicorn's httptools protocol keeps every header it is sent, and httptools (llhttp) has no cap:
one connection could send 100 MB of headers before any route (the key check included) sees the request. Here
the head is counted as it arrives, and at most one byte past ``IMAGEN_MAX_HEADER_BYTES`` of it is ever given
to the parser; the request line, each header line (``IMAGEN_MAX_HEADER_LINE_BYTES``) and the number of headers
(``IMAGEN_MAX_HEADERS``) are checked in the parser's callbacks, as nginx and h11 do. Past any of them the
client gets ``431 Request Header Fields Too Large`` (JSON, French ``detail``) and the connection is closed: the
server stops writing, discards what the client still sends for at most ``IMAGEN_KEEP_ALIVE_S`` so that the
client can read the answer (closing at once with unread data makes the kernel send a reset, which can destroy
the answer before the client reads it), then closes.

Idle connections cost the event loop nothing while they wait, so they never slow `/health` down.
``limit_concurrency`` stays unset on purpose: uvicorn counts open connections against it, so idle
clients would turn real requests into 503s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from imagen.config import Settings
from imagen.logs import uvicorn_log_config

log = logging.getLogger("imagen.api")


@dataclass(frozen=True)
class HeadLimits:
    """Bounds of one request head, in bytes and lines."""

    line_bytes: int  # the request line, or one header line
    head_bytes: int  # request line and headers together
    headers: int

    @classmethod
    def from_settings(cls, settings: Settings) -> HeadLimits:
        return cls(settings.max_header_line_bytes, settings.max_header_bytes, settings.max_headers)


class HeadTooLarge(Exception):
    """A request head past one of the limits; the message says which, in French, for the 431."""


class _Parser(httptools.HttpRequestParser):
    """httptools' parser, letting ``HeadTooLarge`` out of its callbacks as itself: httptools wraps a callback's
    exception in ``HttpParserCallbackError``, which uvicorn answers with a 400 and a misleading log line."""

    def feed_data(self, data: bytes | bytearray | memoryview | array[int]) -> None:
        try:
            super().feed_data(data)
        except httptools.HttpParserCallbackError as error:
            if isinstance(error.__context__, HeadTooLarge):
                raise error.__context__ from None
            raise


def bounded_protocol(deadline_s: float, limits: HeadLimits) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, with the deadline and the head limits above."""

    class BoundedHttpProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.timeout_keep_alive = deadline_s  # type: ignore[assignment]  # the float setting; uvicorn says int
            self.parser = _Parser(self)
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn sets its own
            self._head_deadline: asyncio.TimerHandle | None = None
            self._head_cycle: RequestResponseCycle | None = None  # the last response before that head
            self._in_body = False  # the parser is past a request head, in its body
            self._head_bytes = 0  # bytes of the current request head given to the parser so far
            self._header_lines = 0
            self._refused = False  # a head was refused: what still comes is discarded

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_deadline()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # lingering after a 431: read and dropped
            if self.cycle is None or self.cycle.response_complete:
                self._arm_head_deadline()  # bytes of a new request head: they must all come in time
            try:
                while data:
                    if self._in_body:
                        piece, data = data, b""
                    else:
                        # A head never gives the parser more than one byte past the limit (the parser would
                        # keep it all); a piece that ends the head may carry the start of the body.
                        room = limits.head_bytes + 1 - self._head_bytes
                        piece, data = data[:room], data[room:]
                        self._head_bytes += len(piece)
                    super().data_received(piece)
                    if self.transport.is_closing() or self.transport.get_protocol() is not self:
                        return  # uvicorn answered 400, or the connection became a websocket
                    if not self._in_body and self._head_bytes > limits.head_bytes:
                        raise HeadTooLarge(f"au plus {limits.head_bytes} octets de ligne de requête et d'en-têtes")
            except HeadTooLarge as refusal:
                self._refuse(str(refusal))

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._header_lines = 0

        def on_url(self, url: bytes) -> None:
            super().on_url(url)
            if len(self.url) > limits.line_bytes:
                raise HeadTooLarge(f"ligne de requête (URL) de plus de {limits.line_bytes} octets")

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_lines += 1
            if self._header_lines > limits.headers:
                raise HeadTooLarge(f"plus de {limits.headers} en-têtes")
            if len(name) + len(value) + 2 > limits.line_bytes:
                shown = name[:64].decode("latin-1").lower()
                raise HeadTooLarge(f"en-tête {shown!r} de plus de {limits.line_bytes} octets")
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_body = True
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_body = False
            self._head_bytes = 0  # a pipelined next head in the same read is not counted here: one read at most

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None
            super().connection_lost(exc)

        def _refuse(self, reason: str) -> None:
            """431 and a lingering close; a pipelined request still being answered ends the connection instead."""
            self._refused = True
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
            log.warning("%s: request head refused with 431 (%s)", client, reason)
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.keep_alive = False  # the earlier request's answer is still to come: then close
                self.flow.pause_reading()
                return
            body = json.dumps({"detail": f"En-têtes de requête trop grands : {reason}"}).encode()
            head = [STATUS_LINE[431]]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            head += [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n\r\n",
            ]
            self.transport.write(b"".join(head) + body)
            if self.transport.can_write_eof():
                self.transport.write_eof()  # the client reads the answer, then end of stream
                # the head deadline's slot (that deadline is spent): connection_lost cancels it
                self._head_deadline = self.loop.call_later(deadline_s, self.transport.close)
            else:
                self.transport.close()

        def _arm_head_deadline(self) -> None:
            if self._head_deadline is not None:
                if self._head_cycle is self.cycle:
                    return  # the same request head is still on its way: its deadline stands
                self._head_deadline.cancel()  # armed for an earlier request, served since
            self._head_cycle = self.cycle
            self._head_deadline = self.loop.call_later(deadline_s, self._head_deadline_passed, self.cycle)

        def _head_deadline_passed(self, cycle_when_armed: RequestResponseCycle | None) -> None:
            self._head_deadline = None
            # A new request head parsed since arming made a new cycle: that request is being served.
            if self.cycle is cycle_when_armed and not self.transport.is_closing():
                self.transport.close()

    return BoundedHttpProtocol


class _Server(uvicorn.Server):
    """uvicorn's server, ending the app's waits for jobs (``compat_jobs.Waiters``) as soon as its shutdown
    begins: uvicorn lets the requests in progress finish before the app's lifespan hears of the shutdown, and
    an OpenAI or A1111 request waiting for its job would hold the stop for as long as the job takes."""

    def __init__(self, config: uvicorn.Config, on_stopping: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_stopping = on_stopping

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._on_stopping()
        await super().shutdown(sockets)


def serve(app: Any, settings: Settings, host: str, port: int) -> None:
    """Run ``app`` (built by ``create_app``) until SIGINT/SIGTERM."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        log_config=uvicorn_log_config(),  # uvicorn's lines as ours (JSON with IMAGEN_LOG_FORMAT=json)
        http=bounded_protocol(settings.keep_alive_s, HeadLimits.from_settings(settings)),
        # uvicorn's own keep-alive timer (after a response); the protocol sets the same value as a float
        timeout_keep_alive=max(1, round(settings.keep_alive_s)),
    )
    server = _Server(config, on_stopping=app.state.waiters.end_all)
    server.run()
    if not server.started:
        sys.exit(3)  # as uvicorn.run: the app did not start (its lifespan failed)
