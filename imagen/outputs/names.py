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


def image_names(output_name: str, count: int) -> list[str]:
    """The files of a job's ``count`` images: image 0 keeps ``output_name``, image i ≥ 1 adds ``_i`` before
    ``.png`` (``demo_20260130_123456_abc123.png``, ``demo_20260130_123456_abc123_1.png``, ...)."""
    if count < 1:
        raise ValueError("count must be at least 1")
    stem, dot, extension = output_name.rpartition(".")
    if not dot:
        stem, extension = output_name, ""
    suffix = f".{extension}" if dot else ""
    return [output_name, *(f"{stem}_{index}{suffix}" for index in range(1, count))]
