"""A real HTTP server (uvicorn, in a thread) in front of an app whose lifespan a TestClient already runs:
for clients that bring their own HTTP stack (the `openai` package, `webuiapi`'s requests) on both job
backends (``test_job_contract.job_system``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi.testclient import TestClient

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
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    try:
        wait_for(lambda: server.started)
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        serving.join(timeout=20)
