"""How a webhook attempt reaches the network: the addresses are checked when connecting, and one deadline
bounds the whole attempt.

``httpx`` timeouts apply to each read, write or connect on its own: a receiver that answers one byte every
few seconds never trips them, and holds a send thread as long as it likes. Here ``httpx`` sends through an
``httpcore`` connection pool whose network backend

- resolves the host itself (the lookup bounded by the attempt's time), checks every address with the
  ``TargetPolicy`` and connects to a checked one, so DNS rebinding cannot swap the address after the check;
- gives every network operation (connect, TLS handshake, each read and write) at most the time left
  until the attempt's deadline, and fails it once the deadline has passed. The deadline belongs to the
  thread that runs the attempt (``AttemptClock.limit``), as the pool threads each run one attempt at a time.
"""

from __future__ import annotations

import math
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from typing import Any

import httpcore
import httpx

from imagen.webhooks.urls import Resolver, TargetPolicy, system_resolver

WRITE_CHUNK = 16 * 1024  # each write waits for the receiver at most the time left, chunk by chunk
DNS_THREADS = 4


class AttemptClock(threading.local):
    """The deadline (``time.monotonic``) of the attempt the current thread runs; none outside an attempt."""

    deadline: float = math.inf

    @contextmanager
    def limit(self, seconds: float) -> Iterator[None]:
        self.deadline = time.monotonic() + seconds
        try:
            yield
        finally:
            self.deadline = math.inf

    def left(self, timeout: float | None, expired: type[Exception]) -> float | None:
        """The timeout for one network operation: at most the time left; raises ``expired`` when none is."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise expired("the attempt's time limit was reached")
        if math.isinf(remaining):
            return timeout
        return remaining if timeout is None else min(timeout, remaining)


class BoundedStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, clock: AttemptClock) -> None:
        self._inner = inner
        self._clock = clock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._clock.left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        for start in range(0, len(buffer), WRITE_CHUNK):
            self._inner.write(buffer[start : start + WRITE_CHUNK], self._clock.left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        # One handshake call: Python's ssl module bounds the whole of it by the timeout.
        inner = self._inner.start_tls(ssl_context, server_hostname, self._clock.left(timeout, httpcore.ConnectTimeout))
        return BoundedStream(inner, self._clock)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class CheckedBackend(httpcore.NetworkBackend):
    """Connects only to addresses the policy allows, within the attempt's time."""

    def __init__(self, policy: TargetPolicy, clock: AttemptClock, resolver: Resolver = system_resolver) -> None:
        self.policy = policy
        self.clock = clock
        self.resolver = resolver
        self._inner = httpcore.SyncBackend()
        # getaddrinfo cannot be interrupted: it runs here, and the attempt stops waiting for it at its deadline.
        self._dns = ThreadPoolExecutor(DNS_THREADS, thread_name_prefix="imagen-webhook-dns")

    def _resolve(self, host: str, port: int) -> list[str]:
        wait = self.clock.left(None, httpcore.ConnectTimeout)
        future = self._dns.submit(self.resolver, host, port)
        try:
            return list(future.result(timeout=wait))
        except FutureTimeout:
            future.cancel()
            raise httpcore.ConnectTimeout(f"no DNS answer for {host} within the attempt's time limit") from None

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = self.policy.addresses(host, port, resolver=self._resolve)
        failure: Exception | None = None
        for address in addresses:  # every one was checked: try them in the resolver's order
            try:
                stream = self._inner.connect_tcp(
                    address, port, self.clock.left(timeout, httpcore.ConnectTimeout), local_address, socket_options
                )
            except httpcore.ConnectError as exc:
                failure = exc
                continue
            return BoundedStream(stream, self.clock)
        assert failure is not None  # addresses is never empty
        raise failure

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("webhooks are sent over TCP only")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def close(self) -> None:
        self._dns.shutdown(wait=False, cancel_futures=True)


class _ResponseBody(httpx.SyncByteStream):
    def __init__(self, response: httpcore.Response) -> None:
        self._response = response

    def __iter__(self) -> Iterator[bytes]:
        yield from self._response.iter_stream()

    def close(self) -> None:
        self._response.close()


class CheckedTransport(httpx.BaseTransport):
    """An ``httpx`` transport over a connection pool that uses ``CheckedBackend``: no proxy, no Unix socket."""

    def __init__(self, backend: CheckedBackend) -> None:
        self.backend = backend
        self._pool = httpcore.ConnectionPool(ssl_context=httpx.create_ssl_context(), network_backend=backend)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        response = self._pool.handle_request(
            httpcore.Request(
                method=request.method,
                url=httpcore.URL(
                    scheme=request.url.raw_scheme,
                    host=request.url.raw_host,
                    port=request.url.port,
                    target=request.url.raw_path,
                ),
                headers=request.headers.raw,
                content=request.stream,
                extensions=request.extensions,
            )
        )
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseBody(response),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._pool.close()
        self.backend.close()
