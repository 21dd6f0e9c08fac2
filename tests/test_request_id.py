"""``X-Request-ID``: echoed when the client sent a usable one, generated otherwise, on every response."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from imagen.api.request_id import usable_request_id

GENERATED = re.compile(r"^[0-9a-f]{32}$")


def test_a_request_id_is_echoed(client: TestClient) -> None:
    response = client.get("/health", headers={"X-Request-ID": "trace-42/abc"})
    assert response.headers["X-Request-ID"] == "trace-42/abc"


def test_a_request_id_is_generated_when_absent(client: TestClient) -> None:
    first = client.get("/health").headers["X-Request-ID"]
    second = client.get("/health").headers["X-Request-ID"]
    assert GENERATED.match(first) and GENERATED.match(second)
    assert first != second


@pytest.mark.parametrize("sent", ["x" * 129, "caf\u00e9", "tab\there", "   "])
def test_an_unusable_request_id_is_replaced(client: TestClient, sent: str) -> None:
    response = client.get("/health", headers={"X-Request-ID": sent.encode("utf-8")})  # type: ignore[dict-item]
    assert GENERATED.match(response.headers["X-Request-ID"])


def test_error_responses_carry_it_too(client: TestClient) -> None:
    for response in (
        client.get("/status/nope", headers={"X-Request-ID": "r-404"}),
        client.post("/generate", json={}, headers={"X-Request-ID": "r-422"}),
        client.get("/metrics", headers={"X-Request-ID": "r-metrics"}),
    ):
        assert response.headers["X-Request-ID"] == response.request.headers["X-Request-ID"]
    assert response.status_code == 200


def test_usable_request_id() -> None:
    assert usable_request_id("a" * 128) == "a" * 128
    assert usable_request_id("a" * 129) is None
    assert usable_request_id(" spaced id ") == "spaced id"
    assert usable_request_id("") is None
    assert usable_request_id("\x7f") is None
    assert usable_request_id(None) is None
