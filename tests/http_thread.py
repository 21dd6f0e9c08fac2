"""A real HTTP server (uvicorn, in a thread) in front of an app whose lifespan a TestClient already runs:
for clients that bring their own HTTP stack (the `openai` package, `webuiapi`'s requests) on both job
backends (``test_job_contract.job_system``)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from imagen.api.app import close_loop_connections
from tests.conftest import free_port, wait_for


@contextmanager
def http_server(client: TestClient) -> Iterator[str]:
    """The base URL of a server for ``client``'s app (its backend already started by the client)."""
    # loop="asyncio": uvloop's own loop, run in this non-main thread, crashed a test run once (a segfault in
    # its C code, under asyncio.run); `imagen serve` keeps uvloop, in its main thread.
    server = uvicorn.Server(
        uvicorn.Config(
            client.app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="off", loop="asyncio"
        )
    )
    loop = asyncio.new_event_loop()
    serving = threading.Thread(target=loop.run_until_complete, args=(_serve_then_tidy(server),), daemon=True)
    serving.start()
    try:
        wait_for(lambda: server.started)
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        # What requests opened on this server's loop (the Redis change listener, the rate limiter's
        # connections) is closed on this loop, while it still runs: the TestClient's lifespan, on its own
        # loop, cannot close it.
        asyncio.run_coroutine_threadsafe(close_loop_connections(cast(FastAPI, client.app)), loop).result(timeout=20)
        server.should_exit = True
        serving.join(timeout=20)
        loop.close()


async def _serve_then_tidy(server: uvicorn.Server) -> None:
    """Serve; then end what the requests left on this loop (an SSE response's shutdown watcher), so that
    closing the loop destroys no pending task."""
    try:
        await server.serve()
    finally:
        left = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
