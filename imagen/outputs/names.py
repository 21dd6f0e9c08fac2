"""File names of generated images: how they are made and which names may ever be served."""

from __future__ import annotations

import re
import secrets
from datetime import datetime

# Only plain file names made of these characters are ever served: no separators, no "..", no NUL.
SERVABLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.png")


def make_output_name(prefix: str, now: datetime | None = None) -> str:
    """``{model_prefix}_{YYYYMMDD}_{HHMMSS}_{8 hex}.png``, as the API reference names files."""
    stamp = (now or datetime.now()).strftime("%Y%m%d_%H%M%S")
    return f"{prefix}_{stamp}_{secrets.token_hex(4)}.png"


def is_servable_name(filename: str) -> bool:
    """A bare PNG name: no separators, no ``..``, nothing that could lead out of the outputs folder."""
    return bool(SERVABLE_NAME.fullmatch(filename)) and ".." not in filename
