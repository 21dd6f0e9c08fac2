"""Generated files: their names, how they are written, and which of them may be served."""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

# Only plain file names made of these characters are ever served: no separators, no "..", no NUL.
SERVABLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.png")


def make_output_name(prefix: str, now: datetime | None = None) -> str:
    """``{model_prefix}_{YYYYMMDD}_{HHMMSS}_{8 hex}.png``, as the API reference names files."""
    stamp = (now or datetime.now()).strftime("%Y%m%d_%H%M%S")
    return f"{prefix}_{stamp}_{secrets.token_hex(4)}.png"


def resolve_servable(outputs_dir: Path, filename: str) -> Path | None:
    """The real path of ``filename`` if it is a regular PNG directly inside ``outputs_dir``, else None.

    Refuses anything that is not a bare name (``..``, separators, backslashes, absolute paths, encoded
    variants after URL decoding) and symlinks that lead out of the folder.
    """
    if not SERVABLE_NAME.fullmatch(filename) or ".." in filename:
        return None
    root = outputs_dir.resolve()
    try:
        real = (root / filename).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if real.parent != root or not real.is_file():
        return None
    return real


def a1111_parameters(metadata: dict[str, Any]) -> str:
    """The ``parameters`` text chunk as AUTOMATIC1111 writes it (read by civitai and other tools)."""
    prompt = metadata.get("final_prompt") or metadata.get("prompt", "")
    negative = metadata.get("final_negative_prompt", metadata.get("negative_prompt")) or ""
    fields = {
        "Steps": metadata.get("steps"),
        "Sampler": metadata.get("sampler", "Euler"),
        "CFG scale": metadata.get("guidance_scale"),
        "Seed": metadata.get("seed"),
        "Size": f"{metadata.get('width', 1024)}x{metadata.get('height', 1024)}",
        "Model": metadata.get("model"),
    }
    if metadata.get("ip_strength"):
        fields["IP-Adapter strength"] = metadata["ip_strength"]
    loras = metadata.get("loras") or []
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    settings = ", ".join(f"{key}: {value}" for key, value in fields.items() if value is not None)
    if loras:
        # A1111 puts <lora:name:weight> in the prompt itself; list them as an extra field instead so the
        # prompt line stays the prompt that was actually encoded.
        settings += ", Lora weights: \"" + ", ".join(f"{lo['name']}: {lo['weight']}" for lo in loras) + '"'
    settings += ", Version: imagen"
    lines.append(settings)
    return "\n".join(lines)


def save_png(
    image: Image.Image, metadata: dict[str, Any], outputs_dir: Path, filename: str, compress_level: int = 1
) -> Path:
    """Write an RGB 8-bit PNG with its generation parameters, atomically (a reader never sees half a file,
    and a retried job overwrites its own file instead of adding a second one)."""
    outputs_dir.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_itxt("parameters", a1111_parameters(metadata))
    info.add_itxt("imagen", json.dumps(metadata, ensure_ascii=False, sort_keys=True))
    destination = outputs_dir / filename
    fd, temporary = tempfile.mkstemp(prefix=".partial-", suffix=".png", dir=outputs_dir)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.convert("RGB").save(handle, format="PNG", pnginfo=info, compress_level=compress_level)
        os.chmod(temporary, 0o644)
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return destination
