"""One delivery attempt: check the target, sign, POST, and say what the answer means.

The URL is read by ``httpx.URL`` and checked by ``urls.TargetPolicy`` (as at submission); the connection goes
to an address the policy checked (``network.CheckedBackend``); redirects are not followed; proxies from the
environment are not used (a proxy would connect to an address nobody checked); and the whole attempt (DNS,
connection, TLS, request, the answer's status line and headers) ends after the attempt limit
(``IMAGEN_WEBHOOK_ATTEMPT_TIMEOUT_S``), however slowly the receiver answers.

Whatever goes wrong during an attempt (a URL the sender cannot read, a target the policy refuses, DNS, the
network, anything else) is a failed attempt (``Result.RETRY``): ``send`` never raises.
"""

from __future__ import annotations

import email.utils
import enum
import time
from dataclasses import dataclass

import httpcore
import httpx

from imagen import __version__
from imagen.webhooks.events import Delivery
from imagen.webhooks.network import AttemptClock, CheckedBackend, CheckedTransport
from imagen.webhooks.signing import Signer
from imagen.webhooks.urls import Resolver, TargetPolicy, system_resolver

CONNECT_TIMEOUT_S = 5.0  # within the attempt's limit


class Result(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"  # 5xx, 429, or no answer (any error: URL, target refused, DNS, connection, time limit)
    GONE = "gone"  # 410: the receiver wants no more
    REFUSED = "refused"  # any other answer (3xx, 4xx): retrying cannot help


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


def failure_reason(exc: Exception) -> str:
    if isinstance(exc, (httpx.TimeoutException, httpcore.TimeoutException)):
        return f"timed out ({exc})"
    return f"{type(exc).__name__}: {exc}"


class Sender:
    def __init__(
        self, signer: Signer, policy: TargetPolicy, attempt_timeout_s: float, resolver: Resolver = system_resolver
    ) -> None:
        self.signer = signer
        self.policy = policy
        self.attempt_timeout_s = attempt_timeout_s
        self.clock = AttemptClock()
        self.client = httpx.Client(
            transport=CheckedTransport(CheckedBackend(policy, self.clock, resolver)),
            timeout=httpx.Timeout(attempt_timeout_s, connect=min(CONNECT_TIMEOUT_S, attempt_timeout_s)),
            follow_redirects=False,
            trust_env=False,
        )

    def send(self, delivery: Delivery) -> Outcome:
        """One attempt, within the attempt limit; never raises."""
        try:
            with self.clock.limit(self.attempt_timeout_s):
                return self._send(delivery)
        except Exception as exc:
            return Outcome(Result.RETRY, failure_reason(exc))

    def _send(self, delivery: Delivery) -> Outcome:
        url = self.policy.check_url(delivery.url).url
        now = time.time()
        headers = {
            **self.signer.headers(delivery.id, delivery.body, now),
            "content-type": "application/json",
            "user-agent": f"imagen-webhooks/{__version__}",
        }
        # Streamed: the answer's body is never read, only its status and headers.
        with self.client.stream("POST", url, content=delivery.body.encode("utf-8"), headers=headers) as response:
            code = response.status_code
            retry_after = response.headers.get("retry-after")
        if 200 <= code < 300:
            return Outcome(Result.DELIVERED)
        if code == 410:
            return Outcome(Result.GONE, "410 Gone")
        if code == 429 or code >= 500:
            return Outcome(Result.RETRY, f"HTTP {code}", retry_after_s=retry_after_seconds(retry_after, now))
        return Outcome(Result.REFUSED, f"HTTP {code}")

    def close(self) -> None:
        self.client.close()
