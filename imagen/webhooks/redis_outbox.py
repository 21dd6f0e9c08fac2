"""The distributed backend's outbox: keys in the job Redis, shared by every API replica.

- ``imagen:webhook:subs`` set of the job ids with a subscription; ``imagen:webhook:sub:{job_id}`` its hash.
- ``imagen:webhook:delivery:{id}`` a pending delivery (hash); ``imagen:webhook:due`` sorted set of their ids,
  scored by the time of the next attempt.
- A claim (one attempt at a time per webhook-id across replicas) moves the delivery's score to the end of
  its lease, in one script: a claimed delivery leaves the due range, so the oldest due ids are always ones
  nobody holds (deliveries being sent, or whose sender died, never hide later ones), and a replica that dies
  mid-attempt lets it come back when the lease ends. The outcome then sets the score (retry) or removes it.
- ``imagen:webhook:watcher`` the replica that turns job changes into deliveries (a short lock).

Concluding a subscription and queuing its delivery is one Lua script.
"""

from __future__ import annotations

import json
from typing import cast

import redis
from redis.typing import EncodableT, FieldT

from imagen.errors import BrokerUnavailableError
from imagen.jobs.distributed.workers import hold_lease
from imagen.webhooks.events import Delivery, EventName, Subscription
from imagen.webhooks.outbox import Outbox

PREFIX = "imagen:webhook:"
SUBS = PREFIX + "subs"
DUE = PREFIX + "due"
WATCHER = PREFIX + "watcher"

# KEYS: subs, sub hash, delivery hash, due. ARGV: job id, then (id, delivery fields as JSON, next_at) or nothing.
CONCLUDE = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('DEL', KEYS[2])
if ARGV[2] then
  if redis.call('EXISTS', KEYS[3]) == 0 then
    local fields = cjson.decode(ARGV[3])
    for name, value in pairs(fields) do redis.call('HSET', KEYS[3], name, tostring(value)) end
    redis.call('ZADD', KEYS[4], ARGV[4], ARGV[2])
  end
end
return 1
"""
# KEYS: due. ARGV: now, limit, end of the lease. The ids claimed, each followed by its due time (the score).
CLAIM_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local claimed = {}
for _, id in ipairs(ids) do
  table.insert(claimed, id)
  table.insert(claimed, redis.call('ZSCORE', KEYS[1], id))
  redis.call('ZADD', KEYS[1], ARGV[3], id)
end
return claimed
"""
# Only while the subscription exists: a late write never brings a concluded one back.
UPDATE_SUB = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'started_sent', ARGV[1], 'progress_sent_at', ARGV[2], 'progress_seen', ARGV[3])
return 1
"""


def sub_key(job_id: str) -> str:
    return f"{PREFIX}sub:{job_id}"


def delivery_key(delivery_id: str) -> str:
    return f"{PREFIX}delivery:{delivery_id}"


def _fields(delivery: Delivery) -> dict[FieldT, EncodableT]:
    return {
        "job_id": delivery.job_id,
        "url": delivery.url,
        "body": delivery.body,
        "retry": "1" if delivery.retry else "0",
        "created_at": repr(delivery.created_at),
        "attempts": str(delivery.attempts),
    }


class RedisOutbox(Outbox):
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._conclude = client.register_script(CONCLUDE)
        self._update_sub = client.register_script(UPDATE_SUB)
        self._claim_due = client.register_script(CLAIM_DUE)

    def subscribe(self, sub: Subscription) -> None:
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.hset(
                    sub_key(sub.job_id),
                    mapping={
                        "url": sub.url, "events": json.dumps(sorted(sub.events)), "created_at": repr(sub.created_at)
                    },
                )
                pipe.sadd(SUBS, sub.job_id)
                pipe.execute()
        except redis.RedisError as exc:  # the submission answers 503, as when the job cannot be queued
            raise BrokerUnavailableError(f"Redis unreachable: {exc}") from exc

    def unsubscribe(self, job_id: str) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.srem(SUBS, job_id)
            pipe.delete(sub_key(job_id))
            pipe.execute()

    def subscriptions(self) -> list[Subscription]:
        job_ids = sorted(raw.decode() for raw in cast(set[bytes], self.client.smembers(SUBS)))
        if not job_ids:
            return []
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(sub_key(job_id))
            hashes = cast(list[dict[bytes, bytes]], pipe.execute())
        subs = []
        for job_id, raw in zip(job_ids, hashes, strict=True):
            fields = {key.decode(): value.decode() for key, value in raw.items()}
            if "url" not in fields:
                continue  # concluded between the two reads
            subs.append(
                Subscription(
                    job_id=job_id,
                    url=fields["url"],
                    events=frozenset(cast(list[EventName], json.loads(fields["events"]))),
                    created_at=float(fields["created_at"]),
                    started_sent=fields.get("started_sent") == "1",
                    progress_sent_at=float(fields.get("progress_sent_at", 0.0)),
                    progress_seen=fields.get("progress_seen", ""),
                )
            )
        return subs

    def update_subscription(self, sub: Subscription) -> None:
        self._update_sub(
            keys=[sub_key(sub.job_id)],
            args=["1" if sub.started_sent else "0", repr(sub.progress_sent_at), sub.progress_seen],
        )

    def enqueue(self, delivery: Delivery) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(delivery_key(delivery.id), mapping=_fields(delivery))
            pipe.zadd(DUE, {delivery.id: delivery.next_at})
            pipe.execute()

    def conclude(self, job_id: str, delivery: Delivery | None) -> bool:
        keys = [SUBS, sub_key(job_id), delivery_key(delivery.id if delivery else ""), DUE]
        args = [job_id]
        if delivery is not None:
            args += [delivery.id, json.dumps(_fields(delivery)), repr(delivery.next_at)]
        return bool(self._conclude(keys=keys, args=args))

    def claim_due(self, now: float, limit: int, lease_s: float) -> list[Delivery]:
        if limit <= 0:
            return []
        raw = cast(list[bytes], self._claim_due(keys=[DUE], args=[repr(now), limit, repr(now + lease_s)]))
        due = {raw[i].decode(): float(raw[i + 1]) for i in range(0, len(raw), 2)}
        if not due:
            return []
        with self.client.pipeline(transaction=False) as pipe:
            for delivery_id in due:
                pipe.hgetall(delivery_key(delivery_id))
            hashes = cast(list[dict[bytes, bytes]], pipe.execute())
        claimed: list[Delivery] = []
        for (delivery_id, next_at), raw_fields in zip(due.items(), hashes, strict=True):
            fields = {key.decode(): value.decode() for key, value in raw_fields.items()}
            if "url" not in fields:  # removed meanwhile, or a hash lost: nothing to send
                self.remove(delivery_id)
                continue
            claimed.append(
                Delivery(
                    id=delivery_id,
                    job_id=fields["job_id"],
                    url=fields["url"],
                    body=fields["body"],
                    retry=fields["retry"] == "1",
                    created_at=float(fields["created_at"]),
                    attempts=int(fields["attempts"]),
                    next_at=next_at,
                )
            )
        return claimed

    def reschedule(self, delivery_id: str, attempts: int, next_at: float) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(delivery_key(delivery_id), "attempts", str(attempts))
            pipe.zadd(DUE, {delivery_id: next_at}, xx=True)
            pipe.execute()

    def remove(self, delivery_id: str) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(delivery_key(delivery_id))
            pipe.zrem(DUE, delivery_id)
            pipe.execute()

    def pending(self) -> dict[str, int]:
        ids = [raw.decode() for raw in cast(list[bytes], self.client.zrange(DUE, 0, -1))]
        with self.client.pipeline(transaction=False) as pipe:
            for delivery_id in ids:
                pipe.hget(delivery_key(delivery_id), "attempts")
            attempts = cast(list[bytes | None], pipe.execute()) if ids else []
        return {delivery_id: int(count or 0) for delivery_id, count in zip(ids, attempts, strict=True)}

    def lead(self, holder: str, ttl_s: float) -> bool:
        return hold_lease(self.client, WATCHER, holder, ttl_s)

    def close(self) -> None:
        self.client.close()
