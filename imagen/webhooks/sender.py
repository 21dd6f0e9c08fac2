"""One delivery attempt: check the target, sign, POST, and say what the answer means.

The request goes to the address ``urls.TargetPolicy.resolve`` checked (the Host header and TLS name the
URL's host), redirects are not followed, proxies from the environment are not used (a proxy would connect
to an address nobody checked), and the whole attempt times out after ``ATTEMPT_TIMEOUT_S``.
"""

from __future__ import annotations

import email.utils
import enum
import time
from dataclasses import dataclass

import httpx

from imagen import __version__
from imagen.webhooks.events import Delivery
from imagen.webhooks.signing import Signer
from imagen.webhooks.urls import TargetPolicy, UnsafeTarget

ATTEMPT_TIMEOUT_S = 10.0  # for the answer (and for sending the body)
CONNECT_TIMEOUT_S = 5.0


class Result(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"  # connection error, timeout, 5xx, 429: may pass later
    GONE = "gone"  # 410: the receiver wants no more
    REFUSED = "refused"  # any other answer, or a target that is never called: retrying cannot help


@dataclass(frozen=True)
class Outcome:
    result: Result
    reason: str = ""
    retry_after_s: float | None = None  # what the receiver asked for (Retry-After)


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """``Retry-After`` as seconds from now: a number of seconds, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


class Sender:
    def __init__(self, signer: Signer, policy: TargetPolicy) -> None:
        self.signer = signer
        self.policy = policy
        self.client = httpx.Client(
            timeout=httpx.Timeout(ATTEMPT_TIMEOUT_S, connect=CONNECT_TIMEOUT_S), follow_redirects=False, trust_env=False
        )

    def send(self, delivery: Delivery) -> Outcome:
        try:
            target = self.policy.resolve(delivery.url)
        except UnsafeTarget as exc:
            return Outcome(Result.REFUSED, str(exc))
        except OSError as exc:  # the name does not resolve (now)
            return Outcome(Result.RETRY, f"cannot resolve the host: {exc}")
        url = httpx.URL(delivery.url)
        now = time.time()
        headers = {
            **self.signer.headers(delivery.id, delivery.body, now),
            "content-type": "application/json",
            "user-agent": f"imagen-webhooks/{__version__}",
            "host": url.netloc.decode("ascii"),
        }
        try:
            # Streamed: the answer's body is never read, only its status and headers.
            with self.client.stream(
                "POST",
                url.copy_with(host=target.address),
                content=delivery.body.encode("utf-8"),
                headers=headers,
                extensions={"sni_hostname": target.host},
            ) as response:
                code = response.status_code
                retry_after = response.headers.get("retry-after")
        except httpx.HTTPError as exc:
            return Outcome(Result.RETRY, f"{type(exc).__name__}: {exc}")
        if 200 <= code < 300:
            return Outcome(Result.DELIVERED)
        if code == 410:
            return Outcome(Result.GONE, "410 Gone")
        if code == 429 or code >= 500:
            return Outcome(
                Result.RETRY, f"HTTP {code}", retry_after_s=retry_after_seconds(retry_after, now)
            )
        return Outcome(Result.REFUSED, f"HTTP {code}")

    def close(self) -> None:
        self.client.close()
