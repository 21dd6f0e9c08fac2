"""The outbox interface: subscriptions and pending deliveries, kept in the job store so a restart loses none.

Implementations: ``sqlite_outbox.SqliteOutbox`` (tables in the embedded job database) and
``redis_outbox.RedisOutbox`` (keys in the distributed backend's Redis), chosen where the app is wired
(``imagen.api.app.build_outbox``): the interface knows none of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

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

