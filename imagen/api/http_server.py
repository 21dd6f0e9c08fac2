"""The uvicorn server ``imagen serve`` runs, with a deadline on every connection that is not being served.

uvicorn closes a keep-alive connection that stays silent ``timeout_keep_alive`` seconds *after a response*.
It sets no deadline on a connection that has not sent a whole request head yet: one opened and left silent,
or one that sent half a request line or half its headers and stalled, stays open for as long as the client
wants (each holds a file descriptor; enough of them exhaust the process's). ``DeadlineHttpProtocol`` gives
those the same deadline, ``IMAGEN_KEEP_ALIVE_S``: a connection that opened, or that started a new request
after a response, must deliver the whole request head within it, or the server closes it. A request whose
head has arrived is never cut by this deadline (a slow body or a long `GET /events` stream is not "idle").

Idle connections cost the event loop nothing while they wait, so they never slow `/health` down.
``limit_concurrency`` stays unset on purpose: uvicorn counts open connections against it, so idle
clients would turn real requests into 503s.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from imagen.config import Settings
from imagen.logs import uvicorn_log_config


def protocol_with_deadline(deadline_s: float) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, closing connections without a whole request head after ``deadline_s``."""

    class DeadlineHttpProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.timeout_keep_alive = deadline_s  # type: ignore[assignment]  # the float setting; uvicorn says int
            self._head_deadline: asyncio.TimerHandle | None = None
            self._head_cycle: RequestResponseCycle | None = None  # the last response before that head

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_deadline()

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self._arm_head_deadline()  # bytes of a new request head: they must all come in time
            super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None
            super().connection_lost(exc)

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

    return DeadlineHttpProtocol


def serve(app: Any, settings: Settings, host: str, port: int) -> None:
    """Run ``app`` until SIGINT/SIGTERM."""
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info",
        log_config=uvicorn_log_config(),  # uvicorn's lines as ours (JSON with IMAGEN_LOG_FORMAT=json)
        http=protocol_with_deadline(settings.keep_alive_s),
        # uvicorn's own keep-alive timer (after a response); the protocol sets the same value as a float
        timeout_keep_alive=max(1, round(settings.keep_alive_s)),
    )
