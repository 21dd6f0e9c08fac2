"""Finished images, from Redis into this API replica's outputs folder (no shared disk between hosts).

Workers put each PNG in Redis and announce it on a stream. Every replica follows the stream and copies each
image as soon as it is announced, then tells Redis it has a copy; Redis drops the PNG once every live replica
(registered with a heartbeat) has one, or after ``png_ttl_s``. A copy that fails (disk full, a folder it may
not write) is logged at WARNING and tried again later with a growing delay, while the other images and the
rest of the replica go on; it is given up when the PNG is gone from Redis. A request for an image not copied
yet fetches it on the spot (``fetch``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path

import redis

from imagen.jobs.distributed.store import RedisJobStore
from imagen.jobs.lifecycle import OwnerToken
from imagen.outputs.names import is_servable_name
from imagen.outputs.png import write_atomically

log = logging.getLogger("imagen.jobs")

STREAM_BLOCK_MS = 500
REPLICA_BEAT_S = 2.0
REPLICA_TTL_S = 10.0  # a replica silent this long no longer holds PNGs back
SWEEP_S = 5.0  # how often PNGs are checked again (a replica died, a TTL passed)
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 30.0


class ImageTransfer:
    def __init__(self, store: RedisJobStore, outputs_dir: Path, replica_id: str | None = None) -> None:
        self.store = store
        self.outputs_dir = outputs_dir
        self.replica_id = replica_id or str(OwnerToken.new())
        self._retries: dict[str, tuple[float, float]] = {}  # name -> (next try, delay after it)
        self._lock = threading.Lock()

    def fetch(self, output_name: str, store: RedisJobStore | None = None) -> bool:
        """Make sure the outputs folder holds ``output_name``: False if Redis no longer has it. Raises
        ``OSError`` when it cannot be written here, ``redis.RedisError`` when Redis cannot be read."""
        if not is_servable_name(output_name):
            return False
        store = store or self.store
        destination = self.outputs_dir / output_name
        if not destination.is_file():
            data = store.get_png(output_name)
            if data is None:
                return False
            write_atomically(destination, data)
        store.release_png(output_name, self.replica_id)
        return True

    def copy(self, output_name: str, store: RedisJobStore | None = None) -> None:
        """``fetch``, never raising: a failure is logged and scheduled for another try."""
        try:
            self.fetch(output_name, store)
        except OSError as exc:
            with self._lock:
                _, delay = self._retries.get(output_name, (0.0, FIRST_RETRY_S))
                self._retries[output_name] = (time.monotonic() + delay, min(MAX_RETRY_S, delay * 2))
            log.warning("image %s: could not be copied into %s (%s); will retry in %.0f s",
                        output_name, self.outputs_dir, exc, delay)
            return
        except redis.RedisError as exc:
            log.warning("image %s: Redis unreachable (%s); will retry", output_name, exc)
            with self._lock:
                self._retries.setdefault(output_name, (time.monotonic() + FIRST_RETRY_S, FIRST_RETRY_S))
            return
        with self._lock:
            self._retries.pop(output_name, None)

    def retry_due(self, store: RedisJobStore | None = None) -> None:
        now = time.monotonic()
        with self._lock:
            due = [name for name, (at, _) in self._retries.items() if at <= now]
        for name in due:
            self.copy(name, store)

    def run(self, store: RedisJobStore, stopping: threading.Event) -> None:
        """Follow the stream until ``stopping`` is set (a thread's body; ``store`` has its own connection,
        able to block ``STREAM_BLOCK_MS`` on the stream)."""
        last_id = b"0"  # from the start of the stream: images finished while this replica was down
        next_beat = next_sweep = 0.0
        while not stopping.is_set():
            try:
                now = time.monotonic()
                if now >= next_beat:  # before reading: PNGs announced from now on wait for this replica
                    store.replica_beat(self.replica_id, REPLICA_TTL_S)
                    next_beat = now + REPLICA_BEAT_S
                for entry_id, name in store.read_outputs(last_id, STREAM_BLOCK_MS):
                    self.copy(name, store)
                    last_id = entry_id
                self.retry_due(store)
                if now >= next_sweep:
                    for name in store.kept_pngs():
                        store.release_png(name)
                    next_sweep = now + SWEEP_S
            except redis.RedisError as exc:
                log.debug("image transfer: Redis unreachable: %s", exc)
                stopping.wait(0.5)
            except Exception:  # never let the thread die: images would stop arriving for good
                log.exception("image transfer: unexpected error")
                stopping.wait(0.5)
        with contextlib.suppress(redis.RedisError):  # else its heartbeat expires on its own
            store.replica_leave(self.replica_id)
