"""Request heads are bounded (``IMAGEN_MAX_HEADER_LINE_BYTES``, ``IMAGEN_MAX_HEADER_BYTES``,
``IMAGEN_MAX_HEADERS``), against a real ``imagen serve`` through raw sockets: past a limit the client gets
431 and the connection closes, without the server reading the rest of the flood; heads within the limits, and
bodies of any size the body limit allows, are served as before."""

from __future__ import annotations

import io
import json
import select
import socket
import threading
from collections.abc import Callable

from PIL import Image

from tests.conftest import ServerProcess

LINE = b"X-Pad: " + b"a" * (8000 - 9) + b"\r\n"  # one 8,000-byte header line


class Connection:
    """A raw client connection, read through a buffer (answers to pipelined requests may come in one read)."""

    def __init__(self, port: int, head: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.reader = self.sock.makefile("rb")
        self.sock.sendall(head)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.reader.close()
        self.sock.close()

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body (its Content-Length) of the next answer."""
        status_line = self.reader.readline()
        assert status_line, "connection closed before an answer"
        headers = {}
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.lower()] = value.strip()
        body = self.reader.read(int(headers["content-length"]))
        return int(status_line.split()[1]), headers, body

    def closed_by_server(self) -> bool:
        """True once the server ends the connection (end of stream or reset) within the socket's timeout."""
        try:
            return self.reader.read(1) == b""
        except ConnectionError:
            return True
        except TimeoutError:
            return False

    def refused(self) -> str:
        """The ``detail`` of a 431 answer, after which the server closes the connection."""
        status, headers, body = self.answer()
        assert status == 431, (status, body)
        assert headers["content-type"] == "application/json" and headers["connection"] == "close"
        assert self.closed_by_server()
        detail: str = json.loads(body)["detail"]
        assert detail.startswith("En-têtes de requête trop grands")
        return detail


def test_a_header_flood_is_answered_431_at_the_limit_without_reading_the_rest(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server()
    server.start()
    limit = 64 * 1024  # IMAGEN_MAX_HEADER_BYTES' default

    # Lines sent one by one: past the limit, the answer comes without another byte sent.
    with Connection(server.port, b"GET /models HTTP/1.1\r\nHost: 127.0.0.1\r\n") as connection:
        sent = 0
        while sent <= limit:
            connection.sock.sendall(LINE)
            sent += len(LINE)
        readable, _, _ = select.select([connection.sock], [], [], 20)
        assert readable, "no answer after the head passed the limit: the server waits for the rest"
        assert "65536 octets" in connection.refused()

    # A client that keeps sending (100 MB, as an attacker would) is drained, reads its 431, and is closed.
    with Connection(server.port, b"GET /models HTTP/1.1\r\nHost: 127.0.0.1\r\n") as connection:
        sender_error: list[BaseException] = []

        def flood() -> None:
            try:
                for _ in range(130):
                    connection.sock.sendall(LINE * 100)
            except OSError as exc:  # the server may close before the whole flood is sent
                sender_error.append(exc)

        sending = threading.Thread(target=flood)
        sending.start()
        assert connection.refused()
        sending.join(timeout=60)
        assert not sending.is_alive()

    # The server goes on serving.
    with server.client() as client:
        assert client.get("/health").status_code == 200


def test_each_limit_answers_431_and_heads_within_them_are_served(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server(max_header_line_bytes="4096", max_header_bytes="32768", max_headers="20")
    server.start()
    host = b"Host: 127.0.0.1\r\n"

    with Connection(server.port, b"GET /health?" + b"q" * 5000 + b" HTTP/1.1\r\n" + host + b"\r\n") as connection:
        assert "ligne de requête (URL) de plus de 4096 octets" in connection.refused()
    long_header = b"GET /health HTTP/1.1\r\n" + host + b"X-Long: " + b"v" * 5000 + b"\r\n\r\n"
    with Connection(server.port, long_header) as connection:
        assert "en-tête 'x-long' de plus de 4096 octets" in connection.refused()
    many = b"".join(b"X-Header-%d: 1\r\n" % index for index in range(20))  # 20 + Host
    with Connection(server.port, b"GET /health HTTP/1.1\r\n" + host + many + b"\r\n") as connection:
        assert "plus de 20 en-têtes" in connection.refused()
    # 7 lines of 4,000 bytes: each within its limit, 28 KB in all; twice that passes 32 KiB.
    within = b"".join(b"X-Pad-%d: " % index + b"a" * 3980 + b"\r\n" for index in range(7))
    with Connection(server.port, b"GET /health HTTP/1.1\r\n" + host + within + within + b"\r\n") as connection:
        assert "au plus 32768 octets" in connection.refused()

    # Within the limits (20 headers, 28 KB): served, several times on one keep-alive connection, pipelined
    # too, until a head past a limit ends the connection.
    fine = b"GET /health HTTP/1.1\r\n" + host + b"".join(b"X-Header-%d: 1\r\n" % i for i in range(12)) + within
    with Connection(server.port, fine + b"\r\n") as connection:
        assert connection.answer()[0] == 200
        connection.sock.sendall(fine + b"\r\n" + fine + b"\r\n")  # two requests in one write
        assert connection.answer()[0] == 200
        assert connection.answer()[0] == 200
        connection.sock.sendall(long_header)
        assert "x-long" in connection.refused()

    # A body is not part of the head: an upload of 1 MB (a noise PNG) is served as before.
    picture = io.BytesIO()
    Image.effect_noise((700, 700), 100).save(picture, format="PNG")
    assert len(picture.getvalue()) > 8 * 32768
    with server.client() as client:
        answer = client.post("/uploads", files={"file": ("noise.png", picture.getvalue(), "image/png")})
        assert answer.status_code == 201, answer.text
