"""The Standard Webhooks headers, signed with ``IMAGEN_WEBHOOK_SECRET`` by the ``standardwebhooks`` package
(the reference implementation receivers verify with). Each attempt is signed with its own timestamp:
receivers refuse timestamps older than five minutes, and a retry may come hours later."""

from __future__ import annotations

from datetime import UTC, datetime

from standardwebhooks import Webhook


class Signer:
    def __init__(self, secret: str) -> None:
        self._webhook = Webhook(secret)

    def headers(self, message_id: str, body: str, now: float) -> dict[str, str]:
        at = datetime.fromtimestamp(int(now), UTC)
        return {
            "webhook-id": message_id,
            "webhook-timestamp": str(int(now)),
            "webhook-signature": self._webhook.sign(message_id, at, body),
        }
