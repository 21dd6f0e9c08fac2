"""Finished images, from Redis into this API replica's outputs folder (no shared disk between hosts).

Workers put each PNG in Redis and announce it on a stream. Every replica follows the stream and copies each
image as soon as it is announced, then tells Redis it has a copy; Redis drops the PNG once every live replica
(registered with a heartbeat) has one, or ``png_ttl_s`` after the first copy. A PNG that no replica has
copied never leaves Redis (``Pngs.backlog_full`` refuses new work instead, once such PNGs fill
``png_redis_max_bytes``), so a replica whose disk was full for long still gets every image once it has room.

A copy that fails (a folder it may not write, a file in the way) is logged at WARNING and tried again later
with a growing delay, while the other images and the rest of the replica go on. A full disk (``ENOSPC``,
``EDQUOT``) pauses every copy instead: one image is tried again after a growing delay, and the others follow
once it is written (``disk_full``; ``/health`` and ``/metrics`` show it). The stream is not the only way in:
each sweep also copies any PNG no replica has yet. A request for an image not copied yet fetches it on the
spot (``fetch``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path

import redis

from imagen.errors import is_out_of_space
from imagen.jobs.distributed.pngs import Pngs
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
    def __init__(self, pngs: Pngs, outputs_dir: Path, replica_id: str | None = None) -> None:
        self.pngs = pngs
        self.outputs_dir = outputs_dir
        self.replica_id = replica_id or str(OwnerToken.new())
        self._retries: dict[str, tuple[float, float]] = {}  # name -> (next try, delay after it)
        self._lock = threading.Lock()
        # While the outputs disk is full: why (the last error), and when to try a copy again (monotonic) and
        # how long to wait after that one fails. One copy at a time tests the disk; the rest wait.
        self.disk_full: str | None = None
        self._disk_retry_at = 0.0
        self._disk_delay = FIRST_RETRY_S
        self.failing: str | None = None  # the last copy error while some image waits for another try

    def fetch(self, output_name: str, pngs: Pngs | None = None) -> bool:
        """Make sure the outputs folder holds ``output_name``: False if Redis no longer has it. Raises
        ``OSError`` when it cannot be written here, ``redis.RedisError`` when Redis cannot be read."""
        if not is_servable_name(output_name):
            return False
        pngs = pngs or self.pngs
        destination = self.outputs_dir / output_name
        if not destination.is_file():
            data = pngs.get(output_name)
            if data is None:
                return False
            write_atomically(destination, data)
        pngs.release(output_name, self.replica_id)
        return True

    def copy(self, output_name: str, pngs: Pngs | None = None) -> bool:
        """``fetch``, never raising: a failure is logged and scheduled for another try. True once copied
        (or gone from Redis: nothing left to copy)."""
        try:
            self.fetch(output_name, pngs)
        except OSError as exc:
            no_room, first = is_out_of_space(exc), False
            with self._lock:
                _, delay = self._retries.get(output_name, (0.0, FIRST_RETRY_S))
                self._retries[output_name] = (time.monotonic() + delay, min(MAX_RETRY_S, delay * 2))
                self.failing = f"{type(exc).__name__}: {exc}"
                if no_room:
                    first = self.disk_full is None
                    self.disk_full = str(exc)
                    self._disk_retry_at = time.monotonic() + self._disk_delay
                    delay, self._disk_delay = self._disk_delay, min(MAX_RETRY_S, self._disk_delay * 2)
            if no_room:
                if first:
                    log.warning("outputs disk full (%s): %s; images wait in Redis and are copied once there is "
                                "room (next try in %.0f s)", self.outputs_dir, exc, delay)
                else:
                    log.info("image %s: outputs disk still full (%s); next try in %.0f s", output_name, exc, delay)
            else:
                log.warning("image %s: could not be copied into %s (%s); will retry in %.0f s",
                            output_name, self.outputs_dir, exc, delay)
            return False
        except redis.RedisError as exc:
            log.warning("image %s: Redis unreachable (%s); will retry", output_name, exc)
            with self._lock:
                self._retries.setdefault(output_name, (time.monotonic() + FIRST_RETRY_S, FIRST_RETRY_S))
            return False
        with self._lock:
            self._retries.pop(output_name, None)
            if not self._retries:
                self.failing = None
            if self.disk_full is not None:
                log.info("outputs disk has room again (%s): copying the images that waited", self.outputs_dir)
                self.disk_full, self._disk_delay = None, FIRST_RETRY_S
        return True

    def trouble(self) -> str | None:
        """Why images wait to be copied into this replica's outputs folder now; None when none does."""
        if self.disk_full is not None:
            return f"outputs disk full ({self.outputs_dir})"
        with self._lock:
            waiting = len(self._retries)
        if waiting and self.failing is not None:
            return f"{waiting} image(s) not copied into {self.outputs_dir}: {self.failing[:200]}"
        return None

    def _disk_paused(self) -> bool:
        """The disk is full and its next test is not due: copy nothing now (one image will test it)."""
        return self.disk_full is not None and time.monotonic() < self._disk_retry_at

    def retry_due(self, pngs: Pngs | None = None) -> None:
        now = time.monotonic()
        with self._lock:
            # While the disk is full, every image is due once the disk's next test is: the first one tests it.
            due = [name for name, (at, _) in sorted(self._retries.items(), key=lambda item: item[1][0])
                   if at <= now or self.disk_full is not None]
        for name in due:
            if self._disk_paused():
                return
            self.copy(name, pngs)

    def copy_uncopied(self, pngs: Pngs) -> None:
        """Copy the PNGs that no replica has yet and that this one is not already retrying: those announced
        while it was down past the stream's length, or missed in any other way."""
        for name in pngs.uncopied():
            if self._disk_paused():
                return
            with self._lock:
                scheduled = name in self._retries
            if not scheduled:
                self.copy(name, pngs)

    def run(self, pngs: Pngs, stopping: threading.Event) -> None:
        """Follow the stream until ``stopping`` is set (a thread's body; ``pngs`` has its own connection,
        able to block ``STREAM_BLOCK_MS`` on the stream)."""
        last_id = b"0"  # from the start of the stream: images finished while this replica was down
        next_beat = next_sweep = 0.0
        while not stopping.is_set():
            try:
                now = time.monotonic()
                if now >= next_beat:  # before reading: PNGs announced from now on wait for this replica
                    pngs.replica_beat(self.replica_id, REPLICA_TTL_S)
                    next_beat = now + REPLICA_BEAT_S
                for entry_id, name in pngs.read_finished(last_id, STREAM_BLOCK_MS):
                    if self._disk_paused():  # no room: the image waits in Redis, tried with the others
                        with self._lock:
                            self._retries.setdefault(name, (time.monotonic(), FIRST_RETRY_S))
                    else:
                        self.copy(name, pngs)
                    last_id = entry_id
                self.retry_due(pngs)
                if now >= next_sweep:
                    for name in pngs.kept():
                        pngs.release(name)
                    self.copy_uncopied(pngs)
                    next_sweep = now + SWEEP_S
            except redis.RedisError as exc:
                log.debug("image transfer: Redis unreachable: %s", exc)
                stopping.wait(0.5)
            except Exception:  # never let the thread die: images would stop arriving for good
                log.exception("image transfer: unexpected error")
                stopping.wait(0.5)
        with contextlib.suppress(redis.RedisError):  # else its heartbeat expires on its own
            pngs.replica_leave(self.replica_id)
