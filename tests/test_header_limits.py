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


def read_answer(sock: socket.socket, wait_s: float = 20.0) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP answer (its Content-Length), read from ``sock``."""
    sock.settimeout(wait_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of an answer"
        body += chunk
    return int(status_line.split()[1]), headers, body


def closed_by_server(sock: socket.socket, wait_s: float = 20.0) -> bool:
    """True once the server ends the connection (end of stream or reset) within ``wait_s``."""
    sock.settimeout(wait_s)
    try:
        return sock.recv(1) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


def refused(sock: socket.socket) -> str:
    """The ``detail`` of a 431 answer on ``sock``, after which the server closes the connection."""
    status, headers, body = read_answer(sock)
    assert status == 431, (status, body)
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert closed_by_server(sock)
    detail: str = json.loads(body)["detail"]
    assert detail.startswith("En-têtes de requête trop grands")
    return detail


def ask(port: int, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(head)
    return sock


def test_a_header_flood_is_answered_431_at_the_limit_without_reading_the_rest(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server()
    server.start()
    limit = 64 * 1024  # IMAGEN_MAX_HEADER_BYTES' default

    # Lines sent one by one: past the limit, the answer comes without another byte sent.
    with ask(server.port, b"GET /models HTTP/1.1\r\nHost: 127.0.0.1\r\n") as sock:
        sent = 0
        while sent <= limit:
            sock.sendall(LINE)
            sent += len(LINE)
        readable, _, _ = select.select([sock], [], [], 20)
        assert readable, "no answer after the head passed the limit: the server waits for the rest"
        assert "65536 octets" in refused(sock)

    # A client that keeps sending (100 MB, as an attacker would) is drained, reads its 431, and is closed.
    with ask(server.port, b"GET /models HTTP/1.1\r\nHost: 127.0.0.1\r\n") as sock:
        sender_error: list[BaseException] = []

        def flood() -> None:
            try:
                for _ in range(130):
                    sock.sendall(LINE * 100)
            except OSError as exc:  # the server may close before the whole flood is sent
                sender_error.append(exc)

        sending = threading.Thread(target=flood)
        sending.start()
        assert refused(sock)
        sending.join(timeout=60)
        assert not sending.is_alive()

    # The server goes on serving.
    with server.client() as client:
        assert client.get("/health").status_code == 200


def test_each_limit_answers_431_and_heads_within_them_are_served(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server(max_header_line_bytes="4096", max_header_bytes="32768", max_headers="20")
    server.start()
    host = b"Host: 127.0.0.1\r\n"

    with ask(server.port, b"GET /health?" + b"q" * 5000 + b" HTTP/1.1\r\n" + host + b"\r\n") as sock:
        assert "ligne de requête (URL) de plus de 4096 octets" in refused(sock)
    with ask(server.port, b"GET /health HTTP/1.1\r\n" + host + b"X-Long: " + b"v" * 5000 + b"\r\n\r\n") as sock:
        assert "en-tête 'x-long' de plus de 4096 octets" in refused(sock)
    many = b"".join(b"X-Header-%d: 1\r\n" % index for index in range(20))  # 20 + Host
    with ask(server.port, b"GET /health HTTP/1.1\r\n" + host + many + b"\r\n") as sock:
        assert "plus de 20 en-têtes" in refused(sock)
    # 7 lines of 4,000 bytes: each within its limit, 28 KB in all; twice that passes 32 KiB.
    within = b"".join(b"X-Pad-%d: " % index + b"a" * 3980 + b"\r\n" for index in range(7))
    with ask(server.port, b"GET /health HTTP/1.1\r\n" + host + within + within + b"\r\n") as sock:
        assert "au plus 32768 octets" in refused(sock)

    # Within the limits (20 headers, 28 KB): served, several times on one keep-alive connection, pipelined
    # too, until a head past a limit ends the connection.
    fine = b"GET /health HTTP/1.1\r\n" + host + b"".join(b"X-Header-%d: 1\r\n" % i for i in range(12)) + within
    with ask(server.port, fine + b"\r\n") as sock:
        assert read_answer(sock)[0] == 200
        sock.sendall(fine + b"\r\n" + fine + b"\r\n")  # two requests in one write
        assert read_answer(sock)[0] == 200
        assert read_answer(sock)[0] == 200
        sock.sendall(b"GET /health HTTP/1.1\r\n" + host + b"X-Long: " + b"v" * 5000 + b"\r\n\r\n")
        assert "x-long" in refused(sock)

    # A body is not part of the head: an upload of 1 MB (a noise PNG) is served as before.
    picture = io.BytesIO()
    Image.effect_noise((700, 700), 100).save(picture, format="PNG")
    assert len(picture.getvalue()) > 8 * 32768
    with server.client() as client:
        answer = client.post("/uploads", files={"file": ("noise.png", picture.getvalue(), "image/png")})
        assert answer.status_code == 201, answer.text
