"""Latches between a test and a job running in another process: the job holds until the test releases it.

A test engine job ``hold NAME`` (tests/engines.py) marks ``NAME.started`` in ``$IMAGEN_TEST_LATCH_DIR``,
then waits for ``NAME.release``. The test waits for the condition "the job is running" with
:meth:`Latches.wait_started`, does what it needs while the job is certainly held, then :meth:`Latches.release`.
No timing is assumed: the job holds for as long as the test wants (bounded, so a forgotten latch cannot hang
a worker forever). The job waits on a named pipe that the release writes to, so it wakes at the release,
not at the next look at a file.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Callable
from pathlib import Path

LATCH_DIR_ENV = "IMAGEN_TEST_LATCH_DIR"
HOLD_LIMIT_S = 600.0  # a test that never releases its latch still ends, with the job failing loudly
REPORT_EVERY_S = 0.5  # a held job reports progress as often as a real engine's steps come


def hold_until_released(name: str, report: Callable[[int], None]) -> None:
    """In the job's process: say the job started, then wait for the test's release.

    ``report(percent)`` is the job's progress: it is called with a rising percent (1 to 99, one more every
    0.5 s while nothing happens) and raises once the job is cancelled, so a held job can be cancelled like a
    real one. (The distributed worker looks for a cancel only when the progress changes: a job held past
    99 % can no longer be cancelled there, about 50 s after it started.)"""
    folder = Path(os.environ[LATCH_DIR_ENV])
    pipe = folder / f"{name}.pipe"
    with contextlib.suppress(FileExistsError):
        os.mkfifo(pipe)
    # Read-write: the pipe is never at end-of-file, so it becomes readable only when the test writes to it.
    wakeup = os.open(pipe, os.O_RDWR | os.O_NONBLOCK)
    (folder / f"{name}.started").touch()
    deadline = time.monotonic() + HOLD_LIMIT_S
    percent = 1
    try:
        while not (folder / f"{name}.release").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"latch {name!r} was never released")
            report(min(99, percent))
            percent += 1
            select.select([wakeup], [], [], REPORT_EVERY_S)  # the release's write, or time for a report
            with contextlib.suppress(BlockingIOError):
                os.read(wakeup, 64)
    finally:
        os.close(wakeup)


class Latches:
    """The test's side: one folder of latches, passed to server and worker processes via the environment."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        return {LATCH_DIR_ENV: str(self.folder)}

    def started(self, name: str) -> bool:
        return (self.folder / f"{name}.started").exists()

    def wait_started(self, name: str, timeout: float = 120.0) -> None:
        """Wait until a ``hold NAME`` job is running (bounded: a generous limit, not a timing assumption)."""
        from tests.conftest import wait_for  # conftest imports this module: imported when first needed

        wait_for(lambda: self.started(name), timeout=timeout, interval=0.02)

    def release(self, name: str) -> None:
        """Let a held job end: the mark stays (a later attempt of the job ends at once), and the pipe wakes
        a job holding now."""
        (self.folder / f"{name}.release").touch()
        try:
            writer = os.open(self.folder / f"{name}.pipe", os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # no job holds it now (none started, or it ended): the mark is enough
            return
        try:
            os.write(writer, b"x")
        finally:
            os.close(writer)

    def reset(self, name: str) -> None:
        """Forget a latch's marks, so the same name can hold a job again (after a restart, say)."""
        for suffix in ("started", "release"):
            (self.folder / f"{name}.{suffix}").unlink(missing_ok=True)
