"""Webhook receivers for the tests, on 127.0.0.1: a real HTTP server that records every request and answers
what the test scripts (a status, optional headers, an optional delay, all bounded), and a raw-socket one that
drips its answer."""

from __future__ import annotations

import select
import socket
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


class DrippingReceiver:
    """A raw-socket receiver that answers ``HTTP/1.1 200 OK`` and then the rest of its head one byte every
    ``interval_s``, ``drips`` times, before finishing it: every read a client makes gets a byte well within
    any per-read timeout. It records whether the client hung up before the end (``cut``) or waited for it
    all (``finished``)."""

    def __init__(self, drips: int = 60, interval_s: float = 0.5) -> None:
        self.drips = drips
        self.interval_s = interval_s
        self.connections = 0
        self.cut = 0
        self.finished = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}/hook"

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._drip, args=(connection,), daemon=True).start()

    def _count(self, outcome: str) -> None:
        with self._lock:
            setattr(self, outcome, getattr(self, outcome) + 1)

    def _drip(self, connection: socket.socket) -> None:
        with connection:
            connection.settimeout(5.0)
            try:
                connection.recv(65536)  # the request (its head and small body come in one piece)
                connection.sendall(b"HTTP/1.1 200 OK\r\nx-drip: ")
                for _ in range(self.drips):
                    # Wait one interval, unless the client hangs up (readable, and nothing to read) first.
                    readable, _, _ = select.select([connection], [], [], self.interval_s)
                    if self._stopping.is_set():
                        return
                    if readable and not connection.recv(65536):
                        self._count("cut")
                        return
                    connection.sendall(b"x")
                connection.sendall(b"\r\ncontent-length: 0\r\n\r\n")
                self._count("finished")
            except OSError:
                self._count("cut")

    def stop(self) -> None:
        self._stopping.set()
        self._listener.close()
