"""What the outbox holds: a job's subscription (where to send which events) and the deliveries to make.

A delivery's body is fixed when the event happens (the ``/status`` JSON of that moment) and its id is the
``webhook-id`` of every attempt. The ``completed`` delivery's id is derived from the job id, so writing it
twice (two API replicas, a pass repeated after a crash) cannot make two messages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

EventName = Literal["start", "progress", "completed"]
EVENTS: tuple[EventName, ...] = ("start", "progress", "completed")
DEFAULT_EVENTS: tuple[EventName, ...] = ("completed",)
EVENT_TYPES: dict[EventName, str] = {"start": "job.started", "progress": "job.progress", "completed": "job.completed"}
PROGRESS_EVERY_S = 1.0  # at most one progress event per job per second


@dataclass(frozen=True)
class Subscription:
    job_id: str
    url: str
    events: frozenset[EventName]
    created_at: float
    started_sent: bool = False
    progress_sent_at: float = 0.0
    progress_seen: str = ""  # "step:percent" of the last progress event sent


@dataclass(frozen=True)
class Delivery:
    id: str  # the webhook-id, the same on every attempt
    job_id: str
    url: str
    body: str  # exactly the bytes that are signed and sent
    retry: bool  # only `completed` is retried
    created_at: float
    attempts: int = 0
    next_at: float = 0.0


def delivery_id(job_id: str, event: EventName, at: float) -> str:
    if event == "completed":
        return f"msg_{job_id}_completed"
    if event == "start":
        return f"msg_{job_id}_started"
    return f"msg_{job_id}_progress_{int(at * 1000)}"


def event_body(event: EventName, status: dict[str, Any], at: float) -> str:
    timestamp = datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")
    return json.dumps({"type": EVENT_TYPES[event], "timestamp": timestamp, "data": status}, ensure_ascii=False)


def new_delivery(sub: Subscription, event: EventName, status: dict[str, Any], at: float) -> Delivery:
    return Delivery(
        id=delivery_id(sub.job_id, event, at),
        job_id=sub.job_id,
        url=sub.url,
        body=event_body(event, status, at),
        retry=event == "completed",
        created_at=at,
        next_at=at,
    )
