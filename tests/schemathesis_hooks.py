"""Schemathesis hooks for the OpenAPI run (tests/test_openapi.py loads them through SCHEMATHESIS_HOOKS).

The document says everything about a valid request but what JSON Schema cannot express: each LoRA at most
once; an image's content (``init_image``, ``mask_image``, ``ip_image``: a data URL of a real image, or an
upload's id); ``width`` and ``height`` both non-null or both null; ``strength`` and ``mask_image`` only
with an init image; ``ip_image`` only with ``ip_strength`` > 0. Requests that break those are left out, so
that "valid by the document" means "accepted" (tests/test_image_inputs.py covers each of them as a 422).
``POST /uploads`` is left out of the run for the same reason: random bytes are not an image.
(``filter_case``: the coverage phase applies it, not ``filter_body``.)
"""

from __future__ import annotations

from typing import Any

import schemathesis

IMAGE_FIELDS = ("init_image", "mask_image", "ip_image", "strength")


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    body = case.body
    if not isinstance(body, dict):
        return True
    if any(body.get(field) is not None for field in IMAGE_FIELDS):
        return False
    if (body.get("width") is None) != (body.get("height") is None):
        return False
    if not isinstance(body.get("loras"), list):
        return True
    names = [repr(lora.get("name")) for lora in body["loras"] if isinstance(lora, dict)]
    return len(names) == len(set(names))
