"""Which files of the outputs folder may be served, and nothing outside it."""

from __future__ import annotations

from pathlib import Path

from imagen.outputs.names import is_servable_name


def resolve_servable(outputs_dir: Path, filename: str) -> Path | None:
    """The real path of ``filename`` if it is a regular PNG directly inside ``outputs_dir``, else None.

    Refuses anything that is not a bare name (``..``, separators, backslashes, absolute paths, encoded
    variants after URL decoding) and symlinks that lead out of the folder.
    """
    if not is_servable_name(filename):
        return None
    root = outputs_dir.resolve()
    try:
        real = (root / filename).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if real.parent != root or not real.is_file():
        return None
    return real
