"""The ``X-Generation-Metadata`` header of ``/image/{job_id}``: a compact summary, never a whole prompt.

It carries the reference's fields (model, loras, steps, guidance_scale, seed, ip_strength) plus ``size``
(``"WxH"``) and ``sampler``, and those of ``num_images``, ``clip_skip``, ``strength``, ``init_image``,
``mask_image`` and ``ip_image`` that the job used (never an image), as ASCII JSON. Every string in it is
cut to ``TEXT_CHARS`` characters once escaped and at most ``LORAS_PER_REQUEST_CAP`` LoRAs are listed, so
the header stays under ``MAX_HEADER_BYTES`` whatever the job held: clients (``requests`` stops at 64 KB)
and proxies (nginx's default 4-8 KB buffer) read it. The full metadata stays in ``/status`` and in the PNG.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from imagen.config import LORAS_PER_REQUEST_CAP

MAX_HEADER_BYTES = 2048
TEXT_CHARS = 64  # registry ids are at most 64 characters: only foreign or very long names are cut
SUMMARY_FIELDS = ("model", "loras", "steps", "guidance_scale", "seed", "ip_strength")
# The SDXL request fields, present only when the job used them (numbers and booleans: short by nature).
USED_FIELDS = ("num_images", "clip_skip", "strength", "init_image", "mask_image", "ip_image")


def generation_metadata_header(metadata: Mapping[str, Any]) -> str:
    summary: dict[str, Any] = {}
    for field in SUMMARY_FIELDS:
        if field in metadata:
            summary[field] = metadata[field]
    if "model" in summary:
        summary["model"] = _clip(str(summary["model"]))
    if "loras" in summary:
        summary["loras"] = [
            {"name": _clip(str(lora.get("name"))), "weight": lora.get("weight")}
            for lora in summary["loras"][:LORAS_PER_REQUEST_CAP]
        ]
    if "width" in metadata and "height" in metadata:
        summary["size"] = f"{int(metadata['width'])}x{int(metadata['height'])}"
    if "sampler" in metadata:
        summary["sampler"] = _clip(str(metadata["sampler"]))
    for field in USED_FIELDS:
        value = metadata.get(field)
        if isinstance(value, bool | int | float):
            summary[field] = value
    return json.dumps(summary, ensure_ascii=True)


def _clip(text: str) -> str:
    """``text`` if its JSON escape fits in ``TEXT_CHARS``, else its longest prefix that does, plus "..."."""
    if len(json.dumps(text)) - 2 <= TEXT_CHARS:
        return text
    kept: list[str] = []
    size = len("...")
    for char in text:
        size += len(json.dumps(char)) - 2
        if size > TEXT_CHARS:
            break
        kept.append(char)
    return "".join(kept) + "..."
