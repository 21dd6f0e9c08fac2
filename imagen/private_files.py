"""The data folder holds every key's prompts and uploads (the job database): nobody else on the host reads it.

A data folder Imagen creates is 0700. One that exists already keeps its mode (it may be shared on purpose),
but a folder others may enter is logged as a warning. The database and its ``-wal`` and ``-shm`` files are
0600 (tightened at each start). SQLite creates a database's ``-wal`` and ``-shm`` files with the database
file's own mode, so those made later are 0600 as well.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("imagen.files")

PRIVATE_FOLDER = 0o700
PRIVATE_FILE = 0o600


def private_folder(path: Path) -> None:
    """Create ``path`` (and its parents) with mode 0700 when missing; warn when an existing one is open to
    others."""
    try:
        path.mkdir(mode=PRIVATE_FOLDER, parents=True)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning(
                "the data folder %s is open to other users (mode %o): it holds every key's prompts and "
                "uploads; `chmod 700 %s` unless that is on purpose",
                path, mode, path,
            )  # fmt: skip
        return
    os.chmod(path, PRIVATE_FOLDER)  # whatever the umask said


def private_database(path: Path) -> None:
    """Make the SQLite database ``path`` and its ``-wal`` and ``-shm`` files (those that exist) 0600."""
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if stat.S_IMODE(file.stat().st_mode) != PRIVATE_FILE:
                os.chmod(file, PRIVATE_FILE)
        except FileNotFoundError:
            continue
        except PermissionError as exc:  # another user's file: say so, the server can still use it
            log.warning("cannot make %s private (mode 600): %s", file, exc)
