"""What the files the service follows while it runs share (the API keys file, ``access/keys.py``; the
registry file, ``registry/watch.py``): how often one is looked at, and how a file that stays broken is
reported. Each look is the caller's (it hashes and parses its own format); this only times and logs it."""

from __future__ import annotations

import logging
import threading
import time

RELOAD_CHECK_S = 1.0  # a followed file is looked at again at most this often
COMPLAINT_REPEAT_S = 60.0  # a file that stays broken or missing is logged again this often


class LookSchedule:
    """Says, to one caller per ``RELOAD_CHECK_S``, that the file should be looked at again: requests ask it
    as they come (cheap, on the event loop), and the one told yes reads the file in a thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._checked_at = time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._checked_at < RELOAD_CHECK_S:
                return False
            self._checked_at = now
            return True


class Complaints:
    """A followed file's trouble, logged at ERROR when it starts or changes, and again every
    ``COMPLAINT_REPEAT_S`` while it lasts (a broken file must not go unnoticed, nor flood the log)."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.current: str | None = None  # the trouble now, while it lasts
        self._said_at = 0.0

    def complain(self, message: str) -> None:
        now = time.monotonic()
        if message != self.current or now - self._said_at >= COMPLAINT_REPEAT_S:
            self.log.error("%s", message)
            self.current, self._said_at = message, now

    def repeat(self) -> None:
        """The file is as it was: say the trouble again if it is time to."""
        if self.current is not None:
            self.complain(self.current)

    def clear(self) -> None:
        self.current = None
