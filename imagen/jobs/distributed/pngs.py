"""Finished PNGs on their way from the workers to every API replica, and the registry of live replicas.

A worker's ``complete`` puts a job's PNGs in Redis and announces them on a stream; each
replica's ``image_transfer`` copies them into its outputs folder and says so here; a PNG leaves Redis once
every live replica has a copy, or expires ``png_ttl_s`` after the first one, or makes room for newer ones
past ``png_redis_max_bytes``. One no replica has copied never leaves, and while such PNGs fill the limit no
new job is accepted or started (``backlog_full``). The keys are described in ``keys.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import redis

from imagen.jobs.distributed.keys import (
    COPIES_PREFIX,
    OUTPUTS_STREAM,
    PNG_BYTES,
    PNG_INDEX,
    PNG_ORDER,
    PNG_PREFIX,
    PNG_UNCOPIED,
    PNG_UNCOPIED_BYTES,
    REPLICAS,
    copies_key,
    png_key,
)
from imagen.jobs.distributed.scripts import Scripts

if TYPE_CHECKING:
    from imagen.config import Settings


@dataclass(frozen=True)
class PngLimits:
    """How long, and within how many bytes in all, Redis keeps finished PNGs for the API replicas."""

    ttl_s: float
    max_bytes: int

    @classmethod
    def defaults(cls) -> PngLimits:
        from imagen.config import Settings

        fields = Settings.model_fields
        return cls(ttl_s=fields["png_ttl_s"].default, max_bytes=fields["png_redis_max_bytes"].default)

    @classmethod
    def from_settings(cls, settings: Settings) -> PngLimits:
        return cls(ttl_s=settings.png_ttl_s, max_bytes=settings.png_redis_max_bytes)


class Pngs:
    def __init__(self, client: redis.Redis, scripts: Scripts, limits: PngLimits) -> None:
        self.client = client
        self.scripts = scripts
        self.limits = limits

    def get(self, output_name: str) -> bytes | None:
        return cast(bytes | None, self.client.get(png_key(output_name)))

    def read_finished(self, after_id: bytes, block_ms: int) -> list[tuple[bytes, str]]:
        """Finished images after stream entry ``after_id``: (entry id, output name)."""
        answer = cast(list[Any], self.client.xread({OUTPUTS_STREAM: after_id}, count=500, block=block_ms))
        entries: list[tuple[bytes, str]] = []
        for _stream, items in answer or []:
            for entry_id, fields in items:
                name = fields.get(b"output_name", b"").decode()
                entries.append((entry_id, name))
        return entries

    def replica_beat(self, replica_id: str, ttl_s: float) -> None:
        """This API replica is alive for ``ttl_s`` more: PNGs wait for its copy until then."""
        self.scripts.run("replica_beat", [REPLICAS], [replica_id, max(1, int(ttl_s * 1000))])

    def replica_leave(self, replica_id: str) -> None:
        self.client.zrem(REPLICAS, replica_id)

    def release(self, output_name: str, replica_id: str = "") -> bool:
        """``replica_id`` has a copy of the PNG (``""``: nobody new): delete it from Redis when every live
        replica has one, or when it expired. True when it is gone from Redis."""
        return bool(
            self.scripts.run(
                "release_png",
                [png_key(output_name), copies_key(output_name), REPLICAS, *PNG_INDEX],
                [output_name, replica_id, int(self.limits.ttl_s * 1000), PNG_PREFIX, COPIES_PREFIX],
            )
        )

    def kept(self) -> list[str]:
        """The names of the PNGs Redis holds: those no replica has copied yet, then the others (oldest first)."""
        return self.uncopied() + [raw.decode() for raw in cast(list[bytes], self.client.zrange(PNG_ORDER, 0, -1))]

    def uncopied(self) -> list[str]:
        """The PNGs that no API replica has copied yet (oldest first): they stay until one does."""
        return [raw.decode() for raw in cast(list[bytes], self.client.zrange(PNG_UNCOPIED, 0, -1))]

    def backlog_bytes(self) -> int:
        """Bytes of the PNGs no API replica has copied yet."""
        return int(cast(bytes | None, self.client.get(PNG_UNCOPIED_BYTES)) or 0)

    def backlog_full(self) -> bool:
        """PNGs no replica has copied fill ``png_redis_max_bytes``: take no new job until copies make room."""
        return self.backlog_bytes() >= self.limits.max_bytes

    def total_bytes(self) -> int:
        """Bytes of all the PNGs Redis holds."""
        return int(cast(bytes | None, self.client.get(PNG_BYTES)) or 0)
