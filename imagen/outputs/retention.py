"""Outputs retention: an optional bound on how long, and how many bytes of, generated PNGs the outputs folder
keeps. Off by default, as the API reference keeps files in ``/outputs``.

``IMAGEN_OUTPUTS_MAX_AGE_S`` deletes the PNGs older than that (by modification time: when the file was
written); ``IMAGEN_OUTPUTS_MAX_BYTES`` then deletes the oldest until the rest fit (the newest is always kept, so
an image just made can be fetched). A ``RetentionSweeper`` thread of the API process applies them every
``IMAGEN_OUTPUTS_SWEEP_S``, off the event loop; each API replica sweeps its own folder (distributed workers
keep no outputs). Only files the service may serve are looked at: plain PNG names directly in the folder
(``names.is_servable_name``), never a symlink, a sub-folder or a file being written (``.partial-*``). A
deleted image is answered as any missing one: ``/image``, ``/download`` and ``/outputs`` give 404.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imagen.config import Settings
from imagen.outputs.names import is_servable_name

log = logging.getLogger("imagen.outputs")


@dataclass(frozen=True)
class RetentionPolicy:
    max_age_s: float | None = None
    max_bytes: int | None = None

    @property
    def active(self) -> bool:
        return self.max_age_s is not None or self.max_bytes is not None

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicy:
        return cls(max_age_s=settings.outputs_max_age_s, max_bytes=settings.outputs_max_bytes)


@dataclass(frozen=True)
class SweepResult:
    deleted: tuple[str, ...]
    freed_bytes: int
    kept: int
    kept_bytes: int


@dataclass(frozen=True)
class _Output:
    name: str
    size: int
    mtime_ns: int


def _outputs(folder: Path) -> list[_Output]:
    """The servable PNGs of ``folder``, oldest first (by modification time, then name)."""
    found = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    for entry in entries:
        if not is_servable_name(entry.name):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # deleted meanwhile
        if stat.S_ISREG(info.st_mode):
            found.append(_Output(entry.name, info.st_size, info.st_mtime_ns))
    return sorted(found, key=lambda output: (output.mtime_ns, output.name))


def sweep(folder: Path, policy: RetentionPolicy, now: float | None = None) -> SweepResult:
    """Delete what ``policy`` does not keep of ``folder``'s PNGs (``now``: the time ages are counted from)."""
    outputs = _outputs(folder)
    doomed: list[_Output] = []
    if policy.max_age_s is not None:
        cutoff_ns = int(((time.time() if now is None else now) - policy.max_age_s) * 1e9)
        doomed = [output for output in outputs if output.mtime_ns < cutoff_ns]
        outputs = outputs[len(doomed) :]  # sorted oldest first: the old ones are a prefix
    if policy.max_bytes is not None:
        total = sum(output.size for output in outputs)
        while total > policy.max_bytes and len(outputs) > 1:
            oldest = outputs.pop(0)
            doomed.append(oldest)
            total -= oldest.size
    deleted, freed = [], 0
    for output in doomed:
        try:
            (folder / output.name).unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:  # one file it may not delete: the others still go
            log.warning("outputs retention: could not delete %s: %s", folder / output.name, exc)
            continue
        deleted.append(output.name)
        freed += output.size
    return SweepResult(tuple(deleted), freed, len(outputs), sum(output.size for output in outputs))


class RetentionSweeper:
    """A daemon thread that sweeps the outputs folder every ``period_s`` seconds, starting at once."""

    def __init__(
        self, folder: Path, policy: RetentionPolicy, period_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.folder = folder
        self.policy = policy
        self.period_s = period_s
        self.clock = clock
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionSweeper | None:
        """The sweeper the settings ask for; None when retention is off (the default)."""
        policy = RetentionPolicy.from_settings(settings)
        return cls(settings.outputs_dir, policy, settings.outputs_sweep_s) if policy.active else None

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="imagen-outputs-retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def sweep_once(self) -> SweepResult:
        result = sweep(self.folder, self.policy, self.clock())
        if result.deleted:
            log.info(
                "outputs retention: deleted %d PNG(s), %d bytes, from %s (max age %s s, max bytes %s); %d kept, "
                "%d bytes",
                len(result.deleted), result.freed_bytes, self.folder, self.policy.max_age_s, self.policy.max_bytes,
                result.kept, result.kept_bytes,
            )  # fmt: skip
        return result

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.sweep_once()
            except Exception:  # a folder it may not read, a disk error: try again next period
                log.exception("outputs retention: sweep of %s failed", self.folder)
            self._stopping.wait(self.period_s)
