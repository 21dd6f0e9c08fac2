"""The outbox interface: subscriptions and pending deliveries, kept in the job store so a restart loses none.

Implementations: ``sqlite_outbox.SqliteOutbox`` (tables in the embedded job database) and
``redis_outbox.RedisOutbox`` (keys in the distributed backend's Redis), chosen by ``build_outbox``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from imagen.config import Settings
from imagen.webhooks.events import Delivery, Subscription


class Outbox(ABC):
    @abstractmethod
    def subscribe(self, sub: Subscription) -> None:
        """Durable before the job is queued (written before it). Raises ``BrokerUnavailableError`` when the
        store cannot be reached."""

    @abstractmethod
    def unsubscribe(self, job_id: str) -> None: ...

    @abstractmethod
    def subscriptions(self) -> list[Subscription]:
        """Those of jobs whose completion has not been turned into a delivery yet."""

    @abstractmethod
    def update_subscription(self, sub: Subscription) -> None:
        """Record which intermediate events were sent (a no-op once the subscription is gone)."""

    @abstractmethod
    def enqueue(self, delivery: Delivery) -> None: ...

    @abstractmethod
    def conclude(self, job_id: str, delivery: Delivery | None) -> bool:
        """In one atomic step: end the subscription and queue its final delivery (if any). False when it
        was concluded already (the delivery is then not queued again)."""

    @abstractmethod
    def claim_due(self, now: float, limit: int, lease_s: float) -> list[Delivery]:
        """Up to ``limit`` deliveries due by ``now``, oldest first, each claimed for ``lease_s``: no other
        dispatcher (or replica) sends it meanwhile, and it is not among the due ones until its lease ends or
        its outcome is written (deliveries in flight, or whose sender died, never hide later ones)."""

    @abstractmethod
    def reschedule(self, delivery_id: str, attempts: int, next_at: float) -> None:
        """Another attempt at ``next_at``; releases the claim."""

    @abstractmethod
    def remove(self, delivery_id: str) -> None:
        """Delivered, or given up."""

    @abstractmethod
    def pending(self) -> dict[str, int]:
        """The deliveries not made yet (webhook-id: attempts made so far)."""

    def lead(self, holder: str, ttl_s: float) -> bool:
        """Whether ``holder`` is the one that turns job changes into deliveries (one per store)."""
        return True

    @abstractmethod
    def close(self) -> None: ...


def build_outbox(settings: Settings) -> Outbox:
    if settings.broker_url:
        from imagen.jobs.distributed.store import connect
        from imagen.webhooks.redis_outbox import RedisOutbox

        # Short timeouts, as for the API's other Redis calls: a stalled Redis gives a 503 within seconds.
        return RedisOutbox(connect(settings.broker_url, socket_timeout=1.0, retry_on_timeout=False))
    from imagen.webhooks.sqlite_outbox import SqliteOutbox

    return SqliteOutbox(settings.database_path)
