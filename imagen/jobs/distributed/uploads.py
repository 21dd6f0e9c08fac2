"""Images sent to ``POST /uploads``, kept as sent until they expire, with each key's quota of live uploads.

An upload is one hash with a Redis expiry; a key's live uploads are indexed (ids by expiry, and their
sizes) so that its quota (``types.UploadQuota``) is checked against what it holds now (see ``keys.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import cast

import redis

from imagen.jobs.distributed.keys import upload_key, upload_sizes_key, uploads_index_key
from imagen.jobs.distributed.scripts import CONFLICT_RETRIES
from imagen.jobs.types import Upload, UploadQuota


class Uploads:
    def __init__(self, client: redis.Redis, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.clock = clock

    def save(self, upload: Upload, quota: UploadQuota | None = None) -> None:
        """Keep the upload until it expires, and index it under its owner; with a ``quota``, first check that it
        fits beside the owner's live uploads (``UploadQuotaError``: nothing stored). The check reads the index
        under ``WATCH`` and the write is one ``MULTI``: an upload of the same owner in between makes it read
        again, so two at once never both pass the last free place."""
        size = len(upload.data)
        index, sizes = uploads_index_key(upload.key_name), upload_sizes_key(upload.key_name)
        # A read is spoiled only by another upload of the same owner that was kept meanwhile, and no more than
        # ``max_uploads`` of those fit: with one try more, racing uploads get the quota's answer (kept or 429),
        # never a 503 for running out of tries.
        tries = quota.max_uploads + 1 if quota is not None else CONFLICT_RETRIES
        for _ in range(tries):
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(index, sizes)  # type: ignore[no-untyped-call]
                    now = self.clock()
                    live = cast(list[tuple[bytes, float]], pipe.zrangebyscore(index, f"({now!r}", "+inf",
                                                                              withscores=True))  # fmt: skip
                    expired = cast(list[bytes], pipe.zrangebyscore(index, "-inf", repr(now)))
                    if quota is not None:
                        counted = cast(list[bytes | None], pipe.hmget(sizes, [i for i, _ in live]) if live else [])
                        oldest = live[0][1] - now if live else None
                        quota.check(len(live), sum(int(value or 0) for value in counted), size, oldest)
                    ttl_ms = max(1, int((upload.expires_at - now) * 1000))
                    index_ttl_ms = max([ttl_ms, *(int((at - now) * 1000) + 1 for _, at in live)])
                    pipe.multi()
                    if expired:
                        pipe.zrem(index, *expired)
                        pipe.hdel(sizes, *expired)
                    pipe.hset(
                        upload_key(upload.upload_id),
                        mapping={"key_name": upload.key_name, "data": upload.data, "width": upload.width,
                                 "height": upload.height, "expires_at": repr(upload.expires_at)},
                    )  # fmt: skip
                    pipe.pexpire(upload_key(upload.upload_id), ttl_ms)
                    pipe.zadd(index, {upload.upload_id: upload.expires_at})
                    pipe.hset(sizes, upload.upload_id, size)
                    pipe.pexpire(index, index_ttl_ms)
                    pipe.pexpire(sizes, index_ttl_ms)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue
        raise redis.RedisError(f"uploads of {upload.key_name!r}: the index kept changing while being read")

    def load(self, upload_id: str) -> Upload | None:
        # "png": the field's name before uploads were kept as sent (an upload of that time lives an hour).
        fields = ["key_name", "data", "width", "height", "expires_at", "png"]
        values = cast(list[bytes | None], self.client.hmget(upload_key(upload_id), fields))
        values[1] = values[1] if values[1] is not None else values.pop()
        if any(value is None for value in values[:5]):
            return None
        key_name, data, width, height, expires_at = cast(list[bytes], values[:5])
        if float(expires_at) <= self.clock():
            return None
        return Upload(
            upload_id=upload_id, key_name=key_name.decode(), data=data, width=int(width), height=int(height),
            expires_at=float(expires_at),
        )  # fmt: skip
