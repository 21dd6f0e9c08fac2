"""A webhook receiver for the tests: a real HTTP server on 127.0.0.1 that records every request and answers
what the test scripts (a status, optional headers, an optional delay, all bounded)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the Standard Webhooks spec's example secret


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float

    def verified(self, secret: str = SECRET) -> dict[str, Any]:
        """The payload, after ``standardwebhooks`` checked its signature (raises if it does not match)."""
        payload: dict[str, Any] = Webhook(secret).verify(self.body, self.headers)
        return payload

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


class Receiver:
    """``answer(n)`` says how to answer the n-th request (0-based); default: 200 at once."""

    def __init__(self, port: int = 0, answer: Callable[[int], Answer] | None = None) -> None:
        self.requests: list[Received] = []
        self.answered = 0
        self.answer = answer or (lambda n: Answer())
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._lock:
                    index = len(receiver.requests)
                    receiver.requests.append(
                        Received({k.lower(): v for k, v in self.headers.items()}, body, time.monotonic())
                    )
                reply = receiver.answer(index)
                time.sleep(min(reply.delay_s, 15.0))
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()
                with receiver._lock:
                    receiver.answered += 1

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def payloads(self) -> list[dict[str, Any]]:
        return [request.verified() for request in list(self.requests)]

    def types(self) -> list[str]:
        return [payload["type"] for payload in self.payloads()]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
